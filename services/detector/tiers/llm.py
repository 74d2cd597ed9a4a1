"""The detector's LLM tier: an OpenAI-compatible chat model judges the turns others were unsure of.

Any endpoint that speaks the OpenAI chat completions API works: a vLLM server (``…/v1``) or a
hosted API. Each turn is one request (``temperature`` 0 by default), sent through the official
``openai`` client; a batch is spread over a small thread pool of ``concurrency`` workers, so
``judge`` stays a plain synchronous batch call and returns verdicts in input order.

Prompt
    The WildFeedback SAT/DSAT classification prompt (Shi et al., appendix A.1), reproduced in
    ``services.detector.prompts`` with the conversation filled in: up to ``history_messages``
    messages before the judged answer, the answer, and the judged user message, each cut to
    ``max_message_chars`` characters; older history is dropped first when the dialogue would
    exceed ``max_context_chars``. ``domain_and_intent=False`` leaves out the paper's extra domain
    and intent questions (~600 tokens) for judges with a small context window.

Output and validation
    The paper's JSON answer (a list with one ``{"T-n": {...}}`` entry for the judged turn). With
    ``structured_output`` the request carries ``response_format={"type": "json_schema", ...}``
    (vLLM enforces it by guided decoding); if the server rejects that (HTTP 400/422), the same
    request is sent again as plain prompting, and the tier stops asking for structured output.
    The reply is parsed leniently (``parse_answer``): the first JSON value in the text (code fences
    and prose around it are ignored), the judged turn's entry or a bare entry, rubric names matched
    ignoring case, spaces, hyphens and a plural ``s`` ("Negative Feedbacks" -> Negative_Feedback),
    ``N/A`` meaning none, a rubric listed under the wrong polarity moved to its own, and a comma
    separated string accepted for a list. The result is validated by the pydantic ``TurnAnswer``.

Retries and failures
    An unusable reply (no JSON, an unknown label, cut off at ``max_output_tokens``) is answered
    with a corrective message quoting the error, up to ``max_retries`` times. When retries run out,
    or the endpoint is unreachable, answers an error status, or ``timeout_s`` passes, the turn gets
    a NEUTRAL verdict with confidence 0.0 from tier ``llm``: the cascade treats confidence 0 as a
    failed judgement and keeps an earlier tier's verdict. ``timeout_s`` bounds one turn's whole
    judgement, retries included. ``judge`` never raises for a turn; only an unusable configuration
    raises, at construction (``LlmConfigError``). ``stats`` counts requests, retries and failures.

Category
    The prompt asks for rubrics and a dialogue state, not a Don-Yehiya category; ``category_of``
    derives it (the DSAT side decides for MIXED turns):

    - a DSAT rubric and state REFINEMENT -> ``rephrase``
    - Revision, Style or Factual_Error -> ``aware_with_correction``
    - Insufficient_Detail -> ``clarification``
    - Negative_Feedback, Ignored, Lower_Quality or Unrealistic_Expectation ->
      ``aware_without_correction``
    - only No_Engagement -> ``none``
    - SAT rubrics only -> ``positive``; no rubric -> ``none``

Confidence
    The prompt gives no probability, so confidence is fixed per outcome: ``CONFIDENCE_FIRST_TRY``
    (0.8) for an answer valid on the first request, ``CONFIDENCE_AFTER_RETRY`` (0.6) for one that
    needed a corrective retry, 0.0 for a failure. 0.8 is below GPT-4's reported SAT/DSAT accuracy
    in the paper (Table 6), since the judge may be a smaller model; calibrate per judge.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import openai
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from services.detector.judgement import Message, TurnContext, Verdict, failure
from services.detector.prompts import (
    CORRECTION,
    DOMAIN_LABELS,
    DSAT_PROMPT_DEFINITIONS,
    INTENT_LABELS,
    NA_LABEL,
    RELATION_LABELS,
    SAT_PROMPT_DEFINITIONS,
    STATE_LABELS,
    build_prompt,
    render_dialogue,
    turn_key,
)
from services.events.schemas import DsatRubric, FeedbackCategory, SatRubric

log = logging.getLogger(__name__)

TIER_NAME = "llm"
PROMPT_REVISION = "a1-1"  # change when the prompt or the parsing changes: labels are redone
CONFIDENCE_FIRST_TRY = 0.8
CONFIDENCE_AFTER_RETRY = 0.6
_CONNECT_TIMEOUT_S = 5.0
_MAX_ECHOED_CHARS = 1000  # of an invalid answer, quoted back in the corrective exchange
_SUMMARY_MAX_CHARS = 400


class LlmConfigError(ValueError):
    """The LLM tier cannot be built as configured (the message says what to fix)."""


class InvalidAnswerError(ValueError):
    """The judge's reply is not a usable answer; the message is sent back to it on retry."""


# --- answer validation ------------------------------------------------------------------------


def _key(name: str) -> str:
    return re.sub(r"[^a-z/]", "", name.lower())


_RUBRICS: dict[str, SatRubric | DsatRubric] = {
    _key(str(rubric)): rubric for rubric in (*SatRubric, *DsatRubric)
}
_RUBRICS[_key("Acknowledgement")] = SatRubric.ACKNOWLEDGMENT
_NONE_NAMES = frozenset({_key(NA_LABEL), "na", "none", "null", ""})


def rubric_named(name: str) -> SatRubric | DsatRubric | None:
    """The rubric a judge meant by ``name`` (``None`` for N/A); ``InvalidAnswerError`` if none.

    Case, spaces, underscores, hyphens and a trailing plural ``s`` do not matter.
    """
    key = _key(name)
    if key in _NONE_NAMES:
        return None
    found = _RUBRICS.get(key) or (_RUBRICS.get(key[:-1]) if key.endswith("s") else None)
    if found is None:
        raise InvalidAnswerError(f"{name!r} is not a valid satisfaction or dissatisfaction label")
    return found


def _names(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise InvalidAnswerError(f'"{field}" must be a list of label strings')


class TurnAnswer(BaseModel):
    """The judge's answer for one turn: the paper's entry, reduced to what a verdict needs."""

    model_config = ConfigDict(frozen=True)

    sat: frozenset[SatRubric] = frozenset()
    dsat: frozenset[DsatRubric] = frozenset()
    state: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_entry(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise InvalidAnswerError("the turn's entry must be a JSON object")
        fields = {str(k).strip().lower(): v for k, v in data.items()}
        if "satisfaction" not in fields and "dissatisfaction" not in fields:
            raise InvalidAnswerError('the entry has no "satisfaction" or "dissatisfaction" list')
        sat: set[SatRubric] = set()
        dsat: set[DsatRubric] = set()
        for field in ("satisfaction", "dissatisfaction"):
            for name in _names(fields.get(field), field):
                rubric = rubric_named(name)
                if isinstance(rubric, SatRubric):
                    sat.add(rubric)
                elif isinstance(rubric, DsatRubric):
                    dsat.add(rubric)
        state = fields.get("state")
        state = str(state).strip().upper() if state is not None else None
        return {"sat": sat, "dsat": dsat, "state": state if state in STATE_LABELS else None}


def _json_values(text: str) -> Iterator[Any]:
    """Every JSON array or object in ``text`` that starts outside an earlier one, in order."""
    decoder = json.JSONDecoder()
    position = 0
    for match in re.finditer(r"[\[{]", text):
        if match.start() < position:
            continue
        try:
            value, position = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        yield value


def _entry(value: Any, turn: str) -> Any:
    """The judged turn's entry from ``[{"T-n": {...}}]``, ``{"T-n": {...}}`` or a bare entry."""
    candidates = value if isinstance(value, list) else [value]
    dicts = [c for c in candidates if isinstance(c, dict)]
    for candidate in dicts:
        if turn in candidate:
            return candidate[turn]
    for candidate in reversed(dicts):  # keyed by another turn number: the last is the judged one
        keyed = [v for k, v in candidate.items() if str(k).upper().startswith("T-")]
        if keyed:
            return keyed[-1]
        if {str(k).strip().lower() for k in candidate} & {"satisfaction", "dissatisfaction"}:
            return candidate
    return None


def parse_answer(text: str, turn: str) -> TurnAnswer:
    """The judged turn's answer from the judge's reply text; ``InvalidAnswerError`` if unusable.

    The first JSON value in the text that holds an entry is used (so a stray ``[1]`` in prose
    before the answer does no harm).
    """
    found_json = False
    for value in _json_values(text):
        found_json = True
        entry = _entry(value, turn)
        if entry is None:
            continue
        try:
            return TurnAnswer.model_validate(entry)
        except ValidationError as err:
            first = err.errors()[0]
            cause = first.get("ctx", {}).get("error")
            raise InvalidAnswerError(str(cause) if cause else first["msg"]) from None
    if not found_json:
        raise InvalidAnswerError("the answer contains no JSON output list")
    raise InvalidAnswerError(f'the answer has no entry for the turn "{turn}"')


# --- verdicts -----------------------------------------------------------------------------------

_WITH_CORRECTION = frozenset({DsatRubric.REVISION, DsatRubric.STYLE, DsatRubric.FACTUAL_ERROR})
_WITHOUT_CORRECTION = frozenset(
    {
        DsatRubric.NEGATIVE_FEEDBACK,
        DsatRubric.IGNORED,
        DsatRubric.LOWER_QUALITY,
        DsatRubric.UNREALISTIC_EXPECTATION,
    }
)


def category_of(
    sat: frozenset[SatRubric], dsat: frozenset[DsatRubric], state: str | None = None
) -> FeedbackCategory:
    """The Don-Yehiya category implied by the rubrics and the dialogue state (module docstring)."""
    if dsat:
        if state == "REFINEMENT":
            return FeedbackCategory.REPHRASE
        if dsat & _WITH_CORRECTION:
            return FeedbackCategory.AWARE_WITH_CORRECTION
        if DsatRubric.INSUFFICIENT_DETAIL in dsat:
            return FeedbackCategory.CLARIFICATION
        if dsat & _WITHOUT_CORRECTION:
            return FeedbackCategory.AWARE_WITHOUT_CORRECTION
        return FeedbackCategory.NONE  # No_Engagement alone
    return FeedbackCategory.POSITIVE if sat else FeedbackCategory.NONE


def verdict_of(answer: TurnAnswer, confidence: float) -> Verdict:
    return Verdict(
        sat=answer.sat,
        dsat=answer.dsat,
        category=category_of(answer.sat, answer.dsat, answer.state),
        confidence=confidence,
        tier=TIER_NAME,
    )


# --- the JSON schema of the answer --------------------------------------------------------------


def _labels_schema(labels: list[str]) -> dict[str, Any]:
    """``["N/A"]`` alone, or rubric labels: a small judge otherwise repeats "N/A" to the limit."""
    return {
        "anyOf": [
            {"type": "array", "items": {"type": "string", "enum": [NA_LABEL]}, "maxItems": 1},
            {"type": "array", "items": {"type": "string", "enum": labels}, "maxItems": len(labels)},
        ]
    }


def answer_schema(turn: str, *, domain_and_intent: bool = True) -> dict[str, Any]:
    """JSON schema of the paper's output list holding the one entry for ``turn``."""
    properties: dict[str, Any] = {
        "summary": {"type": "string", "maxLength": _SUMMARY_MAX_CHARS},
        "preceding_topical_relation": {"type": "string", "enum": list(RELATION_LABELS)},
    }
    if domain_and_intent:
        properties["domain"] = {"type": "string", "enum": list(DOMAIN_LABELS)}
        properties["intent"] = {"type": "string", "enum": list(INTENT_LABELS)}
    properties["satisfaction"] = _labels_schema([str(r) for r in SAT_PROMPT_DEFINITIONS])
    properties["dissatisfaction"] = _labels_schema([str(r) for r in DSAT_PROMPT_DEFINITIONS])
    properties["state"] = {"type": "string", "enum": list(STATE_LABELS)}
    entry = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": 1,
        "items": {
            "type": "object",
            "properties": {turn: entry},
            "required": [turn],
            "additionalProperties": False,
        },
    }


# --- the tier -----------------------------------------------------------------------------------


@dataclass(slots=True)
class LlmStats:
    """What the tier did since it was built (read it for metrics; updated under a lock)."""

    turns: int = 0
    requests: int = 0
    retries: int = 0  # corrective requests after an invalid answer
    failures: int = 0  # turns answered with the NEUTRAL/0.0 failure verdict
    structured_fallbacks: int = 0  # requests re-sent without response_format


class _UnavailableError(Exception):
    """The endpoint did not answer usably (down, timed out, error status): no retry helps."""


class LlmTier:
    """Tier 3: the WildFeedback A.1 prompt sent to an OpenAI-compatible chat endpoint.

    ``base_url`` is the endpoint's OpenAI base URL (``http://host:8000/v1``), ``model`` the
    judge's (served) name, ``api_key`` its key if it needs one. See the module docstring for
    what the other options do. Builds no connection: the first ``judge`` connects.
    """

    name = TIER_NAME

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        concurrency: int = 4,
        structured_output: bool = True,
        temperature: float = 0.0,
        history_messages: int = 4,
        max_message_chars: int = 2000,
        max_context_chars: int = 8000,
        max_output_tokens: int = 400,
        domain_and_intent: bool = True,
    ) -> None:
        problems = []
        url = urlsplit(base_url or "")
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(f"base_url {base_url!r} is not an http(s) URL such as http://host/v1")
        if not model or not model.strip():
            problems.append("model is empty")
        if timeout_s <= 0:
            problems.append(f"timeout_s must be positive, not {timeout_s}")
        if max_retries < 0:
            problems.append(f"max_retries must be 0 or more, not {max_retries}")
        if concurrency < 1:
            problems.append(f"concurrency must be 1 or more, not {concurrency}")
        if not 0.0 <= temperature <= 2.0:
            problems.append(f"temperature must be within [0, 2], not {temperature}")
        if history_messages < 0 or max_message_chars < 1 or max_context_chars < 1:
            problems.append("history_messages, max_message_chars, max_context_chars: too small")
        if max_output_tokens < 16:
            problems.append(f"max_output_tokens {max_output_tokens} leaves no room for the JSON")
        if problems:
            raise LlmConfigError("LLM tier misconfigured: " + "; ".join(problems))
        self.base_url = base_url
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.structured_output = structured_output
        self.temperature = temperature
        self.history_messages = history_messages
        self.max_message_chars = max_message_chars
        self.max_context_chars = max_context_chars
        self.max_output_tokens = max_output_tokens
        self.domain_and_intent = domain_and_intent
        self.version = f"{PROMPT_REVISION}{'' if domain_and_intent else '-sat'}:{model}"
        self.stats = LlmStats()
        self._lock = threading.Lock()
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or "EMPTY",  # vLLM ignores the key unless started with --api-key
            timeout=openai.Timeout(timeout_s, connect=min(timeout_s, _CONNECT_TIMEOUT_S)),
            max_retries=0,  # this tier decides: an outage fails the turn at once
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LlmTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the Tier protocol ----------------------------------------------------------------------

    def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        """One verdict per context, in order; a turn that could not be judged gets NEUTRAL/0.0."""
        if not contexts:
            return []
        workers = min(self.concurrency, len(contexts))
        with ThreadPoolExecutor(workers, thread_name_prefix="llm-tier") as pool:
            verdicts = list(pool.map(self._judge_one, contexts))
        failed = sum(1 for v in verdicts if v.confidence <= 0.0)
        if failed:
            log.warning(
                "llm tier: %d of %d turns could not be judged by %s at %s",
                failed,
                len(verdicts),
                self.model,
                self.base_url,
            )
        return verdicts

    # --- one turn -------------------------------------------------------------------------------

    def prompt_for(self, context: TurnContext) -> tuple[str, str]:
        """The prompt for ``context`` and the key (``T-n``) of the turn its answer must hold."""
        history = list(context.history[-self.history_messages :] if self.history_messages else [])
        history = [Message(m.role, self._cut(m.content)) for m in history if m.role != "system"]
        answer = (
            None if context.previous_assistant is None else self._cut(context.previous_assistant)
        )
        user = self._cut(context.user)
        while history and self._chars(history, answer, user) > self.max_context_chars:
            history.pop(0)  # the oldest message goes first
        dialogue, last = render_dialogue(history, answer, user)
        prompt = build_prompt(dialogue, last, domain_and_intent=self.domain_and_intent)
        return prompt, turn_key(last)

    def _cut(self, text: str) -> str:
        text = text.replace("\x00", "")
        if len(text) <= self.max_message_chars:
            return text
        return text[: self.max_message_chars - 1] + "…"

    @staticmethod
    def _chars(history: Sequence[Message], answer: str | None, user: str) -> int:
        return sum(len(m.content) for m in history) + len(answer or "") + len(user)

    def _judge_one(self, context: TurnContext) -> Verdict:
        self._count(turns=1)
        try:
            return self._attempts(context)
        except _UnavailableError as err:
            log.info("llm tier: %s turn %d: %s", context.conversation_id, context.turn, err)
        except Exception:  # never let one turn break the batch
            log.exception("llm tier: %s turn %d failed", context.conversation_id, context.turn)
        self._count(failures=1)
        return failure(TIER_NAME)

    def _attempts(self, context: TurnContext) -> Verdict:
        deadline = time.monotonic() + self.timeout_s
        prompt, turn = self.prompt_for(context)
        messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
        error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
            text, finish = self._complete(messages, turn, deadline)
            try:
                if finish == "length":
                    raise InvalidAnswerError(
                        f"the answer was cut off after {self.max_output_tokens} tokens"
                    )
                answer = parse_answer(text, turn)
            except InvalidAnswerError as err:
                error = str(err)
                log.debug("llm tier: invalid answer for %s: %s", turn, error)
                messages += [
                    {"role": "assistant", "content": text[:_MAX_ECHOED_CHARS]},
                    {"role": "user", "content": CORRECTION.format(error=error, turn=turn)},
                ]
                continue
            confidence = CONFIDENCE_FIRST_TRY if attempt == 0 else CONFIDENCE_AFTER_RETRY
            return verdict_of(answer, confidence)
        raise _UnavailableError(f"no valid answer after {self.max_retries + 1} requests: {error}")

    def _complete(
        self, messages: list[dict[str, str]], turn: str, deadline: float
    ) -> tuple[str, str | None]:
        """The reply text and finish reason; ``_UnavailableError`` on transport or status errors."""
        structured = self.structured_output
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _UnavailableError(f"timed out after {self.timeout_s:g} s")
            params: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_output_tokens,
                "timeout": openai.Timeout(remaining, connect=min(remaining, _CONNECT_TIMEOUT_S)),
            }
            if structured:
                params["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "wildfeedback_turn",
                        "schema": answer_schema(turn, domain_and_intent=self.domain_and_intent),
                    },
                }
            self._count(requests=1)
            try:
                response = self._client.chat.completions.create(**params)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
                if not structured:
                    raise _UnavailableError(f"rejected: {err}") from err
                # Perhaps no structured output here: ask plainly; if that works, stop asking.
                log.info("llm tier: structured output rejected (%s); retrying plainly", err)
                self._count(structured_fallbacks=1)
                structured = False
                continue
            except openai.APITimeoutError as err:
                raise _UnavailableError(f"timed out after {self.timeout_s:g} s") from err
            except openai.APIError as err:
                raise _UnavailableError(f"{type(err).__name__}: {err}") from err
            if structured != self.structured_output:
                log.warning("llm tier: %s rejects structured output; prompting plainly", self.model)
                self.structured_output = False
            if not response.choices:
                raise _UnavailableError("the response has no choices")
            choice = response.choices[0]
            return choice.message.content or "", choice.finish_reason

    def _count(self, **increments: int) -> None:
        with self._lock:
            for field, n in increments.items():
                setattr(self.stats, field, getattr(self.stats, field) + n)
