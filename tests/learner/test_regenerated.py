"""Regenerated chosen responses (WildFeedback 3.2): a generator answers with the user's
preferences as system prompt, and a checklist judge keeps the answer only when it beats the
rejected one. Judging itself (A.3) is specified here too: choices, both orders, failures."""

from __future__ import annotations

import pytest

from learner.builder import Builder, Regenerator
from services.chat import ChatEndpoint, ChatError
from services.judging import ChecklistJudge, InvalidJudgementError, parse_choice
from services.settings import LearnerSettings, WildloopSettings
from tests.learner.corpus import LABELS, REVISION, UNRESOLVED, labelled
from tests.support.net import free_port
from tests.support.vllm_server import VllmServer

BASE_MODEL = WildloopSettings.model_fields["base_model"].default


def test_a_choice_is_read_from_the_judge_s_json_wherever_it_stands() -> None:
    assert parse_choice('{"analysis of A": "x", "choice": "A+"}') == "A+"
    assert parse_choice('Sure.\n```json\n{"choice": "[B++]"}\n```') == "B++"
    assert parse_choice('{"analysis": {"nested": 1}} then {"choice": "A=B"}') == "A=B"
    with pytest.raises(InvalidJudgementError):
        parse_choice('{"choice": "A+++"}')
    with pytest.raises(InvalidJudgementError):
        parse_choice("A is better")


def test_an_unreachable_judge_is_a_failed_comparison_not_an_exception() -> None:
    endpoint = ChatEndpoint(
        f"http://127.0.0.1:{free_port()}/v1", "judge", timeout_s=2, max_retries=0
    )
    comparison = ChecklistJudge(endpoint).compare([], "q", "a", "b", ["be right"])
    assert comparison.failed and comparison.outcome == "failed"
    assert not comparison.candidate_wins
    with pytest.raises(ChatError):
        endpoint.complete([{"role": "user", "content": "hi"}], max_tokens=4)


@pytest.mark.slow
def test_regenerated_responses_are_judged_and_only_winners_become_pairs(
    vllm_server: VllmServer,
) -> None:
    endpoint = ChatEndpoint(vllm_server.base_url, BASE_MODEL, timeout_s=180)
    judge = ChecklistJudge(endpoint, max_output_tokens=400, max_reason_chars=120)
    regenerator = Regenerator(endpoint, judge, max_tokens=48)
    builder = Builder(LearnerSettings(strategy="regenerated"), regenerator=regenerator)

    built = builder.build([labelled(REVISION, LABELS), labelled(UNRESOLVED, LABELS)])

    # Both DSAT turns were regenerated and judged; SmolLM2 under guided decoding always
    # answers a valid choice, so none failed.
    assert sum(built.judged.values()) == 2
    assert built.judged["failed"] == 0
    assert len(built.pairs) == built.judged["win"]
    assert built.drops["regenerated_loss"] + built.drops["regenerated_tie"] == (
        2 - built.judged["win"]
    )
    for pair in built.pairs:
        assert pair.strategy == "regenerated"
        # The preferences steer generation but are not part of the learned prompt.
        assert all(m.role != "system" for m in pair.prompt)
        assert pair.chosen[0].content != pair.rejected[0].content
        assert pair.checklist[-1] == "The response should be safe."
