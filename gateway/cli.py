"""``wildloop serve gateway`` (registered through the ``wildloop.serve`` entry point)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Annotated

import typer

from services.cli.context import fail

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable


def serve_gateway(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: WILDLOOP_GATEWAY__HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: WILDLOOP_GATEWAY__PORT.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Gateway processes on the port, for hosts with cores to spare (vLLM backend "
            "only). Default: WILDLOOP_GATEWAY__WORKERS.",
        ),
    ] = None,
) -> None:
    """Serve the OpenAI-compatible chat gateway (vLLM or the local model, per settings)."""
    import uvicorn  # noqa: PLC0415 - the gateway extra

    from gateway.app import WORKER_SETTINGS_ENV, create_app  # noqa: PLC0415

    settings = ctx.find_root().obj.settings
    overrides = (("host", host), ("port", port), ("workers", workers))
    gw = settings.gateway.model_copy(update={k: v for k, v in overrides if v is not None})
    settings = settings.model_copy(update={"gateway": gw})
    if gw.workers == 1:
        uvicorn.run(
            create_app(settings, freeze_gc=True),
            host=gw.host,
            port=gw.port,
            log_config=None,
            timeout_graceful_shutdown=30,
        )
        return
    if not settings.vllm_url:
        fail(
            "several gateway workers need the vLLM backend (set WILDLOOP_VLLM_URL): the local "
            "backend would load the model, and every adapter loaded at run time, into one "
            "worker only",
            code=2,
        )
    # Each worker is a fresh process (uvicorn spawns them) that builds its app from these
    # settings; prometheus-client keeps every process's metrics in files under one folder,
    # which /metrics adds up. The folder must start empty: a new one per run unless the
    # operator chose one.
    os.environ[WORKER_SETTINGS_ENV] = settings.model_dump_json()
    own_dir = None
    if not os.environ.get(METRICS_DIR_ENV):
        own_dir = tempfile.mkdtemp(prefix="wildloop-gateway-metrics-")
        os.environ[METRICS_DIR_ENV] = own_dir
    try:
        uvicorn.run(
            "gateway.app:worker_app",
            factory=True,
            workers=gw.workers,
            host=gw.host,
            port=gw.port,
            log_config=None,
            timeout_graceful_shutdown=30,
        )
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
