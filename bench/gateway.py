"""What the gateway adds to a request: latency and throughput, straight vs. through it.

One run, per concurrency level (default 1, 8 and 32 concurrent clients), sends the same request
mix (short chat prompts, greedy, ``--max-tokens`` tokens):

* **straight** to the backend: the local transformers+PEFT backend called in-process (or, with
  ``--vllm-url``, a vLLM server through the ``openai`` client);
* **through** the gateway: ``wildloop serve gateway`` in its own process in front of the same
  backend, with API-key auth and turn logging (outbox -> embedded event log) on, called over HTTP.

The gateway's *added latency* is measured per request, paired: the client's wall time minus the
time the gateway spent waiting on the backend, which it reports in ``X-Upstream-Ms``. This
excludes queueing inside the model (which dominates at 32 clients on a CPU) and includes HTTP,
JSON, auth, routing and logging. Straight and through throughputs are printed side by side.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and "gateway" would name this file
# instead of the package; drop the folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

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


@dataclass
class Run:
    latencies_ms: list[float]
    added_ms: list[float]
    seconds: float

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def drive(concurrency: int, total: int, one: object) -> Run:
    """``total`` requests from ``concurrency`` clients; ``one(i)`` -> (latency_ms, added_ms)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    latencies: list[float] = []
    added: list[float] = []

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            latency, extra = await one(i)  # type: ignore[operator]
            latencies.append(latency)
            if extra is not None:
                added.append(extra)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Run(latencies, added, time.perf_counter() - started)


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


async def straight_local(
    model_dir: Path, levels: list[int], per_client: int, max_tokens: int
) -> dict[int, Run]:
    from gateway.backends.base import ChatMessage, GenerationRequest  # noqa: PLC0415
    from gateway.backends.local import LocalBackend  # noqa: PLC0415

    backend = LocalBackend(model_dir, base_model=BASE, timeout_s=3600)
    await backend.start()

    async def one(i: int) -> tuple[float, None]:
        request = GenerationRequest(
            messages=[ChatMessage("user", PROMPTS[i % len(PROMPTS)])],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        t = time.perf_counter()
        await backend.complete(request)
        return (time.perf_counter() - t) * 1000, None

    try:
        await drive(1, 2, one)  # warm-up
        return {c: await drive(c, c * per_client, one) for c in levels}
    finally:
        await backend.close()


async def straight_vllm(
    url: str, levels: list[int], per_client: int, max_tokens: int
) -> dict[int, Run]:
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=600) as http:

        async def one(i: int) -> tuple[float, None]:
            t = time.perf_counter()
            r = await http.post(
                "/chat/completions",
                json={
                    "model": BASE,
                    "messages": messages(i),
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            )
            r.raise_for_status()
            return (time.perf_counter() - t) * 1000, None

        await drive(1, 2, one)
        return {c: await drive(c, c * per_client, one) for c in levels}


async def through_gateway(
    url: str, key: str, levels: list[int], per_client: int, max_tokens: int
) -> dict[int, Run]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=limits, headers={"Authorization": f"Bearer {key}"}
    ) as http:

        async def one(i: int) -> tuple[float, float]:
            t = time.perf_counter()
            r = await http.post(
                "/v1/chat/completions",
                json={
                    "model": BASE,
                    "messages": messages(i),
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            )
            total = (time.perf_counter() - t) * 1000
            r.raise_for_status()
            return total, total - float(r.headers["x-upstream-ms"])

        await drive(1, 2, one)
        return {c: await drive(c, c * per_client, one) for c in levels}


def start_gateway(
    settings: WildloopSettings, port: int, vllm_url: str | None
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
    proc = subprocess.Popen([str(wildloop), "serve", "gateway"], env=env, stderr=subprocess.DEVNULL)
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
    max_tokens: int,
) -> None:
    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs · "
        f"{platform.platform()} · Python {platform.python_version()}"
    )
    table = Table(title=f"gateway overhead ({backend} backend, {max_tokens} tokens/request)")
    for col in (
        "clients",
        "requests",
        "straight p50 ms",
        "straight p99 ms",
        "through p50 ms",
        "through p99 ms",
        "added p50 ms",
        "added p99 ms",
        "straight req/s",
        "through req/s",
    ):
        table.add_column(col, justify="right")
    for c in levels:
        s, t = straight[c], through[c]
        table.add_row(
            str(c),
            str(len(t.latencies_ms)),
            f"{pct(s.latencies_ms, 0.5):.1f}",
            f"{pct(s.latencies_ms, 0.99):.1f}",
            f"{pct(t.latencies_ms, 0.5):.1f}",
            f"{pct(t.latencies_ms, 0.99):.1f}",
            f"{pct(t.added_ms, 0.5):.2f}",
            f"{pct(t.added_ms, 0.99):.2f}",
            f"{s.throughput:.2f}",
            f"{t.throughput:.2f}",
        )
    console.print(table)
    top = through[max(levels)]
    ok50 = pct(top.added_ms, 0.5) <= 2.0
    ok99 = pct(top.added_ms, 0.99) <= 5.0
    console.print(
        f"goal at {max(levels)} clients: added p50 <= 2 ms: "
        f"{'PASS' if ok50 else 'FAIL'}; added p99 <= 5 ms: {'PASS' if ok99 else 'FAIL'}"
        f" (mean {statistics.fmean(top.added_ms):.2f} ms)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    p.add_argument("--per-client", type=int, default=2, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--vllm-url", help="benchmark vLLM (its /v1 URL) instead of the local model")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        settings = WildloopSettings(data_dir=Path(tmp))
        if args.vllm_url:
            straight = asyncio.run(
                straight_vllm(args.vllm_url, levels, args.per_client, args.max_tokens)
            )
        else:
            from services.models import ensure_base_model  # noqa: PLC0415

            cache = WildloopSettings()  # the user's data dir: convert the model once
            settings = settings.model_copy(update={"base_model_path": ensure_base_model(cache)})
            console.log("straight to the local backend")
            straight = asyncio.run(
                straight_local(settings.base_model_path, levels, args.per_client, args.max_tokens)
            )
        store = Store.open(settings.store_url)
        key, _ = keys.create_key(store, tenant_id="bench")
        store.close()
        port = 18000 + os.getpid() % 1000
        console.log("through the gateway")
        proc = start_gateway(settings, port, args.vllm_url)
        try:
            through = asyncio.run(
                through_gateway(
                    f"http://127.0.0.1:{port}", key, levels, args.per_client, args.max_tokens
                )
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report(levels, straight, through, "vllm" if args.vllm_url else "local", args.max_tokens)


if __name__ == "__main__":
    main()
