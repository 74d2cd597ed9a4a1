"""The embedded durable event log: Kafka's semantics in one SQLite file (through SQLAlchemy).

Several processes on one machine may publish and consume at the same time; SQLite's file locks
serialise writers and WAL mode lets readers run beside them.

* Records get a global, strictly increasing offset (``AUTOINCREMENT``: never reused, even after
  pruning). A record's partition is ``crc32(key) % partitions``, so one key stays in one
  partition and is read in offset order.
* Consumer groups: members heartbeat into ``eventlog_members`` and hold time-limited leases on
  partitions in ``eventlog_leases``. Each member claims its fair share (sorted live members take
  ``P // M`` partitions, the first ``P % M`` one more) and releases any excess, so a group
  converges within one heartbeat interval after a member joins or leaves. A crashed member's
  leases expire after ``session_timeout``.
* Commits are fenced: a member commits a position only for partitions it still leases, so a
  member that stalled past its lease cannot move the group backwards or forwards.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from services.bus.ports import CommitFailedError, Headers, PublishError, Record

_metadata = MetaData()

records_table = Table(
    "eventlog_records",
    _metadata,
    Column("offset", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("key", Text, nullable=True),
    Column("value", LargeBinary, nullable=True),
    Column("headers", Text, nullable=True),
    Column("timestamp_ms", BigInteger, nullable=False),
    Index("ix_eventlog_records_tpo", "topic", "partition", "offset"),
    sqlite_autoincrement=True,
)

topics_table = Table(
    "eventlog_topics",
    _metadata,
    Column("name", String(255), primary_key=True),
    Column("partitions", Integer, nullable=False),
)

offsets_table = Table(
    "eventlog_offsets",
    _metadata,
    Column("group_id", String(255), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", Integer, nullable=False),
    PrimaryKeyConstraint("group_id", "topic", "partition"),
)

members_table = Table(
    "eventlog_members",
    _metadata,
    Column("group_id", String(255), nullable=False),
    Column("member_id", String(64), nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    PrimaryKeyConstraint("group_id", "member_id"),
)

leases_table = Table(
    "eventlog_leases",
    _metadata,
    Column("group_id", String(255), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("owner", String(64), nullable=True),
    Column("expires_at", Float, nullable=False),
    PrimaryKeyConstraint("group_id", "topic", "partition"),
)

TopicPartition = tuple[str, int]

_READER = "wildloop_reader"


def partition_for(key: str | None, partitions: int, *, fallback: int = 0) -> int:
    if key is None:
        return fallback % partitions
    return zlib.crc32(key.encode("utf-8")) % partitions


def _encode_headers(headers: Headers) -> str | None:
    if not headers:
        return None
    # latin-1 maps every byte to one code point, so any header value round-trips.
    return json.dumps([[k, v.decode("latin-1")] for k, v in headers])


def _decode_headers(raw: str | None) -> tuple[tuple[str, bytes], ...]:
    if not raw:
        return ()
    return tuple((k, v.encode("latin-1")) for k, v in json.loads(raw))


def _make_engine(path: Path) -> Engine:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NullPool: each publisher/subscription holds its own connection for its lifetime.
    engine = create_engine(
        f"sqlite:///{path}",
        poolclass=NullPool,
        connect_args={"timeout": 30.0, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front, so two processes never deadlock upgrading a
        # read lock; connections marked as readers get a plain (snapshot) transaction.
        if conn.get_execution_options().get(_READER):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class EmbeddedEventLog:
    """An :class:`~services.bus.ports.EventBus` over a SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        partitions: int = 4,
        poll_interval_s: float = 0.002,
        heartbeat_interval_s: float = 0.5,
        session_timeout_s: float = 10.0,
    ) -> None:
        self.path = path
        self.default_partitions = partitions
        self.poll_interval_s = poll_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.session_timeout_s = session_timeout_s
        self.engine = _make_engine(path)
        with self.engine.begin() as conn:
            _metadata.create_all(conn)

    # -- EventBus -------------------------------------------------------------------------------
    def ensure_topics(self, topics: Sequence[str]) -> None:
        with self.engine.begin() as conn:
            self._ensure_topics(conn, topics)

    def _ensure_topics(self, conn: Connection, topics: Sequence[str]) -> dict[str, int]:
        stmt = sqlite_insert(topics_table).on_conflict_do_nothing(index_elements=["name"])
        conn.execute(stmt, [{"name": t, "partitions": self.default_partitions} for t in topics])
        rows = conn.execute(
            select(topics_table.c.name, topics_table.c.partitions).where(
                topics_table.c.name.in_(list(topics))
            )
        )
        return {name: parts for name, parts in rows}

    def reader(self) -> Connection:
        """A connection whose transactions only read (they never take the write lock)."""
        return self.engine.connect().execution_options(**{_READER: True})

    def topics(self) -> dict[str, int]:
        with self.reader() as conn:
            rows = conn.execute(select(topics_table.c.name, topics_table.c.partitions))
            return {name: parts for name, parts in rows}

    def publisher(self) -> EmbeddedPublisher:
        return EmbeddedPublisher(self)

    def subscribe(self, topics: Sequence[str], *, group: str) -> EmbeddedSubscription:
        return EmbeddedSubscription(self, list(topics), group)

    def end_offsets(self) -> dict[TopicPartition, int]:
        """The next offset of every partition that holds records."""
        with self.reader() as conn:
            rows = conn.execute(
                select(
                    records_table.c.topic,
                    records_table.c.partition,
                    func.max(records_table.c.offset),
                ).group_by(records_table.c.topic, records_table.c.partition)
            )
            return {(t, p): int(o) + 1 for t, p, o in rows}

    def prune(self, *, older_than_s: float) -> int:
        """Delete records older than ``older_than_s`` seconds; returns how many."""
        cutoff = int((time.time() - older_than_s) * 1000)
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(records_table).where(records_table.c.timestamp_ms < cutoff)
            )
            return int(result.rowcount or 0)

    def close(self) -> None:
        self.engine.dispose()


class EmbeddedPublisher:
    """Buffers records and writes each flush in one transaction (auto-flush at 1,000)."""

    AUTO_FLUSH = 1000

    def __init__(self, log: EmbeddedEventLog) -> None:
        self._log = log
        self._conn = log.engine.connect()
        self._buffer: list[dict[str, Any]] = []
        self._partitions: dict[str, int] = {}
        self._round_robin = 0
        self._lock = threading.Lock()

    def publish(self, topic: str, *, key: str | None, value: bytes, headers: Headers = ()) -> None:
        with self._lock:
            self._buffer.append(
                {
                    "topic": topic,
                    "key": key,
                    "value": value,
                    "headers": _encode_headers(headers),
                    "timestamp_ms": int(time.time() * 1000),
                }
            )
            if len(self._buffer) >= self.AUTO_FLUSH:
                self._flush_locked()

    def flush(self, timeout_s: float | None = None) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        try:
            with self._conn.begin():
                missing = {r["topic"] for r in rows} - self._partitions.keys()
                if missing:
                    self._partitions.update(self._log._ensure_topics(self._conn, sorted(missing)))
                for row in rows:
                    parts = self._partitions[row["topic"]]
                    self._round_robin += 1
                    row["partition"] = partition_for(row["key"], parts, fallback=self._round_robin)
                self._conn.execute(records_table.insert(), rows)
        except Exception as exc:
            self._buffer = rows + self._buffer  # nothing was written: keep them for a retry
            raise PublishError(f"embedded log write failed: {exc}") from exc

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._conn.close()


class EmbeddedSubscription:
    """One member of a consumer group on the embedded log. Not thread-safe."""

    def __init__(self, log: EmbeddedEventLog, topics: list[str], group: str) -> None:
        self._log = log
        self.group = group
        self.topics = topics
        self.member_id = uuid.uuid4().hex
        self._conn = log.engine.connect()
        self._rconn = log.reader()
        self._owned: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._next_heartbeat = 0.0
        self._seen_max = -1
        self._behind: set[TopicPartition] = set()
        self._closed = False

    # -- group membership -------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._conn.begin():
            yield self._conn

    def _rebalance(self) -> None:
        now = time.time()
        ttl = self._log.session_timeout_s
        g = self.group
        with self._write() as conn:
            conn.execute(
                sqlite_insert(members_table)
                .values(group_id=g, member_id=self.member_id, heartbeat_at=now)
                .on_conflict_do_update(
                    index_elements=["group_id", "member_id"], set_={"heartbeat_at": now}
                )
            )
            conn.execute(
                delete(members_table).where(
                    and_(members_table.c.group_id == g, members_table.c.heartbeat_at < now - ttl)
                )
            )
            live = list(
                conn.execute(
                    select(members_table.c.member_id)
                    .where(members_table.c.group_id == g)
                    .order_by(members_table.c.member_id)
                ).scalars()
            )
            parts = self._log._ensure_topics(conn, self.topics)
            all_tps = sorted((t, p) for t, n in parts.items() for p in range(n))
            leases = {
                (t, p): (owner, exp)
                for t, p, owner, exp in conn.execute(
                    select(
                        leases_table.c.topic,
                        leases_table.c.partition,
                        leases_table.c.owner,
                        leases_table.c.expires_at,
                    ).where(
                        and_(leases_table.c.group_id == g, leases_table.c.topic.in_(self.topics))
                    )
                )
            }
            live_set = set(live)
            mine = sorted(
                tp
                for tp, (owner, exp) in leases.items()
                if owner == self.member_id and exp > now and tp in all_tps
            )
            free = [
                tp
                for tp in all_tps
                if tp not in leases
                or leases[tp][0] is None
                or leases[tp][1] <= now
                or leases[tp][0] not in live_set
            ]
            index = live.index(self.member_id)
            target = len(all_tps) // len(live) + (1 if index < len(all_tps) % len(live) else 0)
            if len(mine) > target:
                release, mine = mine[target:], mine[:target]
                for t, p in release:
                    conn.execute(
                        update(leases_table)
                        .where(
                            and_(
                                leases_table.c.group_id == g,
                                leases_table.c.topic == t,
                                leases_table.c.partition == p,
                                leases_table.c.owner == self.member_id,
                            )
                        )
                        .values(owner=None, expires_at=0.0)
                    )
            else:
                mine = mine + free[: target - len(mine)]
            for t, p in mine:
                conn.execute(
                    sqlite_insert(leases_table)
                    .values(
                        group_id=g, topic=t, partition=p, owner=self.member_id, expires_at=now + ttl
                    )
                    .on_conflict_do_update(
                        index_elements=["group_id", "topic", "partition"],
                        set_={"owner": self.member_id, "expires_at": now + ttl},
                    )
                )
            new = set(mine)
            gained = new - self._owned
            if gained:
                committed = {
                    (t, p): o
                    for t, p, o in conn.execute(
                        select(
                            offsets_table.c.topic,
                            offsets_table.c.partition,
                            offsets_table.c.next_offset,
                        ).where(offsets_table.c.group_id == g)
                    )
                }
                for tp in gained:
                    self._positions[tp] = committed.get(tp, 0)
                    self._committed[tp] = committed.get(tp, 0)
                    self._behind.add(tp)
            for tp in self._owned - new:
                self._positions.pop(tp, None)
                self._committed.pop(tp, None)
                self._behind.discard(tp)
            self._owned = new
        self._next_heartbeat = now + self._log.heartbeat_interval_s

    # -- Subscription ---------------------------------------------------------------------------
    def assignment(self) -> set[TopicPartition]:
        if time.time() >= self._next_heartbeat:
            self._rebalance()
        return set(self._owned)

    def poll(self, *, timeout_s: float = 1.0, max_records: int = 500) -> list[Record]:
        if self._closed:
            raise RuntimeError("subscription is closed")
        deadline = time.monotonic() + timeout_s
        while True:
            if time.time() >= self._next_heartbeat:
                self._rebalance()
            records = self._fetch(max_records)
            remaining = deadline - time.monotonic()
            if records or remaining <= 0:
                return records
            time.sleep(min(self._log.poll_interval_s, remaining))

    def _fetch(self, max_records: int) -> list[Record]:
        with self._rconn.begin():
            return self._fetch_in(self._rconn, max_records)

    def _fetch_in(self, conn: Connection, max_records: int) -> list[Record]:
        head = conn.execute(select(func.max(records_table.c.offset))).scalar() or 0
        if head <= self._seen_max and not self._behind:
            return []
        out: list[Record] = []
        for tp in sorted(self._owned):
            if len(out) >= max_records:
                break
            topic, partition = tp
            want = max_records - len(out)
            rows = conn.execute(
                select(
                    records_table.c.offset,
                    records_table.c.key,
                    records_table.c.value,
                    records_table.c.headers,
                    records_table.c.timestamp_ms,
                )
                .where(
                    and_(
                        records_table.c.topic == topic,
                        records_table.c.partition == partition,
                        records_table.c.offset >= self._positions[tp],
                    )
                )
                .order_by(records_table.c.offset)
                .limit(want)
            ).all()
            for offset, key, value, headers, ts in rows:
                out.append(
                    Record(topic, partition, offset, key, value, ts, _decode_headers(headers))
                )
            if rows:
                self._positions[tp] = rows[-1][0] + 1
            if len(rows) < want:
                self._behind.discard(tp)
            else:
                self._behind.add(tp)
        if not self._behind:
            self._seen_max = head
        return out

    def commit(self) -> None:
        dirty = {tp: pos for tp, pos in self._positions.items() if self._committed.get(tp) != pos}
        if not dirty:
            return
        now = time.time()
        lost: list[TopicPartition] = []
        with self._write() as conn:
            held = {
                (t, p)
                for t, p in conn.execute(
                    select(leases_table.c.topic, leases_table.c.partition).where(
                        and_(
                            leases_table.c.group_id == self.group,
                            leases_table.c.owner == self.member_id,
                            leases_table.c.expires_at > now,
                        )
                    )
                )
            }
            for tp, pos in dirty.items():
                if tp not in held:
                    lost.append(tp)
                    continue
                conn.execute(
                    sqlite_insert(offsets_table)
                    .values(group_id=self.group, topic=tp[0], partition=tp[1], next_offset=pos)
                    .on_conflict_do_update(
                        index_elements=["group_id", "topic", "partition"],
                        set_={"next_offset": pos},
                    )
                )
                self._committed[tp] = pos
        if lost:
            for tp in lost:
                self._owned.discard(tp)
                self._positions.pop(tp, None)
                self._committed.pop(tp, None)
            raise CommitFailedError(
                f"group {self.group!r} rebalanced: lost {sorted(lost)} before commit; "
                "their records will be redelivered"
            )

    def lag(self) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        with self._rconn.begin():
            for tp in sorted(self._owned):
                out[tp] = self._count_from(tp)
        return out

    def _count_from(self, tp: TopicPartition) -> int:
        return int(
            self._rconn.execute(
                select(func.count()).where(
                    and_(
                        records_table.c.topic == tp[0],
                        records_table.c.partition == tp[1],
                        records_table.c.offset >= self._positions[tp],
                    )
                )
            ).scalar()
            or 0
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._write() as conn:
                conn.execute(
                    update(leases_table)
                    .where(
                        and_(
                            leases_table.c.group_id == self.group,
                            leases_table.c.owner == self.member_id,
                        )
                    )
                    .values(owner=None, expires_at=0.0)
                )
                conn.execute(
                    delete(members_table).where(
                        and_(
                            members_table.c.group_id == self.group,
                            members_table.c.member_id == self.member_id,
                        )
                    )
                )
        finally:
            self._conn.close()
            self._rconn.close()
