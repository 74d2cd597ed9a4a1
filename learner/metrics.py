"""The learner's Prometheus metrics (``wildloop_learner_*``)."""

from __future__ import annotations

from collections.abc import Mapping

from learner.training import StepReport
from services.metrics import Metrics

RUN_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)


class LearnerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.registry = metrics
        self.built = metrics.counter(
            "examples_built",
            "Examples built from feedback, by kind and strategy.",
            ["kind", "strategy"],
        )
        self.dropped = metrics.counter(
            "examples_dropped", "Examples left out of data or a batch, by reason.", ["reason"]
        )
        self.judged = metrics.counter(
            "regenerated_judgements",
            "Checklist-judge outcomes of regenerated responses (win keeps it).",
            ["outcome"],
        )
        self.unused = metrics.gauge(
            "unused_pairs", "pairs", "Stored examples no training run has used yet."
        )
        self.runs = metrics.counter("runs", "Training runs, by final status.", ["status"])
        self.run_duration = metrics.histogram(
            "run_duration", "seconds", "Wall time of a training run.", buckets=RUN_BUCKETS
        )
        self.step = metrics.gauge("train_progress", "steps", "Optimizer step of the current run.")
        self.loss = metrics.gauge("train_loss", "nats", "Last logged training loss.")
        self.margin = metrics.gauge(
            "train_reward_margin", "nats", "Last logged DPO reward margin (chosen - rejected)."
        )
        self.throughput = metrics.gauge(
            "train_throughput", "tokens", "Tokens per second of the current run (estimated)."
        )
        self.last_run = metrics.gauge(
            "last_run_timestamp", "seconds", "Unix time the last training run finished."
        )

    def count_built(self, kinds: Mapping[tuple[str, str], int]) -> None:
        for (kind, strategy), n in kinds.items():
            self.built.labels(kind, strategy).inc(n)

    def count_drops(self, drops: Mapping[str, int]) -> None:
        for reason, n in drops.items():
            self.dropped.labels(reason).inc(n)

    def on_step(self, report: StepReport) -> None:
        self.step.set(report.step)
        if report.loss is not None:
            self.loss.set(report.loss)
        if report.reward_margin is not None:
            self.margin.set(report.reward_margin)
        if report.tokens_per_s is not None:
            self.throughput.set(report.tokens_per_s)
