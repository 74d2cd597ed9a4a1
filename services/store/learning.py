"""Store access for the learner: labelled conversations in, preference pairs, training runs,
candidate adapters and the lease that keeps one training run at a time across replicas.

The learner reads the store through this module only, so its SQL lives next to the models.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from services.formats import ConversationRecord
from services.store.models import (
    Adapter,
    Conversation,
    ExplicitFeedback,
    Lease,
    PreferencePair,
    TrainingRun,
    Turn,
    TurnLabel,
    utcnow,
)
from services.store.repository import Store, _to_record


@dataclass(frozen=True, slots=True)
class StoredConversation:
    """A conversation with every label and explicit feedback recorded for it."""

    record: ConversationRecord
    tenant_id: str
    user_id: str | None
    updated_at: datetime  # when its last message was logged
    labels: list[TurnLabel]
    feedback: list[ExplicitFeedback]


def _aware(value: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; they were written in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


Row = TypeVar("Row", Turn, TurnLabel, ExplicitFeedback)


def _by_conversation(
    session: Session, model: type[Row], ids: list[str], order: Any
) -> dict[str, list[Row]]:
    """Rows of ``model`` for the conversations ``ids``, grouped by conversation, in ``order``."""
    grouped: dict[str, list[Row]] = {}
    for row in session.scalars(
        select(model).where(model.conversation_id.in_(ids)).order_by(model.conversation_id, order)
    ):
        grouped.setdefault(row.conversation_id, []).append(row)
    return grouped


class LearningStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- labelled conversations ------------------------------------------------------------------
    def labelled_since(self, since: datetime | None) -> tuple[list[str], datetime | None]:
        """Ids of conversations with a label recorded after ``since`` (all when None), and the
        newest such recording time (the next watermark)."""
        stmt = select(TurnLabel.conversation_id, func.max(TurnLabel.recorded_at)).group_by(
            TurnLabel.conversation_id
        )
        if since is not None:
            stmt = stmt.where(TurnLabel.recorded_at > since)
        with self.store.transaction() as session:
            rows = session.execute(stmt).all()
        newest = max((_aware(t) for _, t in rows), default=None)
        return sorted(c for c, _ in rows), newest

    def conversations(
        self, ids: Sequence[str] | None = None, *, batch_size: int = 200
    ) -> Iterator[StoredConversation]:
        """The given conversations (all that have labels when ``ids`` is None), in id order."""
        if ids is None:
            ids, _ = self.labelled_since(None)
        for start in range(0, len(ids), batch_size):
            chunk = list(ids[start : start + batch_size])
            with self.store.transaction() as session:
                convs = session.scalars(
                    select(Conversation).where(Conversation.id.in_(chunk)).order_by(Conversation.id)
                ).all()
                turns = _by_conversation(session, Turn, chunk, Turn.turn_index)
                labels = _by_conversation(session, TurnLabel, chunk, TurnLabel.turn_index)
                feedback = _by_conversation(
                    session, ExplicitFeedback, chunk, ExplicitFeedback.occurred_at
                )
            for conv in convs:
                yield StoredConversation(
                    record=_to_record(conv, turns.get(conv.id, [])),
                    tenant_id=conv.tenant_id,
                    user_id=conv.user_id,
                    updated_at=_aware(conv.updated_at),
                    labels=labels.get(conv.id, []),
                    feedback=feedback.get(conv.id, []),
                )

    # -- preference pairs ------------------------------------------------------------------------
    def save_pairs(self, rows: Iterable[dict[str, Any]]) -> int:
        """Insert pairs (``id`` = content hash); returns how many were new."""
        added = 0
        with self.store.transaction() as session:
            for row in rows:
                added += self.store._insert_ignore(session, PreferencePair, row)
        return added

    def unused_pairs(self) -> list[PreferencePair]:
        with self.store.transaction() as session:
            return list(
                session.scalars(
                    select(PreferencePair)
                    .where(PreferencePair.used_by_run_id.is_(None))
                    .order_by(PreferencePair.created_at, PreferencePair.id)
                )
            )

    def mark_used(self, pair_ids: Sequence[str], run_id: str) -> None:
        with self.store.transaction() as session:
            for start in range(0, len(pair_ids), 500):
                session.execute(
                    update(PreferencePair)
                    .where(PreferencePair.id.in_(pair_ids[start : start + 500]))
                    .values(used_by_run_id=run_id)
                )

    # -- training runs and candidates ------------------------------------------------------------
    def start_run(
        self, *, run_id: str, method: str, base_model: str, hyperparameters: dict[str, Any]
    ) -> None:
        with self.store.transaction() as session:
            session.add(
                TrainingRun(
                    id=run_id,
                    method=method,
                    status="running",
                    base_model=base_model,
                    hyperparameters=hyperparameters,
                    started_at=utcnow(),
                )
            )

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
        data_manifest_hash: str | None = None,
    ) -> None:
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
        if metrics is not None:
            values["metrics"] = metrics
        if data_manifest_hash is not None:
            values["data_manifest_hash"] = data_manifest_hash
        with self.store.transaction() as session:
            session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(**values))

    def abandon_running_runs(self) -> list[str]:
        """Mark every run still ``running`` as failed (call only while holding the training
        lease, when none can be alive); returns their ids."""
        with self.store.transaction() as session:
            ids = list(
                session.scalars(select(TrainingRun.id).where(TrainingRun.status == "running"))
            )
            if ids:
                session.execute(
                    update(TrainingRun)
                    .where(TrainingRun.id.in_(ids))
                    .values(
                        status="failed",
                        finished_at=utcnow(),
                        error="abandoned: the learner running it stopped before it finished",
                    )
                )
        return ids

    def run(self, run_id: str) -> TrainingRun | None:
        with self.store.transaction() as session:
            return session.get(TrainingRun, run_id)

    def last_run_started(self) -> datetime | None:
        with self.store.transaction() as session:
            value = session.scalar(select(func.max(TrainingRun.started_at)))
        return None if value is None else _aware(value)

    def register_candidate(
        self,
        *,
        adapter_id: str,
        base_model: str,
        path: str,
        run_id: str,
        manifest: dict[str, Any],
    ) -> None:
        with self.store.transaction() as session:
            session.add(
                Adapter(
                    id=adapter_id,
                    base_model=base_model,
                    path=path,
                    status="candidate",
                    run_id=run_id,
                    manifest=manifest,
                )
            )

    # -- leases ----------------------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) the lease ``name`` for ``ttl_s`` seconds; False while another holder
        has an unexpired one. Safe across processes and replicas: one conditional statement."""
        now = utcnow()
        expires = now + timedelta(seconds=ttl_s)
        with self.store.transaction() as session:
            taken = session.execute(
                update(Lease)
                .where(
                    Lease.name == name,
                    or_(Lease.holder == holder, Lease.expires_at < now),
                )
                .values(holder=holder, expires_at=expires)
            ).rowcount
            if taken:
                return True
            return self.store._insert_ignore(
                session, Lease, {"name": name, "holder": holder, "expires_at": expires}
            )

    def release_lease(self, name: str, holder: str) -> None:
        with self.store.transaction() as session:
            session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))
