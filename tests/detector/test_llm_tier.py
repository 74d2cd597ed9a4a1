"""The LLM tier (tier 3): the WildFeedback A.1 prompt sent to an OpenAI-compatible endpoint.

Two kinds of server, both real HTTP on 127.0.0.1, no mocks of the client or the model:

- the session's real vLLM CPU server (``vllm_server``, SmolLM2-135M-Instruct), for what a real
  judge does with the prompt and the JSON schema. SmolLM2 cannot judge feedback well, so these
  tests check the mechanism (every verdict parses, comes from tier ``llm``), not the labels;
- ``ScriptedServer``, a tiny server speaking the chat completions API that answers from a script.
  It stands in for a judge only where a real model cannot be made to misbehave on cue: invalid
  then valid JSON, a rejected ``response_format``, an error status, a slow answer, answers
  finishing out of order.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.detector.judgement import Message, Tier, TurnContext, Verdict
from services.detector.prompts import (
    DSAT_PROMPT_DEFINITIONS,
    SAT_PROMPT_DEFINITIONS,
    STATE_LABELS,
)
from services.detector.rubrics import DSAT_DEFINITIONS, SAT_DEFINITIONS
from services.detector.tiers.llm import (
    CONFIDENCE_AFTER_RETRY,
    CONFIDENCE_FIRST_TRY,
    InvalidAnswerError,
    LlmConfigError,
    LlmTier,
    category_of,
    parse_answer,
)
from services.events.schemas import DsatRubric, FeedbackCategory, Polarity, SatRubric
from tests.support.net import free_port
from tests.support.vllm_server import VllmServer

BASE_MODEL = "SmolLM2-135M-Instruct"


# --- a scripted OpenAI-compatible server ---------------------------------------------------------


@dataclass
class Reply:
    content: str = ""
    status: int = 200
    delay_s: float = 0.0
    finish_reason: str = "stop"


class ScriptedServer:
    """``POST /v1/chat/completions`` answered by ``script(request_body) -> Reply``.

    Records every request body and the most requests it had in flight at once.
    """

    def __init__(self, script: Callable[[dict[str, Any]], Reply]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = server.script(body)
                    time.sleep(reply.delay_s)
                    self._send(reply, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, reply: Reply, body: dict[str, Any]) -> None:
                if reply.status == 200:
                    payload: dict[str, Any] = {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", ""),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply.content},
                                "finish_reason": reply.finish_reason,
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                else:
                    payload = {"error": {"message": reply.content or "error", "type": "test"}}
                data = json.dumps(payload).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()


def answer(turn: str, sat: list[str] | None = None, dsat: list[str] | None = None) -> str:
    """A reply in the paper's output format."""
    entry = {
        "summary": "The user reacts.",
        "preceding_topical_relation": "YES",
        "satisfaction": sat or ["N/A"],
        "dissatisfaction": dsat or ["N/A"],
        "state": "FEEDBACK",
    }
    return json.dumps([{turn: entry}])


def last_prompt(body: dict[str, Any]) -> str:
    return str(body["messages"][0]["content"])


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[dict[str, Any]], Reply]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Callable[[dict[str, Any]], Reply]) -> ScriptedServer:
        server = ScriptedServer(script).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__()


def tier_for(base_url: str, **options: Any) -> LlmTier:
    options = {"model": "judge", "timeout_s": 10.0, "max_retries": 2, **options}
    return LlmTier(base_url=base_url, **options)


def ctx(
    user: str, answer_text: str | None = "Paris is the capital of France.", **kw: Any
) -> TurnContext:
    history = kw.pop("history", (Message("user", "What is the capital of France?"),))
    return TurnContext("c-1", kw.pop("turn", 2), user, answer_text, history, **kw)


FAILED = Verdict(confidence=0.0, tier="llm", failed=True)


# --- the prompt ----------------------------------------------------------------------------------


def test_the_request_carries_the_a1_prompt_with_every_rubric_and_the_conversation(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(lambda body: Reply(answer("T-3", sat=["Gratitude"])))
    history = (
        Message("user", "What is the capital of France?"),
        Message("assistant", "Paris."),
        Message("user", "And its population?"),
    )
    context = ctx("Thank you, very helpful!", "About 2.1 million people.", history=history)
    with tier_for(server.base_url) as tier:
        [verdict] = tier.judge([context])

    assert verdict == Verdict(
        frozenset({SatRubric.GRATITUDE}),
        frozenset(),
        FeedbackCategory.POSITIVE,
        CONFIDENCE_FIRST_TRY,
        "llm",
    )
    [body] = server.requests
    prompt = last_prompt(body)
    assert body["model"] == "judge"
    assert body["temperature"] == 0
    for rubric, definition in (*SAT_PROMPT_DEFINITIONS.items(), *DSAT_PROMPT_DEFINITIONS.items()):
        assert f'"label": "{rubric}"' in prompt
        assert definition in prompt
    assert all(state in prompt for state in STATE_LABELS)
    assert "## TASK ##" in prompt and "## OUTPUT FORMAT ##" in prompt
    for text in ("What is the capital of France?", "Paris.", "And its population?"):
        assert text in prompt
    # the judged turn is the last one, T-3, and it has no agent answer yet
    assert prompt.index('"T-3"') > prompt.index("About 2.1 million people.")
    assert prompt.rstrip().endswith("## OUTPUT ##")
    assert body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["items"]["required"] == ["T-3"]


def test_the_prompt_definitions_are_the_papers_tables_except_two_reworded_in_a1() -> None:
    for rubric, table in (*SAT_DEFINITIONS.items(), *DSAT_DEFINITIONS.items()):
        prompt = {**SAT_PROMPT_DEFINITIONS, **DSAT_PROMPT_DEFINITIONS}[rubric]  # type: ignore[index]
        if rubric is DsatRubric.STYLE:
            assert prompt.startswith("The user feels that there is a mismatch")
        else:
            assert prompt.startswith(table.removesuffix("."))


def test_history_is_cut_to_the_window_and_huge_or_odd_text_to_the_message_limit(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(lambda body: Reply(answer("T-2")))
    history = tuple(
        Message("user" if i % 2 == 0 else "assistant", f"old message {i}") for i in range(10)
    )
    huge = "\x00a" * 500_000
    with tier_for(server.base_url, history_messages=2, max_message_chars=300) as tier:
        [verdict] = tier.judge([ctx(huge, "x" * 100_000, history=history)])

    assert verdict.confidence == CONFIDENCE_FIRST_TRY
    prompt = last_prompt(server.requests[0])
    assert "old message 8" in prompt and "old message 9" in prompt
    assert "old message 7" not in prompt
    assert "\x00" not in prompt and "\\u0000" not in prompt
    assert len(prompt) < 12_000


# --- validation and retries ----------------------------------------------------------------------


def test_an_invalid_answer_is_retried_with_a_correction(
    scripted: Callable[..., ScriptedServer],
) -> None:
    replies = iter(
        [
            Reply("I think the user is not happy with the answer."),
            Reply("Here it is:\n```json\n" + answer("T-2", dsat=["Negative Feedbacks"]) + "\n```"),
        ]
    )
    server = scripted(lambda body: next(replies))
    with tier_for(server.base_url, structured_output=False) as tier:
        [verdict] = tier.judge([ctx("This is useless.")])

    assert verdict.dsat == {DsatRubric.NEGATIVE_FEEDBACK}
    assert verdict.polarity is Polarity.DSAT
    assert verdict.category is FeedbackCategory.AWARE_WITHOUT_CORRECTION
    assert verdict.confidence == CONFIDENCE_AFTER_RETRY
    assert len(server.requests) == 2
    retry = server.requests[1]["messages"]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == "I think the user is not happy with the answer."
    assert "no JSON" in retry[2]["content"] and "T-2" in retry[2]["content"]
    assert "response_format" not in server.requests[0]
    assert tier.stats.retries == 1 and tier.stats.failures == 0


def test_when_retries_run_out_the_turn_gets_a_failed_neutral_verdict(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(lambda body: Reply(answer("T-2", sat=["Happiness"])))
    with tier_for(server.base_url, max_retries=2) as tier:
        verdicts = tier.judge([ctx("Great!")])

    assert verdicts == [FAILED]
    assert verdicts[0].polarity is Polarity.NEUTRAL
    assert len(server.requests) == 3
    assert "'Happiness' is not a valid" in server.requests[-1]["messages"][-1]["content"]
    assert tier.stats.failures == 1


def test_an_answer_cut_off_at_the_token_limit_is_retried(
    scripted: Callable[..., ScriptedServer],
) -> None:
    replies = iter([Reply('[{"T-2": {"summ', finish_reason="length"), Reply(answer("T-2"))])
    server = scripted(lambda body: next(replies))
    with tier_for(server.base_url) as tier:
        [verdict] = tier.judge([ctx("ok")])
    assert verdict.confidence == CONFIDENCE_AFTER_RETRY
    assert "cut off" in server.requests[1]["messages"][-1]["content"]


def test_a_rejected_response_format_falls_back_to_plain_prompting_for_good(
    scripted: Callable[..., ScriptedServer],
) -> None:
    def script(body: dict[str, Any]) -> Reply:
        if "response_format" in body:
            return Reply("response_format json_schema is not supported", status=400)
        return Reply(answer("T-2", dsat=["Revision"]))

    server = scripted(script)
    with tier_for(server.base_url, structured_output=True) as tier:
        [first] = tier.judge([ctx("Please rewrite it.")])
        [second] = tier.judge([ctx("Rewrite it again.")])

    assert first.dsat == second.dsat == {DsatRubric.REVISION}
    assert first.confidence == CONFIDENCE_FIRST_TRY  # the fallback is not a retry
    assert ["response_format" in body for body in server.requests] == [True, False, False]
    assert tier.structured_output is False
    assert tier.stats.structured_fallbacks == 1


# --- failures of the endpoint --------------------------------------------------------------------


def test_an_endpoint_that_is_down_fails_every_turn_quickly_without_raising() -> None:
    contexts = [ctx(f"message {i}") for i in range(8)]
    with tier_for(f"http://127.0.0.1:{free_port()}/v1", concurrency=4) as tier:
        started = time.monotonic()
        verdicts = tier.judge(contexts)
        took = time.monotonic() - started

    assert verdicts == [FAILED] * 8
    assert took < 3.0
    assert tier.stats.failures == 8


def test_an_error_status_fails_the_turn_without_retrying(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(lambda body: Reply("overloaded", status=503))
    with tier_for(server.base_url) as tier:
        assert tier.judge([ctx("hello")]) == [FAILED]
    assert len(server.requests) == 1


def test_the_timeout_bounds_a_turns_whole_judgement(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(lambda body: Reply(answer("T-2"), delay_s=5.0))
    with tier_for(server.base_url, timeout_s=0.5) as tier:
        started = time.monotonic()
        verdicts = tier.judge([ctx("hello"), ctx("again")])
        took = time.monotonic() - started

    assert verdicts == [FAILED, FAILED]
    assert took < 2.0


def test_verdicts_keep_the_input_order_when_answers_finish_out_of_order(
    scripted: Callable[..., ScriptedServer],
) -> None:
    labels = ["Gratitude", "Revision", "Praise", "Style", "N/A", "Factual_Error"] * 2

    def script(body: dict[str, Any]) -> Reply:
        prompt = last_prompt(body)
        i = int(prompt.rsplit("message number ", 1)[1].split('"', 1)[0])
        label = labels[i]
        sat = [label] if label in {"Gratitude", "Praise"} else None
        dsat = [label] if sat is None else None
        return Reply(answer("T-2", sat=sat, dsat=dsat), delay_s=0.05 * (len(labels) - i) % 0.3)

    server = scripted(script)
    contexts = [ctx(f"message number {i}") for i in range(len(labels))]
    with tier_for(server.base_url, concurrency=4) as tier:
        verdicts = tier.judge(contexts)

    got = [next(iter(v.sat | v.dsat), "N/A") for v in verdicts]
    assert got == labels
    assert 2 <= server.max_in_flight <= 4


# --- parsing, categories, configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sat", "dsat"),
    [
        (answer("T-2", sat=["Gratitude", "Praise"]), {"Gratitude", "Praise"}, set()),
        (
            '```json\n[{"T-2": {"satisfaction": ["N/A"], "dissatisfaction": ["style"]}}]\n```',
            set(),
            {"Style"},
        ),
        (
            'Answer: {"T-2": {"satisfaction": [], "dissatisfaction": ["Negative Feedbacks"]}} done',
            set(),
            {"Negative_Feedback"},
        ),
        (
            '{"satisfaction": "getting there, acknowledgement", "dissatisfaction": "N/A"}',
            {"Getting_There", "Acknowledgment"},
            set(),
        ),
        (
            '[{"T-1": {"satisfaction": ["N/A"], "dissatisfaction": ["N/A"]}},'
            ' {"T-7": {"Satisfaction": ["GRATITUDE"], "Dissatisfaction": ["Revision"]}}]',
            {"Gratitude"},
            {"Revision"},
        ),
        (
            '{"satisfaction": ["Insufficient_Detail"], "dissatisfaction": []}',
            set(),
            {"Insufficient_Detail"},
        ),
        ("text {not json} then " + answer("T-2", dsat=["factual-error"]), set(), {"Factual_Error"}),
        ("As in [1], " + answer("T-2", dsat=["Ignored"]), set(), {"Ignored"}),
    ],
)
def test_answers_are_parsed_leniently(text: str, sat: set[str], dsat: set[str]) -> None:
    parsed = parse_answer(text, "T-2")
    assert {str(r) for r in parsed.sat} == sat
    assert {str(r) for r in parsed.dsat} == dsat


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("The user is satisfied.", "no JSON"),
        ('[{"T-2": {"summary": "x"}}]', 'no "satisfaction"'),
        ('{"satisfaction": ["Joy"]}', "'Joy' is not a valid"),
        ('{"satisfaction": [1, 2]}', "list of label strings"),
        ("[1, 2, 3]", "no entry"),
    ],
)
def test_unusable_answers_are_rejected_with_a_reason(text: str, error: str) -> None:
    with pytest.raises(InvalidAnswerError, match=error):
        parse_answer(text, "T-2")


@pytest.mark.parametrize(
    ("sat", "dsat", "state", "category"),
    [
        ({SatRubric.GRATITUDE}, set(), "FEEDBACK", FeedbackCategory.POSITIVE),
        (set(), set(), "CONTINUATION", FeedbackCategory.NONE),
        (set(), {DsatRubric.REVISION}, "REFINEMENT", FeedbackCategory.REPHRASE),
        (
            set(),
            {DsatRubric.STYLE, DsatRubric.NEGATIVE_FEEDBACK},
            "FEEDBACK",
            FeedbackCategory.AWARE_WITH_CORRECTION,
        ),
        (
            {SatRubric.GETTING_THERE},
            {DsatRubric.FACTUAL_ERROR},
            None,
            FeedbackCategory.AWARE_WITH_CORRECTION,
        ),
        (set(), {DsatRubric.INSUFFICIENT_DETAIL}, "FEEDBACK", FeedbackCategory.CLARIFICATION),
        (set(), {DsatRubric.IGNORED}, "FEEDBACK", FeedbackCategory.AWARE_WITHOUT_CORRECTION),
        (set(), {DsatRubric.NO_ENGAGEMENT}, "NEWTOPIC", FeedbackCategory.NONE),
    ],
)
def test_the_category_is_derived_from_the_rubrics(
    sat: set[SatRubric], dsat: set[DsatRubric], state: str | None, category: FeedbackCategory
) -> None:
    assert category_of(frozenset(sat), frozenset(dsat), state) is category


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"base_url": "localhost:8000"}, "not an http"),
        ({"model": " "}, "model is empty"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_retries": -1}, "max_retries"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_a_misconfigured_tier_fails_at_construction(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(LlmConfigError, match=problem):
        LlmTier(**{"base_url": "http://127.0.0.1:1/v1", "model": "judge", **options})


def test_it_is_a_tier_and_an_empty_batch_needs_no_endpoint() -> None:
    with LlmTier(base_url="http://127.0.0.1:1/v1", model="judge") as tier:
        assert isinstance(tier, Tier)
        assert tier.name == "llm"
        assert tier.judge([]) == []


# --- a real judge: SmolLM2 on vLLM ----------------------------------------------------------------


REAL_TURNS = [
    ctx("Thanks, that is exactly what I needed!"),
    ctx("That's wrong, Lyon is not the capital. Fix it.", "The capital of France is Lyon."),
    ctx(
        "Can you make it much shorter, as bullet points?",
        "Photosynthesis is ... " * 20,
        history=(Message("user", "Explain photosynthesis."),),
    ),
    ctx(
        "Now tell me about the moon.",
        "Mars is the fourth planet from the sun.",
        history=(Message("user", "Tell me about Mars."),),
    ),
]


@pytest.mark.slow
def test_every_verdict_of_a_real_judge_with_structured_output_parses(
    vllm_server: VllmServer,
) -> None:
    # SmolLM2 is served with a 2k context: the prompt without the domain/intent lists fits.
    tier = LlmTier(
        base_url=vllm_server.base_url,
        model=BASE_MODEL,
        timeout_s=90,
        concurrency=4,
        domain_and_intent=False,
        max_output_tokens=256,
    )
    with tier:
        verdicts = tier.judge(REAL_TURNS)

    for context, verdict in zip(REAL_TURNS, verdicts, strict=True):
        print(f"{context.user!r} -> {verdict}")
    assert len(verdicts) == len(REAL_TURNS)
    assert all(v.tier == "llm" for v in verdicts)
    assert all(v.confidence in (CONFIDENCE_FIRST_TRY, CONFIDENCE_AFTER_RETRY) for v in verdicts)
    assert tier.stats.failures == 0
    assert tier.stats.structured_fallbacks == 0
    assert tier.structured_output is True


@pytest.mark.slow
def test_a_prompt_too_long_for_the_real_judge_fails_softly(vllm_server: VllmServer) -> None:
    # The full A.1 prompt (domain and intent lists included) is ~2.5k tokens: over SmolLM2's 2k.
    with LlmTier(base_url=vllm_server.base_url, model=BASE_MODEL, timeout_s=30) as tier:
        started = time.monotonic()
        verdicts = tier.judge([ctx("Thanks!")])
        took = time.monotonic() - started
    assert verdicts == [FAILED]
    assert took < 10
