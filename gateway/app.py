"""The gateway's FastAPI application: thin routes over :class:`ChatService`.

``create_app(settings)`` wires concrete pieces (store, bus, outbox, backend) at start-up, inside
the lifespan; nothing happens at import time. Tests may pass their own backend.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import KeyVerifier
from gateway.backends.base import BackendError, ChatBackend
from gateway.errors import GatewayError, forbidden, from_backend
from gateway.identity import ConversationLinker, ConversationMemory, SharedMemory
from gateway.loop_lag import LoopLagProbe
from gateway.metrics import GatewayMetrics
from gateway.outbox import Outbox
from gateway.production import ProductionAdapter
from gateway.protocol import (
    ChatCompletionRequest,
    ErrorResponse,
    FeedbackAccepted,
    FeedbackRequest,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    UnloadAdapterRequest,
)
from gateway.serving import ChatService
from gateway.streaming import EventStreamResponse
from gateway.timing import RequestTiming
from services.bus.factory import build_bus
from services.events.schemas import AdapterAction, AdapterLifecycleChanged
from services.logs import configure_logging
from services.metrics import Metrics
from services.settings import WildloopSettings
from services.store.keys import KeyInfo
from services.store.repository import Store

log = logging.getLogger(__name__)

# How often a non-streamed request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


def default_backend(settings: WildloopSettings) -> ChatBackend:
    """vLLM when ``WILDLOOP_VLLM_URL`` is set, else the in-process local model."""
    if settings.vllm_url:
        from gateway.backends.vllm import VllmBackend  # noqa: PLC0415 - optional role

        return VllmBackend(
            settings.vllm_url,
            base_model=settings.base_model,
            api_key=settings.vllm_api_key,
            timeout_s=settings.gateway.request_timeout_s,
        )
    from gateway.backends.local import LocalBackend  # noqa: PLC0415 - needs torch
    from services.models import ensure_base_model  # noqa: PLC0415

    return LocalBackend(
        ensure_base_model(settings),
        base_model=settings.base_model,
        max_model_len=settings.gateway.local_max_model_len,
        timeout_s=settings.gateway.request_timeout_s,
    )


class LimitsAndMetrics:
    """ASGI middleware: refuse bodies over the limit (413) while they stream in, and record
    request count and latency to the last byte, labelled by route/model/adapter/status, and for
    a chat request that got its answer, the gateway's critical path (``gateway.timing``: the
    route fills in ``scope["state"]["timing"]``)."""

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: GatewayMetrics) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _send_error(send, 413, f"request body exceeds {self.max_body} bytes")
            return
        seen = 0
        status = 500
        timing = RequestTiming(started)
        scope.setdefault("state", {})["timing"] = timing

        async def limited_receive() -> Message:
            nonlocal seen
            asked = time.perf_counter()
            message = await receive()
            if message["type"] == "http.request":
                # waiting for the client to send its body is not the gateway's time
                timing.received_at += time.perf_counter() - asked
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise GatewayError(413, f"request body exceeds {self.max_body} bytes")
            return message

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                state = scope["state"]
                labels = (
                    scope["path"],
                    state.get("model", ""),
                    state.get("adapter", ""),
                    str(status),
                )
                now = time.perf_counter()
                self.metrics.requests.labels(*labels).inc()
                self.metrics.latency.labels(*labels).observe(now - started)
                # a stream ended when its closing events went out (its answer is logged after)
                critical = timing.critical_s(timing.answered_at or now)
                if critical is not None:
                    self.metrics.critical_path.labels(str(timing.stream).lower()).observe(critical)

        await self.app(scope, limited_receive, observed_send)


async def _send_error(send: Send, status: int, message: str) -> None:
    body = JSONResponse(ErrorResponse.of(message, "invalid_request_error"), status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": body.raw_headers})
    await send({"type": "http.response.body", "body": body.body})


def create_app(
    settings: WildloopSettings,
    *,
    backend: ChatBackend | None = None,
    metrics: Metrics | None = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """The gateway app. ``freeze_gc`` (for a process that serves only this app, as ``wildloop
    serve gateway`` does): once started, move every object alive into the collector's permanent
    generation (``gc.freeze``). The ~180,000 objects of the imported modules, models and routes
    never die, yet every full collection walked them: ~90 ms with the event loop stopped, which
    showed as the p99 of streamed requests (docs/benchmarks.md)."""
    metrics = metrics or Metrics("gateway")
    gw_metrics = GatewayMetrics(metrics)
    cfg = settings.gateway

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store.open(settings.store_url)
        bus = build_bus(settings)
        bus.ensure_topics(settings.topics.all())
        shared = cfg.workers > 1  # several processes on this port share the files below
        outbox = Outbox(
            settings.data_dir / f"gateway-outbox-{cfg.port}.db",
            publisher=bus.publisher(),
            topics=settings.topics,
            metrics=metrics,
            max_events=cfg.outbox_max_events,
            batch=cfg.outbox_batch,
            # the drainer cannot be woken by another process's append: it polls instead
            idle_wait_s=0.05 if shared else 1.0,
        )
        memory: ConversationMemory | None = None
        if shared:
            memory = SharedMemory(
                settings.data_dir / f"gateway-conversations-{cfg.port}.db",
                cfg.history_cache_size,
            )
        outbox.start()
        chat_backend = backend or default_backend(settings)
        await chat_backend.start()
        app.state.metrics = metrics
        app.state.store = store
        app.state.outbox = outbox
        app.state.backend = chat_backend
        app.state.keys = KeyVerifier(store, required=cfg.auth_required)
        app.state.service = ChatService(
            backend=chat_backend,
            outbox=outbox,
            metrics=gw_metrics,
            linker=ConversationLinker(cfg.history_cache_size, memory),
            alias=cfg.model_alias,
            production_adapter=ProductionAdapter(store, refresh_s=cfg.production_refresh_s),
        )
        probe = LoopLagProbe(gw_metrics.loop_lag, cfg.loop_lag_interval_s)
        probe.start()
        if freeze_gc:
            gc.collect()
            gc.freeze()
        log.info(
            "gateway ready",
            extra={"backend": type(chat_backend).__name__, "base_model": chat_backend.base_model},
        )
        try:
            yield
        finally:
            await probe.stop()
            await chat_backend.close()
            outbox.close()
            if isinstance(memory, SharedMemory):
                memory.close()
            bus.close()
            store.close()

    app = FastAPI(title="wildloop gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(LimitsAndMetrics, max_body=cfg.max_body_bytes, metrics=gw_metrics)
    _install_error_handlers(app)
    _install_routes(app)
    return app


WORKER_SETTINGS_ENV = "WILDLOOP_GATEWAY_WORKER_SETTINGS"


def worker_app() -> FastAPI:
    """The app of one of several gateway processes (``wildloop serve gateway --workers N``;
    uvicorn calls this factory in each worker): the settings are the parent's, passed as JSON
    in ``WILDLOOP_GATEWAY_WORKER_SETTINGS``."""
    settings = WildloopSettings.model_validate_json(os.environ[WORKER_SETTINGS_ENV])
    configure_logging(settings.log_level, settings.log_format)  # a fresh process
    return create_app(settings, freeze_gc=True)


# --- dependencies --------------------------------------------------------------------------------


# Headers are read from the request, not declared as ``Header()`` parameters: FastAPI validates
# each declared header parameter on every request, and the two the chat route had cost ~60-140 us
# of CPU on the way in of every chat request (``bench/routing.py``; docs/benchmarks.md).


async def current_key(request: Request) -> KeyInfo:
    return await request.app.state.keys.authenticate(request.headers.get("authorization"))


async def admin_key(key: Annotated[KeyInfo, Depends(current_key)]) -> KeyInfo:
    if "admin" not in key.scopes:
        raise forbidden("this operation needs an API key with the admin scope")
    return key


async def service(request: Request) -> ChatService:
    # async on purpose: FastAPI runs a plain-def dependency in a thread pool, and that hand-off
    # (and the GIL coming back) cost the chat path milliseconds per request.
    return request.app.state.service  # type: ignore[no-any-return]


Key = Annotated[KeyInfo, Depends(current_key)]
AdminKey = Annotated[KeyInfo, Depends(admin_key)]
Service = Annotated[ChatService, Depends(service)]


# --- routes --------------------------------------------------------------------------------------


def _install_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        key: Key,
        svc: Service,
    ) -> Response:
        x_conversation_id = request.headers.get("x-conversation-id")
        request.state.model = body.model
        timing: RequestTiming = request.state.timing
        target = await svc.resolve_model(body.model)
        request.state.adapter = target.adapter or ""
        if body.stream:
            stream, conversation = await svc.prepare_stream(
                body, key, x_conversation_id, target, timing
            )
            return EventStreamResponse(
                stream, headers={"X-Conversation-Id": conversation, "Cache-Control": "no-cache"}
            )
        answered = asyncio.ensure_future(svc.complete(body, key, x_conversation_id, target, timing))
        try:
            while not answered.done():
                await asyncio.wait({answered}, timeout=DISCONNECT_POLL_S)
                if not answered.done() and await request.is_disconnected():
                    # Nobody will read the answer: stop generating, log nothing (the user never
                    # saw it, so it is not part of the conversation).
                    answered.cancel()
                    svc.metrics.disconnects.labels("false").inc()
                    return Response(status_code=499)
        except asyncio.CancelledError:  # the server is shutting down under us
            answered.cancel()
            raise
        completion, conversation, upstream_ms = answered.result()
        # Like OpenAI's openai-processing-ms: time in the model, so a client can tell the
        # gateway's own share of the latency (bench/gateway.py uses it).
        return JSONResponse(
            completion.model_dump(),
            headers={"X-Conversation-Id": conversation, "X-Upstream-Ms": f"{upstream_ms:.3f}"},
        )

    @app.get("/v1/models")
    async def models(_key: Key, svc: Service) -> ModelList:
        base = svc.backend.base_model
        cards = [
            ModelCard(id=base, root=base),
            ModelCard(id=svc.alias, root=base, parent=svc.resolve_alias() or base),
        ]
        cards += [
            ModelCard(id=name, root=path, parent=base)
            for name, path in sorted((await svc.backend.adapters()).items())
        ]
        return ModelList(data=cards)

    @app.post("/v1/feedback", status_code=201)
    async def feedback(body: FeedbackRequest, key: Key, svc: Service) -> FeedbackAccepted:
        event = svc.feedback(body, key)
        return FeedbackAccepted(
            id=event.event_id,
            conversation_id=event.conversation_id,
            turn=event.turn,
            rating=event.rating.value,
        )

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest, key: AdminKey, svc: Service) -> dict[str, str]:
        await _adapter_op(svc, key, body.lora_name, body.lora_path)
        return {"status": "loaded", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(
        body: UnloadAdapterRequest, key: AdminKey, svc: Service
    ) -> dict[str, str]:
        await _adapter_op(svc, key, body.lora_name, None)
        return {"status": "unloaded", "lora_name": body.lora_name}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        svc: ChatService = request.app.state.service
        backend_ready = await svc.backend.ready()
        backlog_ok = svc.outbox.depth < svc.outbox.max_events
        ok = backend_ready and backlog_ok
        return JSONResponse(
            {
                "status": "ready" if ok else "not ready",
                "backend": backend_ready,
                "outbox_depth": svc.outbox.depth,
                "outbox_ok": backlog_ok,
            },
            status_code=200 if ok else 503,
        )


async def _adapter_op(svc: ChatService, key: KeyInfo, name: str, path: str | None) -> None:
    try:
        if path is None:
            await svc.backend.unload_adapter(name)
        else:
            await svc.backend.load_adapter(name, path)
    except BackendError as exc:
        raise from_backend(exc) from exc
    svc.outbox.append(
        [
            AdapterLifecycleChanged(
                adapter_id=name,
                action=AdapterAction.UNLOADED if path is None else AdapterAction.LOADED,
                base_model=svc.backend.base_model,
                path=path,
                actor=key.id,
            )
        ]
    )


# --- errors --------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    def error(
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> JSONResponse:
        return JSONResponse(ErrorResponse.of(message, type_, code, param), status_code=status)

    @app.exception_handler(GatewayError)
    async def _gateway(_req: Request, exc: GatewayError) -> JSONResponse:
        return error(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(BackendError)
    async def _backend(_req: Request, exc: BackendError) -> JSONResponse:
        e = from_backend(exc)
        return error(e.status, e.message, e.type, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error(400, f"invalid JSON body: {first.get('msg')}")
        where = ".".join(loc) or "body"
        return error(400, f"{where}: {first.get('msg')}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, "internal error", "server_error")
