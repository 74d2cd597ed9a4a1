"""``wildloop serve detector``: label every user turn of the live chat log, exactly once.

A consumer group on the chat-turns and explicit-feedback topics (replicas share partitions; a
conversation's events share a partition, so one replica sees a conversation in order).

* **Context.** The recent messages of each conversation are kept in memory (bounded LRU). A user
  turn whose preceding answer is not in memory (a restart, a rebalance) is looked up in the store
  (the recorder keeps it). If it is nowhere, the turn is *held* in the store
  (``detector_pending``) until the answer arrives or ``missing_context_wait_s`` passes; then it
  is labelled with ``missing_context`` set. Holding is durable: a crash loses no held turn.
* **Batching.** Each polled batch is judged at once by the cascade (``before_batch``), then every
  event is applied in its own store transaction by ``ConsumerWorker``, which dedupes by event id.
* **Exactly one label** per (conversation, turn, detector version): the label event's id is
  derived from that triple, the store insert ignores a second one, and a re-judged redelivery
  produces the same id, so downstream consumers drop it too.
* **Explicit feedback** (thumbs on assistant turn k) is the strongest signal: it is labelled on
  its own as the reaction turn k+1 under detector version ``explicit-1`` (tier ``explicit``,
  confidence 1), and when it is known before user turn k+1 is judged, it decides that label's
  polarity (tier ``explicit+<tier>``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.bus.ports import EventBus
from services.bus.typed import EventPublisher
from services.detector.cascade import Cascade
from services.detector.factory import build_cascade
from services.detector.judgement import Message, TurnContext, Verdict
from services.detector.metrics import DetectorMetrics
from services.events.schemas import (
    DsatRubric,
    Event,
    FeedbackCategory,
    FeedbackSubmitted,
    Rating,
    Role,
    SatRubric,
    TurnLabeled,
    TurnLogged,
)
from services.metrics import Metrics
from services.settings import WildloopSettings
from services.store.repository import Store
from services.worker import ConsumerWorker

log = logging.getLogger(__name__)

EXPLICIT_VERSION = "explicit-1"
# Returned by ``DetectorService._context`` for a user turn that follows no answer.
_INELIGIBLE: Any = object()


def label_event_id(conversation_id: str, turn: int, detector_version: str) -> str:
    """Deterministic: the same turn labelled twice by one detector gives the same event id."""
    ident = f"{conversation_id}\x00{turn}\x00{detector_version}"
    return "lb-" + hashlib.sha256(ident.encode()).hexdigest()[:29]


@dataclass(frozen=True, slots=True)
class Remembered:
    role: str
    content: str
    model: str | None
    adapter_id: str | None


class ConversationMemory:
    """The last messages of the most recently active conversations (LRU)."""

    def __init__(self, max_conversations: int, max_messages: int) -> None:
        self.max_conversations = max_conversations
        self.max_messages = max_messages
        self._conversations: OrderedDict[str, dict[int, Remembered]] = OrderedDict()

    def add(self, conversation_id: str, turn: int, message: Remembered) -> None:
        turns = self._conversations.get(conversation_id)
        if turns is None:
            turns = self._conversations[conversation_id] = {}
            if len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
        else:
            self._conversations.move_to_end(conversation_id)
        turns[turn] = message
        if len(turns) > self.max_messages:
            del turns[min(turns)]

    def get(self, conversation_id: str, turn: int) -> Remembered | None:
        turns = self._conversations.get(conversation_id)
        return None if turns is None else turns.get(turn)

    def before(self, conversation_id: str, turn: int) -> list[tuple[int, Remembered]]:
        turns = self._conversations.get(conversation_id) or {}
        return sorted((t, m) for t, m in turns.items() if t < turn)


@dataclass
class _Judged:
    context: TurnContext
    verdict: Verdict
    model: str | None
    adapter_id: str | None


class DetectorService:
    """The handlers and hooks ``ConsumerWorker`` runs; see the module docstring."""

    def __init__(
        self,
        settings: WildloopSettings,
        *,
        store: Store,
        cascade: Cascade,
        publisher: EventPublisher,
        metrics: DetectorMetrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.cfg = settings.detector
        self.store = store
        self.cascade = cascade
        self.version = cascade.version
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        history = self.cfg.history_messages
        self.memory = ConversationMemory(self.cfg.context_conversations, max(history + 2, 8))
        self.feedback: OrderedDict[tuple[str, int], FeedbackSubmitted] = OrderedDict()
        self._judged: dict[str, _Judged] = {}  # user-turn event id -> verdict, per batch
        self._held = 0
        # Held turns are swept a few times per wait, and at least once a second.
        self._sweep_every_s = min(1.0, self.cfg.missing_context_wait_s / 4)
        self._next_sweep = 0.0

    def close(self) -> None:
        """Flush and close the label publisher (the worker closes its own subscription)."""
        self.publisher.close()

    # -- the worker's hooks -----------------------------------------------------------------------
    def before_batch(self, events: list[Event]) -> None:
        """Remember every message of the batch, then judge all its user turns at once."""
        for event in events:
            if isinstance(event, TurnLogged):
                self._remember(event)
            elif isinstance(event, FeedbackSubmitted):
                self._remember_feedback(event)
        todo: list[tuple[TurnLogged, TurnContext, Remembered]] = []
        for event in events:
            if isinstance(event, TurnLogged) and event.role is Role.USER:
                found = self._context(event)
                if found is not None and found is not _INELIGIBLE:
                    todo.append((event, *found))
        try:
            self._judge(todo)
        except Exception:
            # A tier failed for the whole batch: its turns find no verdict, so they are held
            # (durably) and judged again when their wait is over; nothing is lost.
            log.exception("judging a batch failed; its turns are held for a retry")

    def after_batch(self) -> None:
        self._judged.clear()  # verdicts of duplicates the worker skipped
        self.metrics.export_rates()  # the gauges follow every batch, not only the sweep
        self.publisher.flush()

    def tick(self) -> None:
        """Label held turns whose wait is over; refresh the rate gauges. Runs once per poll,
        so the work is done at most every ``_sweep_every_s``."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every_s
        self.metrics.export_rates()
        try:
            due = self.store.held_turns_due(detector_version=self.version, now=self.clock())
        except OperationalError as exc:  # the store is away; the worker retries its writes
            log.warning("cannot read held turns", extra={"error": str(exc.orig)})
            return
        if not due:
            return
        for conversation_id, turn in due:
            try:
                self._label_held(conversation_id, turn)
            except Exception:
                # Rolled back: the turn stays held and is tried again on a later tick.
                log.exception("labelling a held turn failed", extra={"turn": turn})
                break
        self.metrics.held.set(self._held)
        self.publisher.flush()

    def _label_held(self, conversation_id: str, turn: int) -> None:
        """Release one held turn and label it, in one transaction."""
        with self.store.transaction() as session:
            raw = self.store.release_turn(
                session,
                conversation_id=conversation_id,
                turn=turn,
                detector_version=self.version,
            )
            if raw is None:
                return  # another replica took it
            self._held = max(0, self._held - 1)
            event = TurnLogged.model_validate(raw)
            found = self._context(event)
            if found is _INELIGIBLE:
                return
            if found is None:  # still nothing: judge the text alone
                found = (self._turn_context(event, None, ()), Remembered("", "", None, None))
            self._judge([(event, *found)])
            self._emit(session, event)

    # -- handlers (inside the worker's store transaction) ----------------------------------------
    def on_turn(self, event: TurnLogged, session: Session) -> None:
        if event.role is Role.ASSISTANT:
            self._release_follower(event, session)
            return
        if event.role is not Role.USER:
            return
        if event.event_id in self._judged:
            self._emit(session, event)
            return
        if event.turn < 1 or self._context(event) is _INELIGIBLE:
            return  # opens the conversation, or follows a system/user message: no label
        due = self.clock() + timedelta(seconds=self.cfg.missing_context_wait_s)
        if self.store.hold_turn(
            session,
            conversation_id=event.conversation_id,
            turn=event.turn,
            detector_version=self.version,
            event=event.model_dump(mode="json"),
            due_at=due,
        ):
            self._held += 1
            self.metrics.held.set(self._held)

    def on_feedback(self, event: FeedbackSubmitted, session: Session) -> None:
        up = event.rating is Rating.UP
        verdict = Verdict(
            sat=frozenset({SatRubric.PRAISE}) if up else frozenset(),
            dsat=frozenset() if up else frozenset({DsatRubric.NEGATIVE_FEEDBACK}),
            category=FeedbackCategory.POSITIVE
            if up
            else (
                FeedbackCategory.AWARE_WITH_CORRECTION
                if event.comment
                else FeedbackCategory.AWARE_WITHOUT_CORRECTION
            ),
            confidence=1.0,
            tier="explicit",
        )
        answer = self.memory.get(event.conversation_id, event.turn)
        label = TurnLabeled(
            event_id=label_event_id(event.conversation_id, event.turn + 1, EXPLICIT_VERSION),
            conversation_id=event.conversation_id,
            turn=event.turn + 1,
            polarity=verdict.polarity,
            sat=sorted(verdict.sat),
            dsat=sorted(verdict.dsat),
            category=verdict.category,
            confidence=1.0,
            tier="explicit",
            detector_version=EXPLICIT_VERSION,
            model=answer.model if answer else None,
            adapter_id=answer.adapter_id if answer else None,
            tenant_id=event.tenant_id,
            missing_context=answer is None,
        )
        self._write(session, label, lag_s=None)

    # -- internals ---------------------------------------------------------------------------------
    def _remember(self, event: TurnLogged) -> None:
        self.memory.add(
            event.conversation_id,
            event.turn,
            Remembered(event.role.value, event.content, event.model, event.adapter_id),
        )

    def _remember_feedback(self, event: FeedbackSubmitted) -> None:
        self.feedback[(event.conversation_id, event.turn)] = event
        if len(self.feedback) > self.cfg.context_conversations:
            self.feedback.popitem(last=False)

    def _context(self, event: TurnLogged) -> tuple[TurnContext, Remembered] | None:
        """The turn's context from memory, else from the store; None when the answer it
        reacts to is unknown, ``_INELIGIBLE`` when the message before it is no answer."""
        earlier = self.memory.before(event.conversation_id, event.turn)
        if not earlier or earlier[-1][0] != event.turn - 1:
            recorded = self.store.messages_before(
                event.conversation_id, event.turn, limit=self.cfg.history_messages + 1
            )
            earlier = [(t, Remembered(r, c, None, a)) for t, r, c, a in recorded]
        if not earlier or earlier[-1][0] != event.turn - 1:
            return None
        *history, (_, answer) = earlier
        if answer.role != "assistant":
            return _INELIGIBLE
        window = history[-self.cfg.history_messages :] if self.cfg.history_messages else []
        msgs = tuple(
            Message(m.role, m.content)  # type: ignore[arg-type]
            for _, m in window
            if m.role in ("user", "assistant")
        )
        return self._turn_context(event, answer.content, msgs), answer

    @staticmethod
    def _turn_context(
        event: TurnLogged, answer: str | None, history: tuple[Message, ...]
    ) -> TurnContext:
        return TurnContext(
            conversation_id=event.conversation_id,
            turn=event.turn,
            user=event.content,
            previous_assistant=answer,
            history=history,
        )

    def _judge(self, todo: Sequence[tuple[TurnLogged, TurnContext, Remembered]]) -> None:
        if not todo:
            return
        verdicts = self.cascade.judge([context for _, context, _ in todo])
        for (event, context, answer), judged in zip(todo, verdicts, strict=True):
            feedback = self.feedback.get((event.conversation_id, event.turn - 1))
            verdict = judged if feedback is None else _merge_explicit(judged, feedback)
            self._judged[event.event_id] = _Judged(
                context, verdict, answer.model, answer.adapter_id
            )

    def _release_follower(self, answer: TurnLogged, session: Session) -> None:
        """An answer arrived: the user turn after it may be waiting for it."""
        raw = self.store.release_turn(
            session,
            conversation_id=answer.conversation_id,
            turn=answer.turn + 1,
            detector_version=self.version,
        )
        if raw is None:
            return
        follower = TurnLogged.model_validate(raw)
        found = self._context(follower)
        if found is None or found is _INELIGIBLE:
            found = (
                self._turn_context(follower, answer.content, ()),
                Remembered("assistant", answer.content, answer.model, answer.adapter_id),
            )
        self._judge([(follower, *found)])
        self._emit(session, follower)
        self._held = max(0, self._held - 1)
        self.metrics.held.set(self._held)

    def _emit(self, session: Session, event: TurnLogged) -> None:
        judged = self._judged.pop(event.event_id)
        verdict = judged.verdict
        label = TurnLabeled(
            event_id=label_event_id(event.conversation_id, event.turn, self.version),
            conversation_id=event.conversation_id,
            turn=event.turn,
            polarity=verdict.polarity,
            sat=sorted(verdict.sat),
            dsat=sorted(verdict.dsat),
            category=verdict.category,
            confidence=verdict.confidence,
            tier=verdict.tier,
            detector_version=self.version,
            model=judged.model or event.model,
            adapter_id=judged.adapter_id if judged.model else event.adapter_id,
            tenant_id=event.tenant_id,
            missing_context=judged.context.missing_context,
        )
        lag = (self.clock() - event.occurred_at).total_seconds()
        self._write(session, label, lag_s=lag)

    def _write(self, session: Session, label: TurnLabeled, *, lag_s: float | None) -> None:
        """Store the label and publish it (flushed before the batch's positions move)."""
        self.store.record_label(session, label)
        self.publisher.publish(label)
        self.metrics.observe(
            polarity=label.polarity,
            tier=label.tier,
            sat=label.sat,
            dsat=label.dsat,
            model=label.model or "",
            adapter=label.adapter_id or "",
            lag_s=lag_s,
            missing_context=label.missing_context,
        )


def _merge_explicit(verdict: Verdict, feedback: FeedbackSubmitted) -> Verdict:
    """Thumbs decide the polarity; the text's own rubrics of that side are kept."""
    if feedback.rating is Rating.UP:
        return Verdict(
            sat=verdict.sat | {SatRubric.PRAISE},
            dsat=frozenset(),
            category=FeedbackCategory.POSITIVE,
            confidence=1.0,
            tier=f"explicit+{verdict.tier}",
        )
    category = verdict.category
    if category in (FeedbackCategory.POSITIVE, FeedbackCategory.NONE):
        category = FeedbackCategory.AWARE_WITHOUT_CORRECTION
    return Verdict(
        sat=frozenset(),
        dsat=verdict.dsat | {DsatRubric.NEGATIVE_FEEDBACK},
        category=category,
        confidence=1.0,
        tier=f"explicit+{verdict.tier}",
    )


def build_detector(
    settings: WildloopSettings,
    *,
    bus: EventBus,
    store: Store,
    cascade: Cascade,
    metrics: DetectorMetrics,
) -> tuple[ConsumerWorker, DetectorService]:
    t = settings.topics
    topics = [t.chat_turns, t.explicit_feedback]
    bus.ensure_topics([*topics, t.labels, t.dead_letter])
    publisher = EventPublisher(bus.publisher(), t)
    service = DetectorService(
        settings, store=store, cascade=cascade, publisher=publisher, metrics=metrics
    )
    worker = ConsumerWorker(
        subscription=bus.subscribe(topics, group=settings.detector.consumer_group),
        store=store,
        handlers={TurnLogged: service.on_turn, FeedbackSubmitted: service.on_feedback},
        dead_letters=EventPublisher(bus.publisher(), t),
        metrics=metrics.registry,
        batch_size=settings.detector.batch_size,
        before_batch=service.before_batch,
        after_batch=service.after_batch,
        tick=service.tick,
    )
    return worker, service


def open_detector(
    settings: WildloopSettings, *, bus: EventBus, store: Store, metrics: Metrics
) -> tuple[ConsumerWorker, DetectorService]:
    """The configured cascade (``settings.detector``) with its metrics, wired into the
    streaming service, as ``wildloop serve detector`` runs it. Raises ``DetectorConfigError``
    when the cascade cannot be built as configured."""
    detector_metrics = DetectorMetrics(metrics, window_s=settings.detector.rate_window_s)
    cascade = build_cascade(settings.detector, metrics=detector_metrics.cascade)
    return build_detector(settings, bus=bus, store=store, cascade=cascade, metrics=detector_metrics)
