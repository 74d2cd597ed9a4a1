"""``wildloop serve gateway --workers 2``: two gateway processes on one port, in front of the
session's real vLLM server, driven by the official ``openai`` SDK.

Each request goes through a fresh client, so a new connection, which either worker may accept.
What must hold however requests are spread: a stateless client keeps its conversation, every
turn is logged exactly once, ``/metrics`` counts the requests of both workers, and when the worker
that drains the shared outbox dies, the other takes over. Also here: what only a served gateway
does, freezing its start-up objects out of the garbage collector.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from services.events.schemas import TurnLogged
from services.settings import WildloopSettings
from services.store import keys
from services.store.repository import Store
from tests.cli_helpers import WILDLOOP, run, wildloop_env
from tests.gateway.test_vllm_gateway import logged_events
from tests.support.net import free_port
from tests.support.vllm_server import VllmServer

BASE = "SmolLM2-135M-Instruct"
GREEDY = {"temperature": 0.0, "max_tokens": 8}


class Workers:
    def __init__(
        self, url: str, settings: WildloopSettings, key: str, admin_key: str, log: Path
    ) -> None:
        self.url, self.settings, self.log = url, settings, log
        self.key, self.admin_key = key, admin_key

    def chat(
        self, messages: list[dict[str, str]], model: str = BASE, **extra: object
    ) -> tuple[str, str]:
        """(conversation id, answer) of one request on a new connection."""
        with openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                **{**GREEDY, **extra},  # type: ignore[arg-type]
            )
        return raw.headers["x-conversation-id"], raw.parse().choices[0].message.content or ""

    def drainer_pids(self) -> list[int]:
        """Pids that logged becoming the outbox drainer, in order."""
        pids = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            if "outbox drainer elected" in line:
                pids.append(int(json.loads(line)["pid"]))
        return pids

    def turns(self) -> list[TurnLogged]:
        return [e for e in logged_events(self.settings) if isinstance(e, TurnLogged)]


def wait_for(condition, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def workers(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    data_dir = tmp_path_factory.mktemp("gateway-workers")
    settings = WildloopSettings(data_dir=data_dir)
    store = Store.open(settings.store_url)
    key, _ = keys.create_key(store, tenant_id="acme", name="chat")
    admin_key, _ = keys.create_key(
        store, tenant_id="acme", name="ops", scopes=frozenset({"chat", "admin"})
    )
    store.close()
    port = free_port()
    log = data_dir / "gateway.log"
    env = wildloop_env(
        data_dir,
        WILDLOOP_VLLM_URL=vllm_server.base_url,
        WILDLOOP_LOG_FORMAT="json",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path_factory.mktemp("metrics")),
    )
    with log.open("w") as out:
        proc = subprocess.Popen(
            [WILDLOOP, "serve", "gateway", "--workers", "2", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout_s=120)
        yield Workers(url, settings, key, admin_key, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_a_stateless_client_keeps_its_conversation_and_every_turn_is_logged_once(
    workers: Workers,
) -> None:
    conversations = {}
    for topic in ("rust", "tea", "rome", "jazz"):
        messages = [{"role": "user", "content": f"Say one word about {topic}."}]
        ids = []
        for follow in ("And another?", "One more."):
            conversation, answer = workers.chat(messages)
            ids.append(conversation)
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": follow},
            ]
        conversation, _ = workers.chat(messages)
        ids.append(conversation)
        assert len(set(ids)) == 1, f"{topic}: one conversation across requests, got {ids}"
        conversations[ids[0]] = topic
    assert len(conversations) == 4

    wait_for(lambda: len(workers.turns()) >= 24)
    time.sleep(1)  # anything duplicated would arrive by now
    turns = workers.turns()
    assert len(turns) == 24 == len({t.event_id for t in turns})
    for conversation in conversations:
        logged = sorted(t.turn for t in turns if t.conversation_id == conversation)
        assert logged == list(range(6))

    metrics = httpx.get(f"{workers.url}/metrics").text
    served = sum(
        float(v)
        for v in re.findall(
            r'wildloop_gateway_requests_total\{[^}]*route="/v1/chat/completions"[^}]*\} (\S+)',
            metrics,
        )
    )
    assert served == 12  # both workers' requests, whichever served them
    assert re.search(r"^wildloop_gateway_outbox_depth_events 0\.0$", metrics, re.MULTILINE)


@pytest.mark.slow
def test_when_the_draining_worker_dies_another_delivers_the_turns(workers: Workers) -> None:
    wait_for(lambda: len(workers.drainer_pids()) >= 1)
    before = len(workers.turns())
    os.kill(workers.drainer_pids()[-1], signal.SIGKILL)
    for topic in ("kites", "owls", "figs"):
        workers.chat([{"role": "user", "content": f"Name a colour for {topic}."}])
    wait_for(lambda: len(workers.turns()) >= before + 6)
    pids = workers.drainer_pids()
    assert len(pids) >= 2 and pids[-1] != pids[-2], "another process became the drainer"


@pytest.mark.slow
def test_an_adapter_loaded_through_one_worker_is_served_at_once_by_every_worker(
    workers: Workers, lora_adapter: Path, adapter_name: str
) -> None:
    question = [{"role": "user", "content": "Say hi."}]
    # each worker looks the name up and keeps the answer (no such model) for a while
    for _ in range(6):
        with pytest.raises(openai.NotFoundError):
            workers.chat(question, model=adapter_name)
    admin = {"Authorization": f"Bearer {workers.admin_key}"}
    loaded = httpx.post(
        f"{workers.url}/v1/load_lora_adapter",
        json={"lora_name": adapter_name, "lora_path": str(lora_adapter)},
        headers=admin,
        timeout=120,
    )
    assert loaded.status_code == 200, loaded.text
    try:
        for _ in range(6):  # on new connections: either worker answers
            _, answer = workers.chat(question, model=adapter_name, max_tokens=1)
            assert answer
    finally:
        unloaded = httpx.post(
            f"{workers.url}/v1/unload_lora_adapter",
            json={"lora_name": adapter_name},
            headers=admin,
            timeout=60,
        )
        assert unloaded.status_code == 200, unloaded.text


def test_several_workers_are_refused_for_the_local_backend(tmp_path: Path) -> None:
    """Each worker would hold its own copy of the model, and an adapter loaded at run time would
    reach one of them only."""
    done = run(tmp_path, "serve", "gateway", "--workers", "2", "--port", str(free_port()))
    assert done.returncode == 2
    assert "several gateway workers need the vLLM backend" in done.stderr


@pytest.mark.anyio
async def test_a_served_gateway_freezes_its_start_up_objects_out_of_the_collector(
    tmp_path: Path,
) -> None:
    """``wildloop serve gateway`` (``freeze_gc``): objects alive after start-up are moved to the
    collector's permanent generation, so full collections stop walking them mid-request."""
    from gateway.app import create_app  # noqa: PLC0415
    from gateway.backends.vllm import VllmBackend  # noqa: PLC0415

    settings = WildloopSettings(data_dir=tmp_path)
    nowhere = VllmBackend(f"http://127.0.0.1:{free_port()}/v1", base_model=BASE)  # lazy
    app = create_app(settings, backend=nowhere, freeze_gc=True)
    try:
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()  # this test process keeps collecting as before
