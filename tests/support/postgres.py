"""A real PostgreSQL for the tests.

Uses ``WILDLOOP_TEST_POSTGRES_URL`` (an admin URL) when set; else the server on 127.0.0.1:5432
when one answers; else starts a throw-away cluster from Debian's packages on a free port. Each test
session works in a database of its own, dropped at the end. Never skips: a missing PostgreSQL is a
failure, so CI cannot pass without the PostgreSQL tests having run.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tests.support.net import free_port, port_open, wait_for_port


def _as_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextmanager
def _throwaway_cluster() -> Iterator[str]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        raise RuntimeError(
            "PostgreSQL is not installed and none is running: apt-get install -y postgresql"
        )
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="wl-pg-"))
    data = root / "data"
    port = free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    subprocess.run(
        _as_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_user(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-w",
                "start",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {root}",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        wait_for_port(port)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an admin URL (``postgresql://...``) of a running server."""
    url = os.environ.get("WILDLOOP_TEST_POSTGRES_URL")
    if url:
        yield url
    elif port_open(5432):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
    else:
        with _throwaway_cluster() as started:
            yield started


@contextmanager
def scratch_database(admin_url: str, prefix: str = "wl_test") -> Iterator[str]:
    """Create a uniquely named database, yield its URL, drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
