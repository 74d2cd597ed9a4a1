"""The gateway's logic: resolve model and conversation, call the backend, log the turns.

Routes (``app.py``) stay thin; everything here raises :class:`GatewayError` or backend errors,
which the app maps to OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.backends.base import (
    BackendError,
    ChatBackend,
    ChatMessage,
    Completion,
    GenerationRequest,
    StreamEnd,
    StreamItem,
    TextDelta,
)
from gateway.errors import GatewayError, from_backend
from gateway.identity import ConversationLinker
from gateway.metrics import GatewayMetrics
from gateway.outbox import Outbox, OutboxFullError
from gateway.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChunkEncoder,
    ErrorResponse,
    FeedbackRequest,
    ResponseMessage,
    Usage,
)
from gateway.timing import RequestTiming
from services.events.schemas import FeedbackSubmitted, Rating, Role, TurnLogged
from services.store.keys import KeyInfo

log = logging.getLogger(__name__)

ROLE_MAP = {"developer": "system"}
# How long a backend stream may take after its StreamEnd to reach its own end (see ``_finish``).
DRAIN_S = 5.0


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's ``model`` resolved to."""

    name: str  # as the client asked, echoed back
    adapter: str | None  # None = base model


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request/answer in a resolved conversation."""

    key: KeyInfo
    conversation: str
    messages: list[ChatMessage]
    target: Target
    model: str


def turn_event_id(conversation_id: str, turn: int, role: str, content: str) -> str:
    """Deterministic for history turns, so re-logging a resent history is deduplicated."""
    digest = hashlib.sha256(f"{conversation_id}\x00{turn}\x00{role}\x00{content}".encode())
    return "gw-" + digest.hexdigest()[:29]


class ChatService:
    def __init__(
        self,
        *,
        backend: ChatBackend,
        outbox: Outbox,
        metrics: GatewayMetrics,
        linker: ConversationLinker,
        alias: str,
        production_adapter: Callable[[], str | None],
    ) -> None:
        self.backend = backend
        self.outbox = outbox
        self.metrics = metrics
        self.linker = linker
        self.alias = alias
        self._production_adapter = production_adapter

    # -- models ---------------------------------------------------------------------------------
    def resolve_alias(self) -> str | None:
        """The adapter the alias serves now (None = the base model)."""
        return self._production_adapter()

    async def resolve_model(self, name: str) -> Target:
        if name == self.alias:
            return Target(name, self.resolve_alias())
        if name == self.backend.base_model:
            return Target(name, None)
        if name in await self.backend.adapters():
            return Target(name, name)
        # The list may be a recent copy: another worker of this gateway may just have loaded
        # the adapter on the shared model server. Ask again before refusing.
        if name in await self.backend.adapters(fresh=True):
            return Target(name, name)
        raise GatewayError(
            404, f"The model '{name}' does not exist", code="model_not_found", param="model"
        )

    # -- chat -----------------------------------------------------------------------------------
    def _messages(self, request: ChatCompletionRequest) -> list[ChatMessage]:
        try:
            msgs = [
                ChatMessage(ROLE_MAP.get(m.role, m.role), m.text())  # type: ignore[arg-type]
                for m in request.messages
            ]
        except ValueError as exc:
            raise GatewayError(400, str(exc), param="messages") from None
        if msgs[-1].role != "user":
            raise GatewayError(400, "the last message must come from the user", param="messages")
        return msgs

    def _generation(
        self, request: ChatCompletionRequest, msgs: list[ChatMessage], target: Target
    ) -> GenerationRequest:
        return GenerationRequest(
            messages=msgs,
            adapter=target.adapter,
            max_tokens=request.token_limit(),
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop_list(),
            seed=request.seed,
        )

    async def _exchange(
        self,
        request: ChatCompletionRequest,
        key: KeyInfo,
        conversation_header: str | None,
        target: Target | None,
    ) -> Exchange:
        """Validate and resolve everything before generating, so errors are plain HTTP errors."""
        if target is None:
            target = await self.resolve_model(request.model)
        msgs = self._messages(request)
        self._check_capacity()
        explicit = self._explicit(request, conversation_header)
        conversation = self.linker.resolve(key.tenant_id, msgs, explicit)
        return Exchange(key, conversation, msgs, target, request.model)

    async def complete(
        self,
        request: ChatCompletionRequest,
        key: KeyInfo,
        conversation_header: str | None,
        target: Target | None = None,
        timing: RequestTiming | None = None,
    ) -> tuple[ChatCompletion, str, float]:
        """The completion, its conversation id, and the milliseconds spent in the backend.
        ``target`` is ``request.model`` already resolved, if the caller did; ``timing`` gets the
        backend's window (the app observes the critical path from it once the response is sent)."""
        entered = time.perf_counter()
        timing = timing or RequestTiming(entered)
        x = await self._exchange(request, key, conversation_header, target)
        started = time.perf_counter()
        started_at = datetime.now(UTC)
        try:
            result: Completion = await self.backend.complete(
                self._generation(request, x.messages, x.target)
            )
        except BackendError as exc:
            raise from_backend(exc) from exc
        returned = time.perf_counter()
        timing.backend(
            started if result.upstream_sent_at is None else result.upstream_sent_at,
            returned if result.upstream_last_at is None else result.upstream_last_at,
        )
        backend_ms = (returned - started) * 1000
        # Blocked on the model server, when the backend knows; else the whole backend call.
        upstream_ms = backend_ms if result.upstream_s is None else result.upstream_s * 1000
        self._log(
            x,
            result.text,
            started_at=started_at,
            latency_ms=backend_ms,
            ttft_ms=None,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            partial=False,
        )
        self._count_tokens(result.prompt_tokens, result.completion_tokens)
        response = ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=request.model,
            choices=[
                Choice(
                    message=ResponseMessage(content=result.text), finish_reason=result.finish_reason
                )
            ],
            usage=_usage(result.prompt_tokens, result.completion_tokens),
        )
        own_s = time.perf_counter() - entered - upstream_ms / 1000
        self.metrics.overhead.labels("false").observe(own_s)
        return response, x.conversation, upstream_ms

    async def prepare_stream(
        self,
        request: ChatCompletionRequest,
        key: KeyInfo,
        conversation_header: str | None,
        target: Target | None = None,
        timing: RequestTiming | None = None,
    ) -> tuple[AsyncIterator[bytes], str]:
        """The SSE body generator and the conversation id.

        The backend's first item (a token, or the end of an empty answer) is awaited here,
        before any byte of the response: a backend that is down, times out or does not know the
        adapter gets a plain HTTP error in OpenAI's shape, as a non-streamed request does, not a
        200 followed by an error event. The status line, the role event and the first token
        then leave together, after the backend request (none of them on the way in).

        ``timing`` gets the backend's window and the moment the closing events were handed to the
        server; the stream's closing comment carries the critical path up to then."""
        timing = timing or RequestTiming.now()
        timing.stream = True
        x = await self._exchange(request, key, conversation_header, target)
        started = time.perf_counter()
        started_at = datetime.now(UTC)
        stream = self.backend.stream(self._generation(request, x.messages, x.target))
        try:
            first: StreamItem | None = await anext(stream)
        except StopAsyncIteration:
            first = None
        except BackendError as exc:
            await _aclose(stream)
            raise from_backend(exc) from exc
        except BaseException:
            await _aclose(stream)
            raise
        waited = time.perf_counter() - started
        opened = _Opened(stream, first, started, started_at, waited)
        return self._stream(request, x, opened, timing), x.conversation

    async def _stream(
        self, request: ChatCompletionRequest, x: Exchange, opened: _Opened, timing: RequestTiming
    ) -> AsyncIterator[bytes]:
        encode = ChunkEncoder(f"chatcmpl-{uuid.uuid4().hex}", x.model)
        stream, started, started_at = opened.stream, opened.started, opened.started_at
        ttft: float | None = None
        waited = opened.waited  # seconds spent waiting on the backend
        first_ask, last_back = started, started + opened.waited  # first wait began, last ended
        pieces: list[str] = []
        end: StreamEnd | None = None
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        # The role event goes out with the first event after it (a token, the closing events or
        # an error), in the same write: it carries no text, and on its own it would be one more
        # socket send per request.
        head = encode.role()
        item = opened.first
        try:
            while item is not None:
                if isinstance(item, TextDelta):
                    if ttft is None:
                        ttft = (time.perf_counter() - started) * 1000
                        self.metrics.ttft.labels(x.model).observe(ttft / 1000)
                    pieces.append(item.text)
                    if head:
                        yield head + encode.content(item.text)
                        head = b""
                    else:
                        yield encode.content(item.text)
                else:
                    # The answer is complete: the closing events go out now. A backend may
                    # still have work after its StreamEnd (vLLM: reading the end of the HTTP
                    # body); that is done after they are sent (``_finish``).
                    end = item
                    break
                asked = time.perf_counter()
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    item = None
                finally:
                    last_back = time.perf_counter()
                    waited += last_back - asked
            if end is None:
                raise BackendError("the backend's stream ended without a finish")
            if end.upstream_s is not None:  # the backend's own work is the gateway's time
                waited = end.upstream_s
            sent = first_ask if end.upstream_sent_at is None else end.upstream_sent_at
            last = last_back if end.upstream_last_at is None else end.upstream_last_at
            timing.backend(sent, last)
            span = last - sent
            # The closing events go out in one write (one ASGI message, one socket send): they
            # are ready together, and at high concurrency every send is queued behind every
            # other stream's.
            tail = [head, encode.finish(end.finish_reason)]
            if include_usage:
                tail.append(encode.usage(end.prompt_tokens, end.completion_tokens))
            # SSE comments (clients skip them), so a client can tell the gateway's own share,
            # like X-Upstream-Ms on plain responses: the time spent waiting on the backend; the
            # span from the backend request to its last piece (the gateway's per-chunk work
            # within it overlaps generation); and the gateway's critical path, as measured
            # inside it, up to these closing events being ready (``gateway.timing``).
            ready = time.perf_counter()
            tail.append(
                f": upstream-ms={waited * 1000:.3f}\n"
                f": upstream-span-ms={span * 1000:.3f}\n"
                f": gateway-ms={(timing.critical_s(ready) or 0.0) * 1000:.3f}\n\n".encode()
            )
            tail.append(b"data: [DONE]\n\n")
            self.metrics.overhead.labels("true").observe(ready - started - waited)
            yield b"".join(tail)
            timing.answered_at = time.perf_counter()
        except BackendError as exc:
            err = from_backend(exc)
            body = ErrorResponse.of(err.message, err.type, err.code)
            yield head + f"data: {json.dumps(body)}\n\n".encode()
        except (GeneratorExit, asyncio.CancelledError):  # the client went away
            self.metrics.disconnects.labels("true").inc()
            raise
        finally:
            # Runs on completion, on backend failure and when the client goes away (the server
            # closes this generator, or cancels it while the backend stream is being finished):
            # whatever was generated is logged first, marked partial if cut.
            try:
                if pieces or end is not None:
                    self._log_quietly(
                        x,
                        "".join(pieces),
                        started_at=started_at,
                        latency_ms=(time.perf_counter() - started) * 1000,
                        ttft_ms=ttft,
                        prompt_tokens=end.prompt_tokens if end else None,
                        completion_tokens=end.completion_tokens if end else len(pieces),
                        partial=end is None,
                    )
                if end is not None:
                    self._count_tokens(end.prompt_tokens, end.completion_tokens)
            finally:
                # the closing events were sent: the backend stream has only its end left
                await _finish(stream, complete=timing.answered_at is not None)

    def _log_quietly(self, x: Exchange, answer: str, **kw: Any) -> None:
        """Log a streamed answer; the response is already sent, so a full backlog can only be
        counted (``wildloop_gateway_unlogged_answers_total``) and reported in the logs."""
        try:
            self._log(x, answer, **kw)
        except GatewayError as exc:
            log.error(
                "streamed answer not logged",
                extra={"conversation": x.conversation, "error": exc.message},
            )

    def _count_tokens(self, prompt: int, completion: int) -> None:
        self.metrics.tokens.labels("prompt").inc(prompt)
        self.metrics.tokens.labels("completion").inc(completion)

    # -- logging --------------------------------------------------------------------------------
    def _check_capacity(self) -> None:
        if self.outbox.depth >= self.outbox.max_events:
            raise GatewayError(
                503,
                "the event backlog is full; try again later",
                type_="server_error",
                code="backlog_full",
            )

    @staticmethod
    def _explicit(request: ChatCompletionRequest, header: str | None) -> str | None:
        value = header or (request.metadata or {}).get("conversation_id")
        if value is not None and not 0 < len(value) <= 200:
            raise GatewayError(
                400, "conversation id must be 1-200 characters", param="X-Conversation-Id"
            )
        return value

    def _log(
        self,
        x: Exchange,
        answer: str,
        *,
        started_at: datetime,
        latency_ms: float,
        ttft_ms: float | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        partial: bool,
    ) -> None:
        key, conversation, msgs, target, model = (
            x.key,
            x.conversation,
            x.messages,
            x.target,
            x.model,
        )
        first = self.linker.logged_turns(conversation)
        now = datetime.now(UTC)
        request_id = uuid.uuid4().hex
        events: list[TurnLogged] = [
            TurnLogged(
                event_id=turn_event_id(conversation, i, m.role, m.content),
                conversation_id=conversation,
                turn=i,
                role=Role(m.role),
                content=m.content,
                model=model,
                adapter_id=target.adapter,
                request_id=request_id,
                tenant_id=key.tenant_id,
                user_id=key.id,
                occurred_at=started_at,
            )
            for i, m in enumerate(msgs)
            if i >= first
        ]
        events.append(
            TurnLogged(
                conversation_id=conversation,
                turn=len(msgs),
                role=Role.ASSISTANT,
                content=answer,
                model=model,
                adapter_id=target.adapter,
                request_id=request_id,
                tenant_id=key.tenant_id,
                user_id=key.id,
                started_at=started_at,
                completed_at=now,
                occurred_at=now,
                latency_ms=latency_ms,
                time_to_first_token_ms=ttft_ms,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                partial=partial,
            )
        )
        try:
            self.outbox.append(events)
        except OutboxFullError as exc:
            # The answer was produced but cannot be kept: count it loudly; never half-log.
            self.metrics.unlogged.inc()
            raise GatewayError(503, str(exc), type_="server_error", code="backlog_full") from exc
        self.linker.remember(key.tenant_id, msgs, answer, conversation)

    # -- feedback -------------------------------------------------------------------------------
    def feedback(self, body: FeedbackRequest, key: KeyInfo) -> FeedbackSubmitted:
        event = FeedbackSubmitted(
            conversation_id=body.conversation_id,
            turn=body.turn,
            rating=Rating(body.rating),
            comment=body.comment,
            tenant_id=key.tenant_id,
            user_id=key.id,
        )
        try:
            self.outbox.append([event])
        except OutboxFullError as exc:
            raise GatewayError(503, str(exc), type_="server_error", code="backlog_full") from exc
        return event


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


@dataclass(frozen=True, slots=True)
class _Opened:
    """A backend stream whose first item has arrived (None: it ended at once)."""

    stream: AsyncIterator[StreamItem]
    first: StreamItem | None
    started: float  # perf_counter() when the backend was called
    started_at: datetime
    waited: float  # seconds until the first item


async def _finish(stream: AsyncIterator[StreamItem], *, complete: bool) -> None:
    """Release a backend stream: after its ``StreamEnd``, iterate it to its end (vLLM reads the
    rest of the HTTP body, so the connection is kept for the next request; the client's body
    ends after that, so a server that never ends its body is cut off after ``DRAIN_S``), else
    close it (the backend stops generating)."""
    try:
        if complete:
            async with asyncio.timeout(DRAIN_S):
                async for item in stream:
                    log.warning("backend stream went on after its end", extra={"item": repr(item)})
    except (BackendError, TimeoutError) as exc:  # the answer was whole: only a connection is lost
        log.info("backend stream did not end cleanly", extra={"error": repr(exc)})
    finally:
        await _aclose(stream)


async def _aclose(stream: AsyncIterator[object]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
