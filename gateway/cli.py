"""``wildloop serve gateway`` (registered through the ``wildloop.serve`` entry point)."""

from __future__ import annotations

from typing import Annotated

import typer


def serve_gateway(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: WILDLOOP_GATEWAY__HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: WILDLOOP_GATEWAY__PORT.")] = None,
) -> None:
    """Serve the OpenAI-compatible chat gateway (vLLM or the local model, per settings)."""
    import uvicorn  # noqa: PLC0415 - the gateway extra

    from gateway.app import create_app  # noqa: PLC0415

    settings = ctx.find_root().obj.settings
    gw = settings.gateway.model_copy(
        update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
    )
    settings = settings.model_copy(update={"gateway": gw})
    uvicorn.run(
        create_app(settings),
        host=gw.host,
        port=gw.port,
        log_config=None,
        timeout_graceful_shutdown=30,
    )
