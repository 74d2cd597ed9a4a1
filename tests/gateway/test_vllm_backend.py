"""``VllmBackend`` against a real vLLM CPU server serving SmolLM2-135M-Instruct, with a LoRA
adapter trained by TRL's ``DPOTrainer`` and loaded at run time.

What every backend does is checked in ``test_backends.py``; this module covers what is vLLM's
own: the runtime LoRA endpoints and ``/v1/models``, vLLM's error bodies, the request abort when a
stream is closed, and the HTTP failure modes. One server is started per session (~50-90 s to
start, ~3.5 GB RSS); the transport tests at the end need no server.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.backends.base import (
    AdapterLoadError,
    BackendTimeoutError,
    BackendUnavailableError,
    ChatMessage,
    GenerationRequest,
    InvalidGenerationError,
    StreamEnd,
    StreamItem,
    TextDelta,
    UnknownAdapterError,
)
from gateway.backends.vllm import VllmBackend
from tests.support.lingering_sse import lingering_sse_server
from tests.support.net import free_port
from tests.support.vllm_server import VllmServer

pytestmark = pytest.mark.anyio

FRANCE = [ChatMessage("user", "What is the capital of France?")]
STORY = [ChatMessage("user", "Write a very long story about a dragon.")]
GREEDY = GenerationRequest(FRANCE, temperature=0.0, max_tokens=24)


@pytest.fixture
async def vllm(vllm_server: VllmServer) -> AsyncIterator[VllmBackend]:
    backend = VllmBackend(vllm_server.base_url, base_model=vllm_server.served_name)
    await backend.start()
    yield backend
    await backend.close()


async def collect(stream: AsyncIterator[StreamItem]) -> list[StreamItem]:
    return [item async for item in stream]


def metric(server: VllmServer, name: str) -> float:
    """A metric from the server's Prometheus endpoint, summed over its label sets."""
    with urllib.request.urlopen(f"{server.root_url}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name)]
    assert values, f"{name} is not in /metrics"
    return sum(values)


# --- the base model ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_serves_the_base_model_and_lists_it_as_no_adapter(
    vllm: VllmBackend, vllm_server: VllmServer
) -> None:
    assert await vllm.ready()
    assert vllm_server.served_name not in await vllm.adapters()

    done = await vllm.complete(GREEDY)
    assert "Paris" in done.text
    assert done.finish_reason == "stop"
    assert done.prompt_tokens > 10
    assert 0 < done.completion_tokens <= 24

    cut = await vllm.complete(GenerationRequest(FRANCE, temperature=0.0, max_tokens=2))
    assert (cut.finish_reason, cut.completion_tokens) == ("length", 2)


@pytest.mark.slow
async def test_sampling_parameters_reach_the_server(vllm: VllmBackend) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return GenerationRequest(STORY, temperature=1.0, top_p=0.95, max_tokens=16, seed=seed)

    first, again, other = [await vllm.complete(sampled(seed)) for seed in (7, 7, 8)]
    assert first.text == again.text
    assert first.text != other.text

    # Values that vLLM rejects show that each parameter is sent at all.
    with pytest.raises(InvalidGenerationError, match="top_p"):
        await vllm.complete(GenerationRequest(FRANCE, top_p=1.5))
    with pytest.raises(InvalidGenerationError, match="temperature"):
        await vllm.complete(GenerationRequest(FRANCE, temperature=-1.0))
    with pytest.raises(InvalidGenerationError, match="max_tokens"):
        await vllm.complete(GenerationRequest(FRANCE, max_tokens=5000))


@pytest.mark.slow
async def test_stream_ends_with_the_usage_of_the_final_chunk(vllm: VllmBackend) -> None:
    whole = await vllm.complete(GREEDY)

    started = time.perf_counter()
    *deltas, end = await collect(vllm.stream(GREEDY))
    elapsed = time.perf_counter() - started

    assert len(deltas) > 1 and all(isinstance(d, TextDelta) for d in deltas)
    assert end == StreamEnd("stop", whole.prompt_tokens, whole.completion_tokens)
    short = await collect(vllm.stream(GenerationRequest(FRANCE, temperature=0.0, max_tokens=3)))
    assert short[-1] == StreamEnd("length", whole.prompt_tokens, 3)
    # the time blocked on vLLM is reported, and it leaves out the backend's own work
    assert isinstance(end, StreamEnd) and end.upstream_s is not None
    assert 0 < end.upstream_s < elapsed
    assert whole.upstream_s is not None and whole.upstream_s > 0
    # and so are the moments the request went out and the last piece came in
    assert end.upstream_sent_at is not None and end.upstream_last_at is not None
    assert started < end.upstream_sent_at < end.upstream_last_at < started + elapsed
    assert end.upstream_s <= end.upstream_last_at - end.upstream_sent_at
    assert whole.upstream_sent_at is not None and whole.upstream_last_at is not None
    assert whole.upstream_sent_at < whole.upstream_last_at


@pytest.mark.slow
async def test_closing_a_stream_aborts_the_request_in_vllm(
    vllm: VllmBackend, vllm_server: VllmServer
) -> None:
    stream = vllm.stream(GenerationRequest(STORY, max_tokens=1500, seed=1))
    assert isinstance(await anext(stream), TextDelta)
    assert metric(vllm_server, "vllm:num_requests_running") == 1

    await stream.aclose()

    # 1,500 tokens take over a minute here; an aborted request leaves the engine at once.
    deadline = time.monotonic() + 10
    while metric(vllm_server, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "vLLM kept generating after the client left"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_too_long_prompt_is_an_invalid_generation(vllm: VllmBackend) -> None:
    too_long = GenerationRequest([ChatMessage("user", "hello " * 3000)], max_tokens=8)

    with pytest.raises(InvalidGenerationError, match="maximum context length"):
        await vllm.complete(too_long)
    with pytest.raises(InvalidGenerationError, match="maximum context length"):
        await collect(vllm.stream(too_long))


@pytest.mark.slow
async def test_a_base_model_the_server_does_not_serve_is_unavailable(
    vllm_server: VllmServer,
) -> None:
    backend = VllmBackend(vllm_server.base_url, base_model="no-such-model")
    try:
        assert not await backend.ready()
        with pytest.raises(BackendUnavailableError, match="base model"):
            await backend.complete(GREEDY)
    finally:
        await backend.close()


# --- adapters loaded at run time --------------------------------------------------------------


@pytest.mark.slow
async def test_dpo_trained_adapter_loads_serves_and_unloads(
    vllm: VllmBackend, dpo_adapter: Path, adapter_name: str
) -> None:
    on_adapter = GenerationRequest(FRANCE, adapter=adapter_name, temperature=0.0, max_tokens=24)

    await vllm.load_adapter(adapter_name, str(dpo_adapter))
    assert (await vllm.adapters())[adapter_name] == str(dpo_adapter)
    assert await vllm.ready()
    assert (await vllm.complete(on_adapter)).completion_tokens > 0
    streamed = await collect(vllm.stream(on_adapter))
    assert isinstance(streamed[-1], StreamEnd) and streamed[-1].completion_tokens > 0

    await vllm.load_adapter(adapter_name, str(dpo_adapter))  # again: replaced in place
    assert list(await vllm.adapters()).count(adapter_name) == 1
    assert (await vllm.complete(on_adapter)).completion_tokens > 0

    await vllm.unload_adapter(adapter_name)
    assert adapter_name not in await vllm.adapters()
    with pytest.raises(UnknownAdapterError):
        await vllm.complete(on_adapter)
    with pytest.raises(UnknownAdapterError):
        await collect(vllm.stream(on_adapter))
    with pytest.raises(UnknownAdapterError):
        await vllm.unload_adapter(adapter_name)
    assert "Paris" in (await vllm.complete(GREEDY)).text


@pytest.mark.slow
async def test_an_adapter_another_process_loaded_is_found_when_asked_fresh(
    vllm_server: VllmServer, vllm: VllmBackend, lora_adapter: Path, adapter_name: str
) -> None:
    # two gateway workers, each with its own backend and its own recent copy of the list
    other = VllmBackend(vllm_server.base_url, base_model=vllm_server.served_name)
    try:
        assert adapter_name not in await vllm.adapters()  # this worker's copy is now warm
        await other.load_adapter(adapter_name, str(lora_adapter))
        assert (await vllm.adapters(fresh=True))[adapter_name] == str(lora_adapter)
        await other.unload_adapter(adapter_name)
    finally:
        await other.close()


@pytest.mark.slow
async def test_a_folder_without_an_adapter_is_an_adapter_load_error(
    vllm: VllmBackend, adapter_name: str, tmp_path: Path
) -> None:
    with pytest.raises(AdapterLoadError, match="No adapter found"):
        await vllm.load_adapter(adapter_name, str(tmp_path / "missing"))
    assert adapter_name not in await vllm.adapters()
    assert await vllm.ready()


# --- transport failures (no server needed) ----------------------------------------------------


async def test_an_unreachable_server_is_unavailable() -> None:
    backend = VllmBackend(f"http://127.0.0.1:{free_port()}/v1", base_model="m", timeout_s=5)
    try:
        assert not await backend.ready()
        with pytest.raises(BackendUnavailableError):
            await backend.complete(GREEDY)
        with pytest.raises(BackendUnavailableError):
            await collect(backend.stream(GREEDY))
        with pytest.raises(BackendUnavailableError):
            await backend.adapters()
        with pytest.raises(BackendUnavailableError):
            await backend.load_adapter("a", "/nowhere")
        with pytest.raises(BackendUnavailableError):
            await backend.unload_adapter("a")
    finally:
        await backend.close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers, like a hung server."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"


async def test_a_server_that_does_not_answer_times_out(silent_server: str) -> None:
    backend = VllmBackend(silent_server, base_model="m", timeout_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(BackendTimeoutError):
            await backend.complete(GREEDY)
        with pytest.raises(BackendTimeoutError):
            await collect(backend.stream(GREEDY))
        with pytest.raises(BackendTimeoutError):
            await backend.load_adapter("a", "/nowhere")
        assert not await backend.ready()
        assert time.monotonic() - started < 10
    finally:
        await backend.close()


async def test_sse_payloads_are_found_however_the_bytes_are_split() -> None:
    from gateway.backends.vllm import _sse_data  # noqa: PLC0415 - the stream's line splitter

    body = b'data: {"a":1}\n\n: upstream comment\n\ndata: {"b":"x\\ny"}\r\n\r\ndata: [DONE]\n\n'

    async def pieces(cut: int) -> AsyncIterator[bytes]:
        yield body[:cut]
        yield body[cut:]

    for cut in range(len(body) + 1):
        got = [data async for data in _sse_data(pieces(cut))]
        assert got == [b'{"a":1}', b'{"b":"x\\ny"}', b"[DONE]"], cut


async def test_only_time_spent_waiting_for_the_server_counts_as_upstream() -> None:
    from gateway.backends.vllm import _sse_data, _Wait  # noqa: PLC0415

    async def slow_server() -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0.05)
            yield f"data: {i}\n\n".encode()

    wait = _Wait()
    async for _ in _sse_data(slow_server(), wait):
        time.sleep(0.05)  # the gateway's own work on a chunk: not upstream time
    assert 0.15 <= wait.seconds < 0.25


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An OpenAI-shaped loopback server that answers every chat request with one token and
    records each request's path and headers (lower-cased names)."""
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({":path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
            if body.get("stream"):
                events = [
                    {**chunk, "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
                    {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
                ]
                payload = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
                payload += b"data: [DONE]\n\n"
                kind = "text/event-stream"
            else:
                answer = {
                    **chunk,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Hi"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                }
                payload, kind = json.dumps(answer).encode(), "application/json"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()
    thread.join(10)


async def test_requests_carry_no_sdk_telemetry_headers(
    recording_server: tuple[str, list[dict[str, str]]],
) -> None:
    url, seen = recording_server
    backend = VllmBackend(url, base_model="m", api_key="secret", timeout_s=10)
    try:
        assert (await backend.complete(GREEDY)).text == "Hi"
        items = await collect(backend.stream(GREEDY))
        assert [i.text for i in items if isinstance(i, TextDelta)] == ["Hi"]
    finally:
        await backend.close()
    assert [r[":path"] for r in seen] == ["/v1/chat/completions"] * 2
    for request in seen:
        assert request["authorization"] == "Bearer secret"
        assert request["content-type"] == "application/json"
        assert not [name for name in request if name.startswith("x-stainless")]


async def test_a_stream_ends_at_done_and_then_keeps_its_connection() -> None:
    """vLLM writes ``[DONE]`` and the end of its HTTP body separately: the backend's StreamEnd
    comes at ``[DONE]``; iterating on reads the body to its end, so the next request reuses the
    connection."""
    with lingering_sse_server(linger_s=1.5) as server:
        backend = VllmBackend(server.url, base_model=server.model, timeout_s=10)
        try:
            for _ in range(2):
                started = time.monotonic()
                stream = backend.stream(GREEDY)
                items = []
                async for item in stream:
                    items.append(item)
                    if isinstance(item, StreamEnd):
                        break
                assert time.monotonic() - started < 1.0  # not held until the body's end
                assert [i.text for i in items if isinstance(i, TextDelta)] == ["Hi"]
                assert items[-1] == StreamEnd("stop", 3, 1)
                assert await collect(stream) == []  # the rest: the end of the body
                assert time.monotonic() - started >= 1.5
        finally:
            await backend.close()
        assert server.connection_count == 1
