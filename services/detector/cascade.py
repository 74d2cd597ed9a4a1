"""Tiers chained cheapest first: each later tier judges only what the earlier ones were unsure of.

A stage is a tier and a confidence threshold. A verdict at or above its stage's threshold stands;
the rest go on to the next stage. The last stage's verdict always stands, except a failed one
(confidence 0, e.g. the LLM endpoint was down): then the most confident earlier verdict is kept,
so an outage of the expensive tier degrades quality, never availability.

The cascade's ``version`` names the tiers, their own versions and the thresholds: a label is
unique per (conversation, turn, detector version), so changing any of them labels afresh instead
of silently mixing two detectors' labels.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.detector.judgement import Tier, TurnContext, Verdict, failure
from services.metrics import Metrics

CASCADE_REVISION = "1"


@dataclass(frozen=True, slots=True)
class Stage:
    tier: Tier
    threshold: float  # verdicts at least this confident stand


class CascadeMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.decisions = metrics.counter(
            "tier_decisions", "Turns whose label a tier decided, by tier.", ["tier"]
        )
        self.judged = metrics.counter("tier_judged", "Turns a tier judged, by tier.", ["tier"])
        self.latency = metrics.histogram(
            "tier_batch_duration",
            "seconds",
            "Time a tier took for one batch of turns.",
            ["tier"],
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0),
        )


class Cascade:
    def __init__(self, stages: Sequence[Stage], *, metrics: CascadeMetrics | None = None) -> None:
        if not stages:
            raise ValueError("a cascade needs at least one tier")
        self.stages = list(stages)
        self.metrics = metrics
        parts = [f"{s.tier.name}:{getattr(s.tier, 'version', '0')}:{s.threshold:g}" for s in stages]
        digest = hashlib.sha256("|".join([CASCADE_REVISION, *parts]).encode()).hexdigest()[:10]
        self.version = f"{'+'.join(s.tier.name for s in stages)}-{digest}"

    @property
    def tier_names(self) -> list[str]:
        return [s.tier.name for s in self.stages]

    def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        final: list[Verdict | None] = [None] * len(contexts)
        best: list[Verdict | None] = [None] * len(contexts)
        pending = list(range(len(contexts)))
        for n, stage in enumerate(self.stages):
            if not pending:
                break
            last = n == len(self.stages) - 1
            started = time.perf_counter()
            verdicts = stage.tier.judge([contexts[i] for i in pending])
            if self.metrics is not None:
                self.metrics.latency.labels(stage.tier.name).observe(time.perf_counter() - started)
                self.metrics.judged.labels(stage.tier.name).inc(len(pending))
            if len(verdicts) != len(pending):
                raise RuntimeError(
                    f"tier {stage.tier.name} returned {len(verdicts)} verdicts "
                    f"for {len(pending)} turns"
                )
            unsure = []
            for i, verdict in zip(pending, verdicts, strict=True):
                failed = verdict.failed
                if verdict.confidence >= stage.threshold and not failed:
                    final[i] = verdict
                elif last:
                    earlier = best[i]
                    final[i] = earlier if failed and earlier is not None else verdict
                else:
                    earlier = best[i]
                    if earlier is None or verdict.confidence > earlier.confidence:
                        best[i] = verdict
                    unsure.append(i)
            pending = unsure
        result = [v if v is not None else failure("none") for v in final]
        if self.metrics is not None:
            for verdict in result:
                self.metrics.decisions.labels(verdict.tier).inc()
        return result
