"""Prompt text of the detector's LLM tier: the WildFeedback SAT/DSAT classification prompt.

Source: Shi et al., "WildFeedback: Aligning LLMs With In-situ User Interactions And Feedback",
appendix A.1 "Prompt for feedback signals identification" (adapted there from Das et al., 2023,
and Lin et al., 2024b). ``A1_PROMPT`` is that prompt, word for word, with these changes only:

- PDF line wraps are undone and the section headings are written like the first one
  (``## TASK ##``, ``## OUTPUT FORMAT ##``, ``## INPUT ##``, ``## OUTPUT ##``); the stray comma
  after the last intent label is dropped, so the label block is valid JSON.
- The ``#D1#`` placeholder holds the dialogue (``render_dialogue``): a JSON list of turns
  ``{"T-k": {"User": ..., "Agent": ...}}``, oldest first; the last turn is the judged user message,
  without an answer.
- One line of ours follows the paper's OUTPUT FORMAT section (``LAST_TURN_ONLY``): only the last
  turn's entry is wanted, since wildloop judges one user turn per request and the earlier turns are
  context (the cheaper tiers or earlier requests label them).

With ``domain_and_intent=False`` (``build_prompt``) the domain and intent label lists, their two
task lines and their two output fields are left out: the paper adds them "in addition" to the
SAT/DSAT task, and they cost ~600 prompt tokens, which a small judge with a 2k context needs for
the conversation.

The satisfaction/dissatisfaction definitions here are the prompt's own wording, which differs
slightly from the paper's Tables 4 and 5 (``services.detector.rubrics``) for ``Getting_There``
(one more sentence) and ``Style`` (other examples).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from services.detector.judgement import Message
from services.events.schemas import DsatRubric, SatRubric

NA_LABEL = "N/A"

RELATION_LABELS: dict[str, str] = {
    "YES": "The current turn has **some or any** topical/subtopical relation to the preceding "
    "conversation context.",
    "NO": "The current turn has **absolutely no** topical/subtopical relation to the preceding "
    "conversation context OR is the first turn in the conversation, marking the beginning of a "
    "new dialogue segment.",
}

DOMAIN_LABELS: tuple[str, ...] = (
    "AI MACHINE LEARNING AND DATA SCIENCE",
    "ASTROLOGY",
    "BIOLOGY AND LIFE SCIENCE",
    "BUSINESS AND MARKETING",
    "CAREER AND JOB APPLICATION",
    "CLOTHING AND FASHION",
    "COOKING FOOD AND DRINKS",
    "CRAFTS",
    "CULTURE AND HISTORY",
    "CYBERSECURITY",
    "DATING FRIENDSHIPS AND RELATIONSHIPS",
    "DESIGN",
    "EDUCATION",
    "ENTERTAINMENT",
    "ENVIRONMENT AGRICULTURE AND ENERGY",
    "FAMILY PARENTING AND WEDDINGS",
    "FINANCE AND ECONOMICS",
    "GAMES",
    "GEOGRAPHY AND GEOLOGY",
    "HEALTH AND MEDICINE",
    "HOUSING AND HOMES",
    "HUMOR AND SARCASM",
    "LANGUAGE",
    "LAW AND POLITICS",
    "LITERATURE AND POETRY",
    "MANUFACTURING AND MATERIALS",
    "MATH LOGIC AND STATISTICS",
    "MUSIC AND AUDIO",
    "NEWS",
    "PETS AND ANIMALS",
    "PHILOSOPHY",
    "PHYSICS CHEMISTRY AND ASTRONOMY",
    "PRODUCTIVITY",
    "PSYCHOLOGY AND EMOTIONS",
    "RELIGION AND MYTHOLOGY",
    "SHIPPING AND DELIVERY",
    "SHOPPING AND GIFTS",
    "SMALL TALK",
    "SOCIAL MEDIA",
    "SOFTWARE AND WEB DEVELOPMENT",
    "SPORTS AND FITNESS",
    "TAXATION",
    "TECHNOLOGY",
    "TIME AND DATES",
    "TRANSPORTATION AUTOMOTIVE AND AEROSPACE",
    "TRAVEL",
    "VISUAL ARTS AND PHOTOGRAPHY",
    "WEATHER",
    "WRITING JOURNALISM AND PUBLISHING",
    "OTHER",
)

INTENT_LABELS: dict[str, str] = {
    "INTENT:1-INFORMATION_SEEKING": "The user wants to find factual information or answers to "
    "specific questions.",
    "INTENT:2-ANALYSIS": "The user asks analytical or conceptual questions about a complex topic "
    "or problem. The user's questions require some degree of reasoning, interpretation, "
    "argumentation, comparison, and/or data processing.",
    "INTENT:3-CREATION": "The user asks the agent to either generate original content or "
    "translate existing content into new content based on specified criteria or constraints.",
    "INTENT:4-OPEN-ENDED_DISCOVERY": "The user wants to casually chat or play with the agent out "
    "of curiosity, boredom, or humor, OR the user's intent is so unclear/underspecified that it's "
    "impossible to categorize in any of the other intent classes. The user mainly treats the "
    "agent as a conversation or chitchat partner, and none of the other intent categories can be "
    "assigned.",
}

SAT_PROMPT_DEFINITIONS: dict[SatRubric, str] = {
    SatRubric.GRATITUDE: "The user thanks or compliments the AI agent for its responses",
    SatRubric.LEARNING: "The user learns something new or useful by indicating curiosity and "
    "satisfaction with the information provided",
    SatRubric.COMPLIANCE: "The user follows the AI agent's suggestions or instructions when "
    "applicable",
    SatRubric.PRAISE: "The user uses positive feedback words (e.g., excellent, amazing) or emojis, "
    "indicating enthusiasm and enjoyment of the conversation",
    SatRubric.PERSONAL_DETAILS: "The user shares more personal details or opinions with the AI "
    "agent when satisfied with its responses",
    SatRubric.HUMOR: "The user jokes with or challenges the AI agent in a friendly manner when "
    "suitable",
    SatRubric.ACKNOWLEDGMENT: "The user acknowledges or confirms that they understood or agreed "
    "with the AI agent's explanations when relevant",
    SatRubric.POSITIVE_CLOSURE: "The user ends the conversation on a positive note without asking "
    "for more information or assistance",
    SatRubric.GETTING_THERE: "The user acknowledges that the model's response is getting better or "
    "has merit but is not fully satisfied. Appropriate dissatisfaction criteria may need to be "
    "checked as well when Getting_There presents",
}
SAT_NA_DEFINITION = (
    "The user utterance of the turn does NOT match the definition of any other valid satisfaction "
    "labels"
)

DSAT_PROMPT_DEFINITIONS: dict[DsatRubric, str] = {
    DsatRubric.NEGATIVE_FEEDBACK: "The user explicitly expresses dissatisfaction, frustration, "
    "annoyance, or anger with the AI agent's response or behavior",
    DsatRubric.REVISION: "The user explicitly asks the AI agent to revise its previous response or "
    "repeatedly asks similar questions",
    DsatRubric.FACTUAL_ERROR: "The user points out the AI agent's factual mistakes, inaccuracies, "
    "or self-contradiction in its information or output",
    DsatRubric.UNREALISTIC_EXPECTATION: "The user has unrealistic expectations of what the AI "
    "agent can do and does not accept its limitations or alternatives",
    DsatRubric.NO_ENGAGEMENT: "The user does not respond to the AI agent's questions, "
    "suggestions, feedback requests, etc.",
    DsatRubric.IGNORED: "The user implies that their query was ignored completely or that the "
    "response did not address their intent/goal at all",
    DsatRubric.LOWER_QUALITY: "The user perceives a decline in quality of service compared to "
    "previous experience with other agents/tools, etc.",
    DsatRubric.INSUFFICIENT_DETAIL: "The user wants more specific/useful information than what is "
    "provided by the AI agent",
    DsatRubric.STYLE: "The user feels that there is a mismatch between their preferred style (e.g. "
    "bullet point vs paragraph, formal vs casual, short vs long, etc.) and what is provided by "
    "the AI agent",
}
DSAT_NA_DEFINITION = (
    "The user utterance of the turn does NOT match the definition of any other valid "
    "dissatisfaction labels"
)

STATE_LABELS: dict[str, str] = {
    "FEEDBACK": "The user utterance of the turn contains a comment or evaluation or judgement of "
    "the previous turn's agent response",
    "REFINEMENT": "The user utterance of the turn is a repetition or refinement of "
    "unclear/underspecified instruction given in the previous turn's user utterance",
    "NEWTOPIC": "The user utterance of the turn is either the first turn of the conversation or is "
    "not related in terms of topic or task to its previous turn, introducing a new topic or task",
    "CONTINUATION": "The user utterance of the turn is a topical or logical continuation of the "
    "previous turn",
}

_TASK_INTRO = (
    "You are given a dialogue between a user and an agent comprised of turns starting with T. "
    "For each turn, solely based on the turn's User utterance, you must carefully analyze the "
    "conversation and answer the following questions by replacing $instruction$ with correct "
    "answers in JSON format."
)
_TASK_SUMMARY = "- Summarize the user utterance in ≤ 3 sentences"
_TASK_RELATION = (
    "- Analyze the user utterance's relation with the previous turn and output an appropriate "
    'label from the "valid_preceding_topical_relation_labels" list.'
)
_TASK_DOMAIN = (
    "- Analyze the user utterance's domain and output an appropriate label from the "
    '"valid_domain_labels" list. If preceding_topical_relation is YES, the domain label must be '
    "consistent with the preceding turn's domain label."
)
_TASK_INTENT = (
    "- Analyze the user utterance's intent and output an appropriate label from the "
    '"valid_intent_labels" list.'
)
_TASK_SAT = (
    "- Analyze the user utterance's satisfaction with respect to the previous turn's AI response "
    'and output all applicable labels from the "valid_satisfaction_labels" list.'
)
_TASK_DSAT = (
    "- Analyze the user utterance's dissatisfaction with respect to the previous turn's AI "
    'response and output all applicable labels from the "valid_dissatisfaction_labels" list.'
)
_TASK_STATE = (
    "- Analyze the user utterance's state and output an appropriate label from the "
    '"valid_state_labels" list.'
)
_OUTPUT_INTRO = (
    "The length and turn order of the output list must match the length and turn order of the "
    "input list.\n\nThe sample output format is given as follow:"
)
LAST_TURN_ONLY = (
    "Only the last turn of the input, {turn}, needs an answer: output a list with that one "
    "turn's entry."
)

CORRECTION = (
    "Your answer could not be used: {error}. Answer again with only the JSON output list, in the "
    "output format given above, for the turn {turn}."
)


def _label_definitions(*, domain_and_intent: bool) -> str:
    def labelled(items: dict[str, str]) -> list[dict[str, str]]:
        return [{"label": k, "definition": v} for k, v in items.items()]

    block: dict[str, object] = {
        "valid_preceding_topical_relation_labels": labelled(RELATION_LABELS)
    }
    if domain_and_intent:
        block["valid_domain_labels"] = list(DOMAIN_LABELS)
        block["valid_intent_labels"] = labelled(INTENT_LABELS)
    block["valid_satisfaction_labels"] = labelled(
        {**{str(k): v for k, v in SAT_PROMPT_DEFINITIONS.items()}, NA_LABEL: SAT_NA_DEFINITION}
    )
    block["valid_dissatisfaction_labels"] = labelled(
        {**{str(k): v for k, v in DSAT_PROMPT_DEFINITIONS.items()}, NA_LABEL: DSAT_NA_DEFINITION}
    )
    block["valid_state_labels"] = labelled(STATE_LABELS)
    return json.dumps(block, indent=2, ensure_ascii=False)


def _output_format(*, domain_and_intent: bool) -> str:
    lines = [
        '"T-$turn number$": {',
        '  "summary": "$turn summary in < 3 sentence$",',
        '  "preceding_topical_relation": "$an appropriate valid preceding topical relation '
        'label$",',
    ]
    if domain_and_intent:
        lines += [
            '  "domain": "$an appropriate valid domain label$",',
            '  "intent": "INTENT:$an appropriate valid intent label$",',
        ]
    lines += [
        '  "satisfaction": [$a comma separated string list of applicable valid satisfaction '
        "label(s)$],",
        '  "dissatisfaction": [$a comma separated string list of applicable valid '
        "dissatisfaction label(s)$],",
        '  "state": "$an appropriate valid state label$"',
        "}",
    ]
    return "[{\n" + "\n".join(lines) + "\n}]"


def turn_key(number: int) -> str:
    """The key of the ``number``-th turn (1-based) in the dialogue and in the answer."""
    return f"T-{number}"


def render_dialogue(
    history: Sequence[Message], previous_assistant: str | None, user: str
) -> tuple[str, int]:
    """The dialogue as the prompt's input list, and the judged (last) turn's number.

    A turn is a user utterance and the agent's answer to it; an answer with no user message
    before it (the history window cut it off) gets a turn of its own with an empty utterance.
    System messages are left out.
    """
    turns: list[dict[str, str]] = []
    messages = [*history]
    if previous_assistant is not None:
        messages.append(Message("assistant", previous_assistant))
    for message in messages:
        if message.role == "user":
            turns.append({"User": message.content})
        elif message.role == "assistant":
            if not turns or "Agent" in turns[-1]:
                turns.append({"User": ""})
            turns[-1]["Agent"] = message.content
    turns.append({"User": user})
    listed = [{turn_key(n): turn} for n, turn in enumerate(turns, start=1)]
    return json.dumps(listed, indent=2, ensure_ascii=False), len(turns)


def build_prompt(dialogue: str, last_turn: int, *, domain_and_intent: bool = True) -> str:
    """The A.1 prompt with ``dialogue`` (from ``render_dialogue``) in place of ``#D1#``."""
    task = [_TASK_INTRO, "", _TASK_SUMMARY, _TASK_RELATION]
    if domain_and_intent:
        task += [_TASK_DOMAIN, _TASK_INTENT]
    task += [_TASK_SAT, _TASK_DSAT, _TASK_STATE]
    parts = [
        "## LABEL DEFINITION ##",
        _label_definitions(domain_and_intent=domain_and_intent),
        "",
        "## TASK ##",
        "\n".join(task),
        "",
        "## OUTPUT FORMAT ##",
        _OUTPUT_INTRO + " " + _output_format(domain_and_intent=domain_and_intent),
        "",
        LAST_TURN_ONLY.format(turn=turn_key(last_turn)),
        "",
        "## INPUT ##",
        dialogue,
        "",
        "## OUTPUT ##",
    ]
    return "\n".join(parts)
