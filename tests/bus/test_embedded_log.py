"""The embedded log is safe for several processes on one machine."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from services.bus.embedded import EmbeddedEventLog
from tests.bus.helpers import drain
from tests.conftest import embedded_log

CTX = mp.get_context("spawn")


def _produce(path: str, name: str, n: int) -> None:
    log = embedded_log(Path(path))
    pub = log.publisher()
    for i in range(n):
        pub.publish("t", key=f"{name}-{i % 5}", value=f"{name}:{i}".encode())
        if i % 50 == 0:
            pub.flush()
    pub.close()
    log.close()


def _consume(path: str, group: str, out: str, stop_after: float) -> None:
    """Consume until ``out + '.stop'`` exists or ``stop_after`` s passed; touches
    ``out + '.ready'`` once it holds partitions."""
    log = embedded_log(Path(path))
    sub = log.subscribe(["t"], group=group)
    deadline = time.monotonic() + stop_after
    with open(out, "a") as f:
        while time.monotonic() < deadline and not Path(out + ".stop").exists():
            batch = sub.poll(timeout_s=0.2)
            if sub.assignment():
                Path(out + ".ready").touch()
            for r in batch:
                f.write((r.value or b"").decode() + "\n")
            f.flush()
            sub.commit()
    sub.close()


def test_processes_publish_concurrently_without_losing_or_reordering(tmp_path: Path) -> None:
    path = str(tmp_path / "events.db")
    embedded_log(Path(path)).ensure_topics(["t"])
    procs = [CTX.Process(target=_produce, args=(path, f"p{k}", 400)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    log = embedded_log(Path(path))
    sub = log.subscribe(["t"], group="reader")
    values = [(r.value or b"").decode() for r in drain(sub, 1200)]
    sub.close()
    assert len(values) == len(set(values)) == 1200
    for k in range(3):  # per producer and key, publish order survives
        for key in range(5):
            mine = [
                int(v.split(":")[1])
                for v in values
                if v.startswith(f"p{k}:") and int(v.split(":")[1]) % 5 == key
            ]
            assert mine == sorted(mine)


def test_consumer_processes_in_one_group_split_the_work(tmp_path: Path) -> None:
    path = str(tmp_path / "events.db")
    log = embedded_log(Path(path))
    log.ensure_topics(["t"])
    outs = [str(tmp_path / f"out{k}.txt") for k in range(2)]
    procs = [CTX.Process(target=_consume, args=(path, "g", o, 120.0)) for o in outs]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60  # process start-up is slow on a loaded machine
    while time.monotonic() < deadline and not all(Path(o + ".ready").exists() for o in outs):
        time.sleep(0.1)
    pub = log.publisher()
    for i in range(1000):
        pub.publish("t", key=f"k{i % 50}", value=f"v:{i}".encode())
    pub.close()

    def received() -> int:
        return sum(len(Path(o).read_text().split()) for o in outs if Path(o).exists())

    deadline = time.monotonic() + 60
    while received() < 1000 and time.monotonic() < deadline:
        time.sleep(0.1)
    for o in outs:
        Path(o + ".stop").touch()
    for p in procs:
        p.join(30)
    got = [Path(o).read_text().split() for o in outs]
    assert got[0] and got[1], "both members received a share"
    assert sorted(got[0] + got[1]) == sorted(f"v:{i}" for i in range(1000))


def test_a_killed_member_s_partitions_move_to_a_survivor_after_its_session_times_out(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.db"
    log: EmbeddedEventLog = embedded_log(path)
    log.ensure_topics(["t"])
    victim = CTX.Process(target=_consume, args=(str(path), "g", str(tmp_path / "v.txt"), 60))
    victim.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "v.txt.ready").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the victim owns every partition
    survivor = log.subscribe(["t"], group="g")
    survivor.poll(timeout_s=0.3)
    assert len(survivor.assignment()) < 4  # the victim still holds its share
    os.kill(victim.pid or 0, signal.SIGKILL)  # no goodbye: its leases must expire
    victim.join()
    pub = log.publisher()
    for i in range(100):
        pub.publish("t", key=f"k{i}", value=f"after:{i}".encode())
    pub.close()
    got = drain(survivor, 100, timeout_s=20)
    assert len(survivor.assignment()) == 4
    assert sorted((r.value or b"").decode() for r in got) == sorted(
        f"after:{i}" for i in range(100)
    )
    survivor.close()
