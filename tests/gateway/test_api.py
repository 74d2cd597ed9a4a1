"""The gateway, driven by the official ``openai`` SDK (sync and async, streaming and not) over
HTTP on loopback, serving the real SmolLM2 model through the local backend, logging to a real
embedded event log."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import openai
import pytest

from services.bus.embedded import EmbeddedEventLog
from services.events.codec import decode
from services.events.schemas import Event, FeedbackSubmitted, TurnLogged
from services.settings import GatewaySettings, WildloopSettings
from services.store import keys
from services.store.repository import Store
from tests.bus.helpers import settle
from tests.support.gateway_server import running_gateway
from tests.support.lora import build_lora_adapter
from tests.support.net import free_port

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0, "max_tokens": 12}


class Gateway:
    def __init__(
        self,
        url: str,
        settings: WildloopSettings,
        chat_key: str,
        admin_key: str,
        other_tenant_key: str,
    ) -> None:
        self.url = url
        self.settings = settings
        self.chat_key = chat_key
        self.admin_key = admin_key
        self.other_tenant_key = other_tenant_key

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.chat_key, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.chat_key, max_retries=0)

    def raw_stream(self, text: str, max_tokens: int) -> AbstractContextManager[httpx.Response]:
        """A greedy streamed chat request over plain HTTP, to read the SSE lines as sent."""
        return httpx.stream(
            "POST",
            f"{self.url}/v1/chat/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "stream": True,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": text}],
            },
            headers={"Authorization": f"Bearer {self.chat_key}"},
            timeout=60,
        )

    def logged(self) -> list[Event]:
        """Every event the gateway has delivered to the bus so far (waits for the outbox)."""
        time.sleep(0.3)
        log = EmbeddedEventLog(self.settings.event_log_path)
        t = self.settings.topics
        sub = log.subscribe(
            [t.chat_turns, t.explicit_feedback, t.adapter_events],
            group=f"check-{time.monotonic_ns()}",
        )
        events = [decode(r.value) for r in settle(sub, timeout_s=3)]
        sub.close()
        log.close()
        return events

    def turns(self, conversation: str) -> list[TurnLogged]:
        return sorted(
            (
                e
                for e in self.logged()
                if isinstance(e, TurnLogged) and e.conversation_id == conversation
            ),
            key=lambda e: e.turn,
        )


@pytest.fixture(scope="module")
def gateway(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("gateway")
    settings = WildloopSettings(
        data_dir=data,
        base_model_path=base_model_dir,
        gateway=GatewaySettings(port=free_port(), max_body_bytes=64 * 1024),
        log_format="console",
    )
    store = Store.open(settings.store_url)
    chat_key, _ = keys.create_key(store, tenant_id="acme", name="chat")
    admin_key, _ = keys.create_key(
        store, tenant_id="acme", name="ops", scopes=frozenset({"chat", "admin"})
    )
    other, _ = keys.create_key(store, tenant_id="globex")
    store.close()
    with running_gateway(settings) as url:
        yield Gateway(url, settings, chat_key, admin_key, other)


def ask(
    client: openai.OpenAI, text: str, model: str = "SmolLM2-135M-Instruct", **kw: object
) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": text}],  # type: ignore[list-item]
        **{**GREEDY, **kw},  # type: ignore[arg-type]
    )
    completion = raw.parse()
    return completion.choices[0].message.content or "", raw.headers["x-conversation-id"]


# --- chat ----------------------------------------------------------------------------------------


def test_a_chat_completion_answers_and_logs_both_turns(gateway: Gateway) -> None:
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        **GREEDY,  # type: ignore[arg-type]
    )
    completion = raw.parse()
    answer = completion.choices[0].message.content or ""
    assert "Paris" in answer
    assert completion.usage and completion.usage.completion_tokens > 0
    conversation = raw.headers["x-conversation-id"]
    logged = gateway.turns(conversation)
    assert [(t.turn, t.role.value, t.content) for t in logged] == [
        (0, "user", "What is the capital of France?"),
        (1, "assistant", answer),
    ]
    assistant = logged[1]
    assert assistant.tenant_id == "acme" and assistant.model == "SmolLM2-135M-Instruct"
    assert assistant.latency_ms and assistant.latency_ms > 0
    assert assistant.prompt_tokens == completion.usage.prompt_tokens
    assert assistant.completion_tokens == completion.usage.completion_tokens
    assert not assistant.partial


def test_streaming_matches_the_non_streamed_answer_and_reports_usage(gateway: Gateway) -> None:
    async def run() -> tuple[str, str, list[openai.types.chat.ChatCompletionChunk]]:
        client = gateway.async_client()
        messages = [{"role": "user", "content": "Name three colours."}]
        full = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            **GREEDY,  # type: ignore[arg-type]
        )
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
            **GREEDY,  # type: ignore[arg-type]
        )
        chunks = [c async for c in stream]
        await client.close()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return full.choices[0].message.content or "", text, chunks

    full, streamed, chunks = asyncio.run(run())
    assert streamed == full and streamed
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_a_stream_ends_by_telling_how_long_the_gateway_waited_and_what_it_added(
    gateway: Gateway,
) -> None:
    started = time.perf_counter()
    with gateway.raw_stream("Name three colours.", max_tokens=8) as response:
        lines = [line for line in response.iter_lines() if line]
    total_ms = (time.perf_counter() - started) * 1000
    comments = dict(line[2:].split("=") for line in lines if line.startswith(": "))
    waited, span = float(comments["upstream-ms"]), float(comments["upstream-span-ms"])
    own = float(comments["gateway-ms"])
    # SSE comments (which clients skip) after the last chunk, just before the end
    data = [i for i, line in enumerate(lines) if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]"
    assert all(data[-1] < i < len(lines) - 1 for i, x in enumerate(lines) if x.startswith(": "))
    assert 0 < waited <= span < total_ms
    # the gateway's own share of the wait lies within what the client saw outside the span
    assert 0 < own < total_ms - span


def test_a_slow_client_s_upload_is_not_counted_as_the_gateway_s_time(gateway: Gateway) -> None:
    body = json.dumps(
        {
            "model": "SmolLM2-135M-Instruct",
            "stream": True,
            "max_tokens": 2,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Hi."}],
        }
    ).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + f"Host: {host}\r\nAuthorization: Bearer {gateway.chat_key}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
        )
        time.sleep(0.5)  # the headers are in; the body comes half a second later
        conn.sendall(body)
        received = b""
        while b"data: [DONE]" not in received:
            piece = conn.recv(65536)
            assert piece, received
            received += piece
    own_ms = float(received.split(b": gateway-ms=")[1].split(b"\n")[0])
    assert 0 < own_ms < 250


def test_sampling_parameters_pass_through(gateway: Gateway) -> None:
    client = gateway.client()
    short = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Count to 20."}],
        max_tokens=3,
        temperature=0,
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage and short.usage.completion_tokens <= 3
    seeded = [
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Say hi."}],
            temperature=1.0,
            top_p=0.9,
            seed=7,
            max_tokens=8,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_a_stateless_client_resending_history_stays_in_one_conversation(
    gateway: Gateway,
) -> None:
    client = gateway.client()
    first, conversation = ask(client, "Hello there, who are you?")
    raw = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct",
        messages=[
            {"role": "user", "content": "Hello there, who are you?"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Thanks! What can you do?"},
        ],
        **GREEDY,  # type: ignore[arg-type]
    )
    assert raw.headers["x-conversation-id"] == conversation
    assert [t.turn for t in gateway.turns(conversation)] == [0, 1, 2, 3]


def test_an_explicit_conversation_id_is_honoured_and_a_regeneration_branches(
    gateway: Gateway,
) -> None:
    client = gateway.client()
    headers = {"X-Conversation-Id": "my-conv-1"}
    raw = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Hi!"}],
        extra_headers=headers,
        **GREEDY,  # type: ignore[arg-type]
    )
    assert raw.headers["x-conversation-id"] == "my-conv-1"
    again = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Hi!"}],
        extra_headers=headers,
        **GREEDY,  # type: ignore[arg-type]
    )
    assert again.headers["x-conversation-id"].startswith("my-conv-1~")


# --- models and adapters -------------------------------------------------------------------------


def test_models_lists_the_base_model_and_the_alias(gateway: Gateway) -> None:
    ids = [m.id for m in gateway.client().models.list()]
    assert ids[:2] == ["SmolLM2-135M-Instruct", "wildloop"]
    answer, _ = ask(gateway.client(), "Say hello.")
    via_alias = gateway.client().chat.completions.create(
        model="wildloop",
        messages=[{"role": "user", "content": "Say hello."}],
        **GREEDY,  # type: ignore[arg-type]
    )
    assert via_alias.choices[0].message.content == answer  # no production adapter: base model


def test_an_admin_loads_an_adapter_at_run_time_and_chat_uses_it(
    gateway: Gateway, base_model_dir: Path, tmp_path: Path
) -> None:
    adapter = build_lora_adapter(base_model_dir, tmp_path / "ad1", seed=3)
    body = {"lora_name": "ad1", "lora_path": str(adapter)}
    denied = httpx.post(
        f"{gateway.url}/v1/load_lora_adapter",
        json=body,
        headers={"Authorization": f"Bearer {gateway.chat_key}"},
    )
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope"
    loaded = httpx.post(
        f"{gateway.url}/v1/load_lora_adapter",
        json=body,
        headers={"Authorization": f"Bearer {gateway.admin_key}"},
        timeout=60,
    )
    assert loaded.status_code == 200, loaded.text
    assert "ad1" in [m.id for m in gateway.client().models.list()]

    base, _ = ask(gateway.client(), "What is the capital of France?")
    tuned_raw = gateway.client().chat.completions.with_raw_response.create(
        model="ad1",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        **GREEDY,  # type: ignore[arg-type]
    )
    assert tuned_raw.parse().choices[0].message.content != base
    logged = gateway.turns(tuned_raw.headers["x-conversation-id"])
    assert logged[-1].adapter_id == "ad1"

    httpx.post(
        f"{gateway.url}/v1/unload_lora_adapter",
        json={"lora_name": "ad1"},
        headers={"Authorization": f"Bearer {gateway.admin_key}"},
        timeout=60,
    )
    with pytest.raises(openai.NotFoundError):
        ask(gateway.client(), "hi", model="ad1")


# --- feedback and tenancy ------------------------------------------------------------------------


def test_explicit_feedback_is_accepted_and_logged(gateway: Gateway) -> None:
    _, conversation = ask(gateway.client(), "Tell me a joke.")
    response = httpx.post(
        f"{gateway.url}/v1/feedback",
        json={"conversation_id": conversation, "turn": 1, "rating": "down", "comment": "meh"},
        headers={"Authorization": f"Bearer {gateway.chat_key}"},
    )
    assert response.status_code == 201, response.text
    feedback = [
        e
        for e in gateway.logged()
        if isinstance(e, FeedbackSubmitted) and e.conversation_id == conversation
    ]
    assert [(f.turn, f.rating.value, f.comment, f.tenant_id) for f in feedback] == [
        (1, "down", "meh", "acme")
    ]


def test_requests_without_a_valid_key_are_refused_in_openai_s_format(gateway: Gateway) -> None:
    for key in ("wl-nope.nope", ""):
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": "wildloop", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        gateway.client("wl-wrong.key").models.list()


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "invalid JSON"),
        (json.dumps({"model": "wildloop", "messages": []}).encode(), 400, "messages"),
        (
            json.dumps(
                {"model": "wildloop", "messages": [{"role": "robot", "content": "x"}]}
            ).encode(),
            400,
            "role",
        ),
        (
            json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "does not exist",
        ),
        (
            json.dumps(
                {"model": "wildloop", "messages": [{"role": "user", "content": "x"}], "n": 2}
            ).encode(),
            400,
            "n",
        ),
        (
            json.dumps(
                {
                    "model": "wildloop",
                    "messages": [
                        {"role": "user", "content": "x"},
                        {"role": "assistant", "content": "y"},
                    ],
                }
            ).encode(),
            400,
            "last message",
        ),
        (
            json.dumps(
                {"model": "wildloop", "messages": [{"role": "user", "content": "x" * 70_000}]}
            ).encode(),
            413,
            "exceeds",
        ),
    ],
    ids=[
        "invalid-json",
        "no-messages",
        "unknown-role",
        "unknown-model",
        "n=2",
        "last-not-user",
        "oversized",
    ],
)
def test_bad_requests_get_a_clear_openai_error_and_log_nothing(
    gateway: Gateway, body: bytes, status: int, fragment: str
) -> None:
    before = len(gateway.logged())
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {gateway.chat_key}", "Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] or fragment == error.get("param")
    assert set(error) >= {"message", "type"}
    assert len(gateway.logged()) == before


def test_a_stream_the_backend_refuses_gets_the_same_http_error_as_a_plain_request(
    gateway: Gateway,
) -> None:
    # The backend finds max_tokens too large for the context only once it plans the generation:
    # a streamed request still gets an HTTP 400 in OpenAI's shape, not a 200 and an error event.
    client = gateway.client()
    before = len(gateway.logged())
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="maximum context length") as refused:
            client.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": "Write a very long story."}],
                max_tokens=100_000,
                stream=stream,
            )
        assert refused.value.status_code == 400
    assert len(gateway.logged()) == before


def test_a_stream_opens_with_the_assistant_role_event_then_the_tokens(gateway: Gateway) -> None:
    with gateway.raw_stream("Name three colours.", max_tokens=4) as response:
        chunks = [c for c in response.iter_bytes() if c]
    events = [
        json.loads(line[6:])
        for line in b"".join(chunks).decode().splitlines()
        if line.startswith("data: {")
    ]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"]["content"]


def test_a_client_that_disconnects_mid_stream_leaves_a_partial_answer_marked_as_such(
    gateway: Gateway,
) -> None:
    with gateway.raw_stream("Write a long story.", max_tokens=200) as response:
        conversation = response.headers["x-conversation-id"]
        lines = response.iter_lines()
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break  # got real text; now hang up
    deadline = time.monotonic() + 20
    answer: list[TurnLogged] = []
    while not answer and time.monotonic() < deadline:
        answer = [t for t in gateway.turns(conversation) if t.role.value == "assistant"]
    assert answer and answer[0].partial and answer[0].content


def test_a_client_that_leaves_before_a_plain_answer_stops_generation_and_logs_nothing(
    gateway: Gateway,
) -> None:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "max_tokens": 1500,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, one per line."}],
    }
    headers = {"Authorization": f"Bearer {gateway.chat_key}", "X-Conversation-Id": "gone-1"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=2)

    deadline = time.monotonic() + 10
    counted = 'wildloop_gateway_client_disconnects_total{stream="false"} 1.0'
    while counted not in httpx.get(f"{gateway.url}/metrics").text:
        assert time.monotonic() < deadline, "the gateway did not notice the client leaving"
        time.sleep(0.2)
    started = time.monotonic()
    ask(gateway.client(), "ping")  # the model is free again: 1,500 tokens would take minutes
    assert time.monotonic() - started < 30
    assert gateway.turns("gone-1") == []


# --- operations ----------------------------------------------------------------------------------


def test_health_readiness_and_metrics(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz").json()
    assert ready["status"] == "ready" and ready["backend"]
    ask(gateway.client(), "ping")
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'wildloop_gateway_requests_total{adapter="",model="SmolLM2-135M-Instruct",' in text
    assert "wildloop_gateway_request_duration_seconds_bucket" in text
    assert "wildloop_gateway_outbox_depth_events" in text
    assert 'wildloop_gateway_tokens_total{kind="completion"}' in text
    # the event loop's lateness is sampled from start-up on (gateway.loop_lag)
    counted = re.search(r"^wildloop_gateway_event_loop_lag_seconds_count (\S+)$", text, re.M)
    assert counted is not None and float(counted.group(1)) >= 1


def critical_path_counts(gateway: Gateway) -> dict[str, float]:
    """``wildloop_gateway_critical_path_seconds_count`` by its ``stream`` label."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
        if line.startswith("wildloop_gateway_critical_path_seconds_count{"):
            label, value = line.split("}")
            counts[label.split('"')[1]] = float(value)
    return counts


def test_answered_chat_requests_record_the_gateway_s_critical_path(gateway: Gateway) -> None:
    before = critical_path_counts(gateway)
    ask(gateway.client(), "ping")
    with gateway.raw_stream("ping", max_tokens=2) as response:
        assert response.status_code == 200
        list(response.iter_lines())
    with pytest.raises(openai.NotFoundError):  # never reached the backend: not counted
        ask(gateway.client(), "ping", model="no-such-model")
    after = critical_path_counts(gateway)
    assert after["false"] - before.get("false", 0) == 1
    assert after["true"] - before.get("true", 0) == 1
