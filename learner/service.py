"""The learner as a service: feedback in the store becomes preference examples, and a training
run starts when ``min_new_pairs`` usable examples have accumulated or every
``interval_minutes`` (with at least ``min_pairs``), whichever comes first.

One run at a time across replicas: a run holds the ``learner-train`` lease in the store (renewed
while it trains; a crashed holder's lease expires after ``lock_ttl_s``). A finished run registers
its adapter as a *candidate* for the evaluation gate and publishes ``trained`` and
``candidate_registered`` adapter events. A failed run is recorded with its error, produces no
candidate, and leaves its examples unused for the next run.

Examples are stored as they are built (``preference_pairs``, keyed by content hash, so building
twice is harmless); the caps and balancing are applied per run, to the examples no run has used.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.batch import Batch, assemble
from learner.builder import Builder, Built, Regenerator
from learner.corpus import from_store
from learner.dataset import write_dataset
from learner.metrics import LearnerMetrics
from learner.records import AdapterManifest, PreferencePairRecord, UnpairedRecord
from learner.training import StepReport, TrainingError, hyperparameters, train_adapter
from services.bus.typed import EventPublisher
from services.events.schemas import AdapterAction, AdapterLifecycleChanged
from services.settings import WildloopSettings
from services.store.learning import LearningStore

log = logging.getLogger(__name__)

LEASE = "learner-train"
TrainFn = Callable[..., AdapterManifest]


@dataclass(frozen=True, slots=True)
class RunOutcome:
    status: str  # succeeded | failed | skipped | busy
    run_id: str | None = None
    adapter_id: str | None = None
    examples: int = 0
    error: str | None = None
    manifest: AdapterManifest | None = None


def _rows(built: Built) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for pair in built.pairs:
        rows.append(
            {
                "id": pair.id,
                "kind": "pair",
                "conversation_id": pair.source.conversation_id,
                "turn_index": pair.source.feedback_turn,
                "user_id": pair.source.user_id,
                "tenant_id": pair.source.tenant_id,
                "prompt": [m.model_dump() for m in pair.prompt],
                "chosen": pair.chosen[0].content,
                "rejected": pair.rejected[0].content,
                "label": None,
                "strategy": pair.strategy,
                "checklist": pair.checklist,
                "detector_version": pair.source.detector_version,
                "details": {"record": pair.model_dump(mode="json")},
            }
        )
    for item in built.unpaired:
        rows.append(
            {
                "id": item.id,
                "kind": "unpaired",
                "conversation_id": item.source.conversation_id,
                "turn_index": item.source.feedback_turn,
                "user_id": item.source.user_id,
                "tenant_id": item.source.tenant_id,
                "prompt": [m.model_dump() for m in item.prompt],
                "chosen": item.completion[0].content if item.label else None,
                "rejected": None if item.label else item.completion[0].content,
                "label": item.label,
                "strategy": "natural",
                "checklist": item.checklist,
                "detector_version": item.source.detector_version,
                "details": {"record": item.model_dump(mode="json")},
            }
        )
    return rows


class LearnerService:
    def __init__(
        self,
        settings: WildloopSettings,
        store: LearningStore,
        *,
        base_model_dir: Callable[[], Path],
        metrics: LearnerMetrics,
        publisher: EventPublisher | None = None,
        regenerator: Regenerator | None = None,
        train: TrainFn = train_adapter,
        holder: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.base_model_dir = base_model_dir
        self.metrics = metrics
        self.publisher = publisher
        self.builder = Builder(settings.learner, regenerator=regenerator)
        self.train = train
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._watermark: datetime | None = None
        # Conversations with a DSAT turn not decidable yet; built again on every ingest.
        self._pending: set[str] = set()

    # -- examples --------------------------------------------------------------------------------
    def ingest(self) -> int:
        """Build examples from conversations labelled since the last call; store the new ones."""
        fresh, newest = self.store.labelled_since(self._watermark)
        ids = sorted(set(fresh) | self._pending)
        if not ids:
            return 0
        conversations = from_store(
            self.store.conversations(ids), detector_version=self.settings.learner.detector_version
        )
        built = self.builder.build(conversations)
        added = self.store.save_pairs(_rows(built))
        self.metrics.count_built(
            Counter(("pair", p.strategy) for p in built.pairs)
            + Counter(("kto", "natural") for _ in built.unpaired)
        )
        self.metrics.count_drops(built.drops)
        for outcome, n in built.judged.items():
            self.metrics.judged.labels(outcome).inc(n)
        self._watermark = newest or self._watermark
        self._pending = built.pending
        log.info(
            "examples built",
            extra={
                "conversations": len(ids),
                "new": added,
                "pending": len(built.pending),
                "drops": dict(built.drops),
            },
        )
        return added

    def batch(self) -> Batch:
        """The usable batch of unused examples, after the batch-level filters."""
        pairs: list[PreferencePairRecord] = []
        unpaired: list[UnpairedRecord] = []
        for row in self.store.unused_pairs():
            record = (row.details or {}).get("record")
            if record is None:
                continue
            if row.kind == "pair":
                pairs.append(PreferencePairRecord.model_validate(record))
            else:
                unpaired.append(UnpairedRecord.model_validate(record))
        self.metrics.unused.set(len(pairs) if self.method == "dpo" else len(unpaired))
        return assemble(pairs, unpaired, self.settings.learner)

    @property
    def method(self) -> str:
        return self.settings.learner.method

    def _examples(self, batch: Batch) -> list[PreferencePairRecord] | list[UnpairedRecord]:
        return batch.pairs if self.method == "dpo" else batch.unpaired

    def due(self, batch: Batch, now: datetime | None = None) -> bool:
        learner = self.settings.learner
        n = len(self._examples(batch))
        if n < learner.min_pairs:
            return False
        if n >= learner.min_new_pairs:
            return True
        last = self.store.last_run_started()
        now = now or datetime.now(UTC)
        return last is None or (now - last).total_seconds() >= learner.interval_minutes * 60

    # -- one run -----------------------------------------------------------------------------------
    def run_once(
        self,
        *,
        max_steps: int | None = None,
        force: bool = False,
        on_step: Callable[[StepReport], None] | None = None,
    ) -> RunOutcome:
        """Ingest, then train if due (or ``force`` with at least one example)."""
        self.ingest()
        batch = self.batch()
        examples = self._examples(batch)
        if not examples or (not force and not self.due(batch)):
            return RunOutcome("skipped", examples=len(examples))
        ttl = self.settings.learner.lock_ttl_s
        if not self.store.acquire_lease(LEASE, self.holder, ttl):
            return RunOutcome("busy", examples=len(examples))
        try:
            # Holding the lease, no other run can be alive: a run still marked running was cut
            # off (its process died) and is recorded as failed.
            for run_id in self.store.abandon_running_runs():
                log.warning("run abandoned by a stopped learner", extra={"run_id": run_id})
                self.metrics.runs.labels("failed").inc()
            # Read again under the lease: a run that finished meanwhile used some examples.
            batch = self.batch()
            if not self._examples(batch):
                return RunOutcome("skipped")
            return self._train(batch, max_steps=max_steps, on_step=on_step)
        finally:
            self.store.release_lease(LEASE, self.holder)

    def _train(
        self,
        batch: Batch,
        *,
        max_steps: int | None,
        on_step: Callable[[StepReport], None] | None,
    ) -> RunOutcome:
        learner = self.settings.learner
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        run_id = f"run-{stamp}-{uuid.uuid4().hex[:6]}"
        adapter_id = f"{self.method}-{stamp}-{uuid.uuid4().hex[:6]}"
        examples = self._examples(batch)
        self.store.start_run(
            run_id=run_id,
            method=self.method,
            base_model=self.settings.base_model,
            hyperparameters=hyperparameters(learner, self.method, max_steps),  # type: ignore[arg-type]
        )
        started = time.monotonic()
        data_dir = self.settings.adapters_dir / "datasets" / run_id
        output = self.settings.adapters_dir / adapter_id
        self.metrics.count_drops({k: v for k, v in batch.drops.items()})
        last_renewal = [time.monotonic()]

        def step(report: StepReport) -> None:
            self.metrics.on_step(report)
            if on_step is not None:
                on_step(report)
            if time.monotonic() - last_renewal[0] > min(60.0, learner.lock_ttl_s / 4):
                self.store.acquire_lease(LEASE, self.holder, learner.lock_ttl_s)
                last_renewal[0] = time.monotonic()

        step(StepReport(step=0, max_steps=0, loss=None, reward_margin=None, tokens_per_s=None))
        try:
            data = write_dataset(
                data_dir,
                batch,
                origin="store",
                settings=learner.model_dump(
                    exclude={"generator_api_key", "judge_api_key"}, mode="json"
                ),
            )
            manifest = self.train(
                data_dir,
                output,
                settings=learner,
                base_model_dir=self.base_model_dir(),
                base_model_name=self.settings.base_model,
                method=self.method,
                run_id=run_id,
                adapter_id=adapter_id,
                max_steps=max_steps,
                on_step=step,
            )
        except Exception as exc:  # whatever stopped it, the run is recorded as failed
            error = str(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"
            log.error("training run failed", extra={"run_id": run_id, "error": error})
            self.store.finish_run(run_id, status="failed", error=error)
            self.metrics.runs.labels("failed").inc()
            self.metrics.run_duration.observe(time.monotonic() - started)
            return RunOutcome("failed", run_id=run_id, examples=len(examples), error=error)
        self.store.register_candidate(
            adapter_id=adapter_id,
            base_model=self.settings.base_model,
            path=str(output),
            run_id=run_id,
            manifest=manifest.model_dump(mode="json"),
        )
        self.store.mark_used([e.id for e in examples], run_id)
        self.store.finish_run(
            run_id,
            status="succeeded",
            metrics=manifest.metrics,
            data_manifest_hash=data.content_hash,
        )
        self.metrics.runs.labels("succeeded").inc()
        self.metrics.run_duration.observe(time.monotonic() - started)
        self.metrics.last_run.set(time.time())
        self._announce(adapter_id, run_id, str(output), manifest)
        log.info("candidate registered", extra={"adapter_id": adapter_id, "run_id": run_id})
        return RunOutcome(
            "succeeded",
            run_id=run_id,
            adapter_id=adapter_id,
            examples=len(examples),
            manifest=manifest,
        )

    def _announce(self, adapter_id: str, run_id: str, path: str, manifest: AdapterManifest) -> None:
        if self.publisher is None:
            return
        try:
            for action in (AdapterAction.TRAINED, AdapterAction.CANDIDATE_REGISTERED):
                self.publisher.publish(
                    AdapterLifecycleChanged(
                        adapter_id=adapter_id,
                        action=action,
                        base_model=self.settings.base_model,
                        path=path,
                        run_id=run_id,
                        actor="learner",
                        details={"method": manifest.method, "metrics": manifest.metrics},
                    )
                )
            self.publisher.flush()
        except Exception as exc:
            # The store holds the candidate (the gate reads it there); the events are the
            # audit trail, and a bus outage must not fail a finished run.
            log.warning("adapter events not confirmed by the bus", extra={"error": str(exc)})

    # -- the loop ----------------------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        poll = self.settings.learner.poll_s
        while not stop.is_set():
            try:
                outcome = self.run_once()
                if outcome.status not in ("skipped",):
                    log.info(
                        "learner tick", extra={"status": outcome.status, "run_id": outcome.run_id}
                    )
            except Exception:
                log.exception("learner tick failed; trying again at the next poll")
            stop.wait(poll)
