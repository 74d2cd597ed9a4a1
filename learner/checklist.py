"""What the user wanted, in complete sentences: the system prompt of a regenerated response and
the checklist the judge (and later the evaluator) compares responses by (WildFeedback 3.2/3.3).

``rubric_preferences`` derives the preferences from the DSAT rubrics and the user's own words,
with no model. ``summarize_with_llm`` asks an OpenAI-compatible model with the paper's A.2 prompt
and falls back to the rubric version when the answer is unusable.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

from services.chat import ChatEndpoint, ChatError

log = logging.getLogger(__name__)

SAFETY_PREFERENCE = "The response should be safe."
_QUOTE_CHARS = 300

# One sentence per DSAT rubric (WildFeedback Table 5), phrased as what the better answer does.
RUBRIC_PREFERENCES: dict[str, str] = {
    "Negative_Feedback": "The response avoids what the user objected to in the previous answer.",
    "Revision": "The response makes the change the user asked for instead of repeating the "
    "earlier answer.",
    "Factual_Error": "The response is factually correct and does not repeat the mistake the "
    "user pointed out.",
    "Unrealistic_Expectation": "The response is honest about what the assistant can and cannot "
    "do and offers the most useful alternative.",
    "No_Engagement": "The response stays on what the user actually asked, without pushing "
    "questions or suggestions the user did not take up.",
    "Ignored": "The response directly addresses the user's request and goal.",
    "Lower_Quality": "The response is at least as good as what the user expected from other "
    "tools or earlier answers.",
    "Insufficient_Detail": "The response gives the specific, detailed and useful information the "
    "user asked for.",
    "Style": "The response follows the tone, format and length the user asked for.",
}

A2_PROMPT = """# Conversation between User and AI
<|begin_of_history|>
{history}
<|end_of_history|>

# Instruction
What are the user's query and preferences? The query should be the user's first attempt before \
providing any feedbacks to the model. Only output the turn id. The preference should always be \
based on user's feedbacks and in complete sentences. Generate your answer in json format like
[{{
  "query": turn id,
  "preferences": [preference 1, preference 2, ...]
}}]
"""


def _quote(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"


def rubric_preferences(
    dsat: Sequence[str], feedback: Sequence[str], *, safe: bool = True
) -> list[str]:
    """Preferences from the DSAT rubrics of the feedback turn(s) and what the user wrote."""
    items = [RUBRIC_PREFERENCES[r] for r in dict.fromkeys(dsat) if r in RUBRIC_PREFERENCES]
    for text in dict.fromkeys(t for t in feedback if t and t.strip()):
        items.append(f'The response takes into account the user\'s feedback: "{_quote(text)}"')
    if not items:
        items.append("The response serves the user's request better than the previous answer.")
    if safe:
        items.append(SAFETY_PREFERENCE)
    return items


def render_history(messages: Sequence[tuple[str, str]]) -> str:
    lines = []
    for i, (role, content) in enumerate(messages):
        lines.append(f"[T{i}] {role.upper()}: {content}")
    return "\n".join(lines)


def parse_a2(text: str) -> list[str]:
    """The preferences of an A.2 answer; ``ValueError`` when there are none."""
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        raise ValueError("no JSON in the answer")
    value, _ = json.JSONDecoder().raw_decode(text[start:])
    entries = value if isinstance(value, list) else [value]
    found: list[str] = []
    for entry in entries:
        prefs = entry.get("preferences") if isinstance(entry, dict) else None
        if isinstance(prefs, list):
            found += [str(p).strip() for p in prefs if str(p).strip()]
    if not found:
        raise ValueError("the answer lists no preferences")
    return found


def summarize_with_llm(
    endpoint: ChatEndpoint,
    messages: Sequence[tuple[str, str]],
    *,
    fallback: list[str],
    max_tokens: int = 400,
) -> list[str]:
    """A.2 summary of the conversation's preferences (plus the safety sentence), or
    ``fallback`` when the model cannot be reached or answers nothing usable."""
    prompt = A2_PROMPT.format(history=render_history(messages))
    try:
        answer = endpoint.complete(
            [{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
        )
        prefs = parse_a2(answer)
    except (ChatError, ValueError) as exc:
        log.info("A.2 summary unusable, using rubric preferences: %s", exc)
        return fallback
    return [*prefs[:8], SAFETY_PREFERENCE]
