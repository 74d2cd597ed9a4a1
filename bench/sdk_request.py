"""The `openai` client's own cost per streamed request, before the request leaves.

The gateway must call vLLM through the official `openai` client (the gateway issue), and the
client's work on each request (building options, headers and URL, then handing it to aiohttp)
is on the gateway's critical path. This measures, in one process against the bench's stand-in
for vLLM on loopback, the time from calling the client to its request hook (just before aiohttp
writes the request), for:

* **SDK defaults**: `client.post("/chat/completions", ...)` with the client as the SDK builds it;
* **absolute URL**: the same with the full URL (the SDK then skips merging a relative path);
* **gateway** (`VllmBackend.stream`): absolute URL, and the SDK's telemetry headers dropped
  with `openai.Omit` (vLLM ignores them), as the gateway sends its requests.

Each variant runs ``--requests`` one-token streams in turn, in rounds that alternate the variants;
the first 50 of each round are warm-up. Usage: ``.venv/bin/python bench/sdk_request.py``
(``taskset -c 1`` to keep it off the stand-in's core).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and "gateway" would name
# bench/gateway.py instead of the package; drop the folder, add the repository's root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.append(str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import openai
from rich.console import Console
from rich.table import Table

from bench.gateway import BASE, instant_upstream, pct
from gateway.backends.base import ChatMessage, GenerationRequest, StreamEnd
from gateway.backends.vllm import VllmBackend

WARM_UP = 50


async def measure(url: str, requests: int, rounds: int) -> dict[str, list[float]]:
    marks: list[float] = []

    async def hook(_: object) -> None:
        marks.append(time.perf_counter())

    client = openai.AsyncOpenAI(
        base_url=url,
        api_key="EMPTY",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(event_hooks={"request": [hook]}),
    )
    backend = VllmBackend(url, base_model=BASE)
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 1,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def sdk(path: str) -> float:
        marks.clear()
        asked = time.perf_counter()
        sse = await client.post(
            path, cast_to=object, body=body, stream=True, stream_cls=openai.AsyncStream[object]
        )
        async for _ in sse.response.aiter_bytes():
            pass
        await sse.close()
        return marks[0] - asked

    request = GenerationRequest(
        [ChatMessage("user", "What is the capital of France?")], max_tokens=1, temperature=0.0
    )

    async def gateway() -> float:
        asked = time.perf_counter()
        sent = None
        async for item in backend.stream(request):
            if isinstance(item, StreamEnd):
                sent = item.upstream_sent_at
        assert sent is not None
        return sent - asked

    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "SDK defaults (relative path)": lambda: sdk("/chat/completions"),
        "absolute URL": lambda: sdk(f"{url}/chat/completions"),
        "gateway (VllmBackend.stream)": gateway,
    }
    found: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for name, one in variants.items():
                times = [await one() for _ in range(requests)]
                found[name] += [t * 1000 for t in times[WARM_UP:]]
    finally:
        await client.close()
        await backend.close()
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="requests per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with instant_upstream() as url:
        found = asyncio.run(measure(url, args.requests, args.rounds))
    console = Console(width=120)
    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs · "
        f"{platform.platform()} · Python {platform.python_version()} · openai {openai.__version__}"
    )
    table = Table(title="openai client: call -> request hook, per streamed request")
    for col in ("variant", "requests", "p50 ms", "p90 ms", "mean ms"):
        table.add_column(col, justify="right")
    for name, values in found.items():
        table.add_row(
            name,
            str(len(values)),
            f"{statistics.median(values):.3f}",
            f"{pct(values, 0.9):.3f}",
            f"{statistics.fmean(values):.3f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
