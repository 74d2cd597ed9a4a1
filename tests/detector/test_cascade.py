"""The cascade: cheap tiers decide what they are sure of, later tiers see only the rest.

The tiers here are tiny scripted tiers (the ``Tier`` protocol is two members): the cascade's
routing is pure logic, and scripting the confidences pins it down exactly. The real tiers are
covered in their own modules and, chained, by ``test_detect_cli.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from services.detector.cascade import Cascade, CascadeMetrics, Stage
from services.detector.factory import build_cascade
from services.detector.judgement import TurnContext, Verdict, failure, judge_guarded
from services.events.schemas import DsatRubric, Polarity, SatRubric
from services.metrics import Metrics
from services.settings import DetectorSettings


class Scripted:
    """Answers every turn whose text is in ``answers`` with that verdict, else NEUTRAL at
    ``default`` confidence; records what it was asked."""

    def __init__(
        self,
        name: str,
        answers: dict[str, Verdict],
        *,
        default: float = 0.1,
        version: str = "1",
    ) -> None:
        self.name = name
        self.version = version
        self.answers = answers
        self.default = default
        self.seen: list[str] = []

    def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        self.seen += [c.user for c in contexts]
        return [
            self.answers.get(c.user, Verdict(confidence=self.default, tier=self.name))
            for c in contexts
        ]


def turn(text: str, i: int = 1) -> TurnContext:
    return TurnContext("c", i, text, previous_assistant="an answer")


THANKS = Verdict(sat=frozenset({SatRubric.GRATITUDE}), confidence=0.95, tier="rules")
WRONG = Verdict(dsat=frozenset({DsatRubric.FACTUAL_ERROR}), confidence=0.9, tier="classifier")


def test_a_confident_early_verdict_stands_and_later_tiers_never_see_the_turn() -> None:
    rules = Scripted("rules", {"thanks!": THANKS})
    classifier = Scripted("classifier", {"no, it is wrong": WRONG}, default=0.7)
    cascade = Cascade([Stage(rules, 0.85), Stage(classifier, 0.6)])

    verdicts = cascade.judge([turn("thanks!"), turn("no, it is wrong"), turn("ok and then?")])

    assert [v.polarity for v in verdicts] == [Polarity.SAT, Polarity.DSAT, Polarity.NEUTRAL]
    assert [v.tier for v in verdicts] == ["rules", "classifier", "classifier"]
    assert classifier.seen == ["no, it is wrong", "ok and then?"]


def test_the_last_tier_decides_even_when_unsure() -> None:
    rules = Scripted("rules", {}, default=0.3)
    classifier = Scripted("classifier", {}, default=0.4)
    cascade = Cascade([Stage(rules, 0.85), Stage(classifier, 0.6)])

    (verdict,) = cascade.judge([turn("hmm")])

    assert verdict.tier == "classifier" and verdict.confidence == 0.4


def test_a_failed_last_tier_falls_back_to_the_most_confident_earlier_verdict() -> None:
    hedged = Verdict(dsat=frozenset({DsatRubric.STYLE}), confidence=0.55, tier="classifier")
    rules = Scripted("rules", {}, default=0.3)
    classifier = Scripted("classifier", {"shorter please": hedged})
    llm_down = Scripted("llm", {"shorter please": failure("llm")})  # the endpoint is down
    cascade = Cascade([Stage(rules, 0.85), Stage(classifier, 0.6), Stage(llm_down, 0.0)])

    (verdict,) = cascade.judge([turn("shorter please")])

    assert verdict == hedged


def test_order_and_count_are_kept_for_a_large_mixed_batch() -> None:
    rules = Scripted("rules", {"thanks!": THANKS})
    classifier = Scripted("classifier", {"no, it is wrong": WRONG}, default=0.7)
    cascade = Cascade([Stage(rules, 0.85), Stage(classifier, 0.6)])
    texts = ["thanks!", "no, it is wrong", "next"] * 100

    verdicts = cascade.judge([turn(t, i) for i, t in enumerate(texts)])

    assert [v.tier for v in verdicts] == ["rules", "classifier", "classifier"] * 100
    assert cascade.judge([]) == []


def test_the_version_changes_with_tiers_their_versions_and_thresholds() -> None:
    def version(*stages: tuple[str, str, float]) -> str:
        return Cascade(
            [Stage(Scripted(name, {}, version=v), threshold) for name, v, threshold in stages]
        ).version

    base = version(("rules", "1", 0.85), ("classifier", "a", 0.6))
    assert base.startswith("rules+classifier-")
    assert base == version(("rules", "1", 0.85), ("classifier", "a", 0.6))
    assert base != version(("rules", "1", 0.8), ("classifier", "a", 0.6))
    assert base != version(("rules", "1", 0.85), ("classifier", "b", 0.6))
    assert base != version(("rules", "1", 0.85))
    assert len(base) <= 64  # fits the store's detector_version column


def test_decisions_and_tier_latency_are_counted() -> None:
    metrics = Metrics("detector")
    rules = Scripted("rules", {"thanks!": THANKS})
    classifier = Scripted("classifier", {}, default=0.7)
    cascade = Cascade([Stage(rules, 0.85), Stage(classifier, 0.6)], metrics=CascadeMetrics(metrics))

    cascade.judge([turn("thanks!"), turn("next"), turn("more")])

    text = metrics.render().decode()
    assert 'wildloop_detector_tier_decisions_total{tier="rules"} 1.0' in text
    assert 'wildloop_detector_tier_decisions_total{tier="classifier"} 2.0' in text
    assert 'wildloop_detector_tier_judged_total{tier="rules"} 3.0' in text
    assert 'wildloop_detector_tier_batch_duration_seconds_count{tier="classifier"} 1.0' in text


def test_a_cascade_needs_a_tier_and_tiers_must_answer_every_turn() -> None:
    with pytest.raises(ValueError, match="at least one tier"):
        Cascade([])

    class Lossy(Scripted):
        def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
            return super().judge(contexts)[:-1]

    with pytest.raises(RuntimeError, match="1 verdicts for 2 turns"):
        Cascade([Stage(Lossy("rules", {}), 0.5)]).judge([turn("a"), turn("b")])


def test_a_guarded_tier_loses_only_the_turn_that_breaks_it() -> None:
    calls: list[int] = []

    def judge(batch: Sequence[TurnContext]) -> list[Verdict]:
        calls.append(len(batch))
        if any(c.user == "boom" for c in batch):
            raise RuntimeError("tier broke")
        return [Verdict(confidence=0.9, tier="t") for _ in batch]

    contexts = [TurnContext("c", i, u, "answer") for i, u in enumerate(["ok", "", "boom", "fine"])]
    verdicts = judge_guarded("t", contexts, lambda c: c.user, judge)
    assert [v.failed for v in verdicts] == [False, True, True, False]
    assert [v.confidence for v in verdicts] == [0.9, 0.0, 0.0, 0.9]
    assert calls == [3, 1, 1, 1]  # the batch of usable turns, then one by one


def test_building_a_cascade_caps_numpy_blas_threads_as_configured() -> None:
    """Idle OpenBLAS threads spin on the cores the encoder's torch threads need; a detector
    process keeps numpy's BLAS at ``blas_threads`` (default 1)."""
    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    build_cascade(DetectorSettings(tiers=["rules"]))
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and all(pool["num_threads"] == 1 for pool in blas)
    with pytest.raises(ValueError, match="blas_threads"):
        DetectorSettings(blas_threads=0)
