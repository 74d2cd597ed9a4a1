"""``ChatBackend`` for a vLLM OpenAI-compatible server (``vllm serve``; tested with vLLM 0.32).

Generation goes through the official ``openai`` client: the base model is addressed by its
served name, a LoRA adapter by its own name (``model=<adapter>``), as vLLM serves each loaded
adapter as a model. Adapters are managed through vLLM's runtime LoRA endpoints
(``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), which exist only when the server
runs with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, and listed from ``GET /v1/models`` (adapters
are the entries with a ``parent``; their ``root`` is the folder they were loaded from).

Only the ``openai`` and ``httpx`` packages are needed: no torch.
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import httpx2  # openai's own HTTP stack: errors raised while a stream is read
import openai

from gateway.backends.base import (
    AdapterLoadError,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    Completion,
    FinishReason,
    GenerationRequest,
    InvalidGenerationError,
    StreamEnd,
    StreamItem,
    TextDelta,
    UnknownAdapterError,
)
from services.adapters import InvalidAdapterError, inspect_adapter

_CONNECT_TIMEOUT_S = 10.0
# Telemetry headers the SDK adds to every request for OpenAI's servers; vLLM ignores them.
# Dropping them (``openai.Omit`` is the SDK's way to remove a header) and posting to an absolute
# URL cut the client's work before the request leaves from ~0.38-0.42 to ~0.27-0.29 ms per
# streamed request at the median (bench/sdk_request.py, docs/benchmarks.md).
_SDK_TELEMETRY_HEADERS = (
    "X-Stainless-Lang",
    "X-Stainless-Package-Version",
    "X-Stainless-OS",
    "X-Stainless-Arch",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
    "X-Stainless-Async",
)
_PER_REQUEST_OMIT = {
    "x-stainless-retry-count": openai.Omit(),
    "x-stainless-read-timeout": openai.Omit(),
}
_RUNTIME_LORA_HINT = (
    "the vLLM server does not offer runtime LoRA loading; start it with "
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"
)


class VllmBackend:
    """Serves ``base_model`` and its LoRA adapters from a running vLLM server.

    ``base_url`` is the server's OpenAI base URL (``http://host:8000/v1``; a URL without the
    ``/v1`` suffix is accepted too). ``timeout_s`` bounds connecting and each wait for the
    server: a whole non-streamed completion, or the gap between two streamed chunks.
    Connections are made lazily, so ``start()`` succeeds while the server is still loading;
    ``ready()`` tells when it serves.
    """

    def __init__(
        self,
        base_url: str,
        *,
        base_model: str,
        api_key: str | None = None,
        timeout_s: float = 120,
        adapters_ttl_s: float = 2.0,
    ) -> None:
        root = base_url.rstrip("/").removesuffix("/v1")
        self.base_model = base_model
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, _CONNECT_TIMEOUT_S))
        # openai >= 3 ships its own HTTP stack (httpx2), so the two clients share no types:
        # each gets its own timeout object and pool. No retries: the gateway decides.
        openai_timeout = openai.Timeout(timeout_s, connect=min(timeout_s, _CONNECT_TIMEOUT_S))
        self._openai = openai.AsyncOpenAI(
            base_url=f"{root}/v1",
            api_key=api_key or "EMPTY",  # vLLM ignores the key unless started with --api-key
            timeout=openai_timeout,
            max_retries=0,
            default_headers={name: openai.Omit() for name in _SDK_TELEMETRY_HEADERS},
            # aiohttp (C HTTP parser) under the SDK instead of its pure-Python default: every
            # streamed token is one HTTP chunk to parse, and this cut the gateway's CPU per
            # 16-token stream from ~12.5 ms to ~8.7 ms (bench/gateway.py, docs/benchmarks.md).
            http_client=openai.DefaultAioHttpClient(
                timeout=openai_timeout,
                event_hooks={"request": [_mark], "response": [_mark]},
            ),
        )
        # An absolute URL: the SDK then skips merging a relative path into its base URL.
        self._chat_url = f"{root}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=root, headers=headers, timeout=timeout)
        self._adapters_ttl_s = adapters_ttl_s
        self._adapters_cache: tuple[float, dict[str, str]] | None = None  # (expires, list)

    async def start(self) -> None:
        """Nothing to load: the server owns the model; connections open on first use."""

    async def close(self) -> None:
        await self._openai.close()
        await self._http.aclose()

    async def ready(self) -> bool:
        """The server is healthy and serves ``base_model``."""
        try:
            health = await self._http.get("/health")
            if health.status_code != 200:
                return False
            return self.base_model in await self._models()
        except (httpx.HTTPError, BackendError, ValueError, KeyError):
            return False

    # --- generation ---------------------------------------------------------------------------

    async def complete(self, request: GenerationRequest) -> Completion:
        marks: list[float] = []
        token = _MARKS.set(marks)
        try:
            response = await self._openai.chat.completions.create(**self._params(request))
        except openai.APIError as err:
            raise _generation_error(err, request.adapter) from err
        finally:
            _MARKS.reset(token)
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=choice.message.content or "",
            finish_reason=_finish_reason(choice.finish_reason),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            upstream_s=_between(marks),
            # the answer arrives whole: its headers mark when it came in
            upstream_sent_at=marks[0] if marks else None,
            upstream_last_at=marks[1] if len(marks) >= 2 else None,
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        """Deltas, then one ``StreamEnd`` with the token counts of the final usage chunk.

        This loop runs once per generated token for every open stream, so it stays thin: the
        request goes out through the client's generic ``post`` (the SDK's documented way to
        call any endpoint; ``chat.completions.create`` still transforms ``model`` and ``messages``
        and builds more of the request: 1.62 against 1.09-1.18 ms of CPU per 1-token request in
        a loop against a local SSE server), and the SSE body is read as raw bytes,
        split into lines here and decoded with ``json``: the SDK's typed chunks cost ~90 us each
        and its text line iterator most of the rest of the ~0.3 ms per token we measured.
        Closing this iterator early closes the HTTP response, and vLLM aborts the request.

        The ``StreamEnd`` carries the time spent blocked on vLLM: request sent to response
        headers (the client's event hooks mark both), plus every wait for the next piece of the
        body. Building the request and parsing chunks are the gateway's own time. It also
        carries when the request went out and when the last piece came in.
        """
        finish: FinishReason = "stop"
        prompt_tokens = completion_tokens = 0
        body = self._body(request, stream=True, stream_options={"include_usage": True})
        marks: list[float] = []
        wait = _Wait()
        done = False
        try:
            token = _MARKS.set(marks)
            try:
                sse = await self._openai.post(
                    self._chat_url,
                    cast_to=object,
                    body=body,
                    options={"headers": _PER_REQUEST_OMIT},
                    stream=True,
                    stream_cls=openai.AsyncStream[object],
                )
            finally:
                _MARKS.reset(token)
            wait.seconds = _between(marks) or 0.0
            try:
                async for data in _sse_data(sse.response.aiter_bytes(), wait):
                    if data == b"[DONE]":
                        # vLLM's last event; the end of the HTTP body comes in a later write.
                        # The answer is complete: end now, and read on to the end of the body
                        # only when iterated again, so the connection can be reused.
                        done = True
                        yield self._end(finish, prompt_tokens, completion_tokens, wait, marks)
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:  # vLLM reports a mid-stream failure as an event
                        raise BackendError(f"vLLM error: {_chunk_error(chunk)}")
                    usage = chunk.get("usage")
                    if usage:  # the last chunk, with no choices
                        prompt_tokens = usage.get("prompt_tokens", 0)
                        completion_tokens = usage.get("completion_tokens", 0)
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield TextDelta(text)
                        if choice.get("finish_reason") is not None:
                            finish = _finish_reason(choice["finish_reason"])
            finally:
                await sse.close()
        except openai.APIError as err:
            raise _generation_error(err, request.adapter) from err
        except (httpx2.TimeoutException, httpx.TimeoutException) as err:
            raise BackendTimeoutError(f"vLLM did not answer in time: {err!r}") from err
        except (httpx2.HTTPError, httpx.HTTPError, json.JSONDecodeError) as err:
            raise BackendUnavailableError(f"vLLM stream broke off: {err!r}") from err
        if not done:  # a body that ended without [DONE]
            yield self._end(finish, prompt_tokens, completion_tokens, wait, marks)

    @staticmethod
    def _end(
        finish: FinishReason, prompt: int, completion: int, wait: _Wait, marks: list[float]
    ) -> StreamEnd:
        return StreamEnd(
            finish,
            prompt,
            completion,
            upstream_s=wait.seconds,
            upstream_sent_at=marks[0] if marks else None,
            upstream_last_at=wait.last or None,
        )

    def _body(self, request: GenerationRequest, **extra: Any) -> dict[str, Any]:
        """The JSON body of a chat completion request, plain strings and numbers."""
        body: dict[str, Any] = {
            "model": request.adapter or self.base_model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            # Unset means greedy, as in the local backend (vLLM's own default would be 1.0).
            "temperature": request.temperature or 0.0,
            **extra,
        }
        optional = {
            "max_tokens": request.max_tokens,
            "top_p": request.top_p,
            "seed": request.seed,
            "stop": list(request.stop) or None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return body

    def _params(self, request: GenerationRequest) -> dict[str, Any]:
        """Arguments of ``chat.completions.create``: ``model`` and ``messages`` as the SDK
        requires, the rest of the body in ``extra_body``, which the SDK merges in as is.

        The SDK otherwise walks every argument through its type-annotation transform
        (``openai._utils._transform``) on the gateway's event loop: ~0.7 ms of CPU for the
        messages of a 4-message chat, ~0.15 ms more for the scalar parameters (one-off timings
        on the 2-core development machine). The body is already plain JSON, which needs no
        transform.
        """
        body = self._body(request)
        return {
            "model": body.pop("model"),
            "messages": [],
            "extra_body": body,
            "extra_headers": _PER_REQUEST_OMIT,
        }

    # --- adapters -----------------------------------------------------------------------------

    async def adapters(self, *, fresh: bool = False) -> dict[str, str]:
        """Adapters the server has loaded: name -> the folder it was loaded from.

        The gateway asks on every request for a named model, so the list is kept for
        ``adapters_ttl_s`` (and refreshed at once after a load or unload through this backend):
        an adapter loaded on the server by someone else is seen within that time. ``fresh``
        asks the server in any case: the gateway does so before refusing a model name, so an
        adapter that another gateway worker has just loaded is served at once (a request for
        an unknown name costs one ``GET /v1/models``).
        """
        now = time.monotonic()
        if not fresh and self._adapters_cache is not None and self._adapters_cache[0] > now:
            return dict(self._adapters_cache[1])
        models = await self._models()
        found = {
            name: card.get("root") or ""
            for name, card in models.items()
            if card.get("parent") is not None and name != self.base_model
        }
        self._adapters_cache = (now + self._adapters_ttl_s, found)
        return dict(found)

    async def load_adapter(self, name: str, path: str) -> None:
        """Load adapter ``name`` from a PEFT folder readable by the server, replacing an
        adapter of that name in place.

        Load a changed adapter from a new folder: vLLM keeps prefix-cache blocks computed with
        the previous weights when the same path is loaded again.

        When the folder is visible here too (a shared volume, one machine), it is checked first
        (``services.adapters.inspect_adapter``): vLLM itself accepts, for example, weights whose
        rank disagrees with their config and then serves garbage. A path only the server can
        see is passed on unchecked.
        """
        if Path(path).exists():
            try:
                inspect_adapter(path)
            except InvalidAdapterError as exc:
                raise AdapterLoadError(f"cannot load adapter {name!r} from {path}: {exc}") from None
        response = await self._admin_post(
            "/v1/load_lora_adapter",
            {"lora_name": name, "lora_path": path, "load_inplace": True},
        )
        self._adapters_cache = None
        if response.status_code != 200:
            message = _error_message(response)
            if _is_route_missing(response):
                message = _RUNTIME_LORA_HINT
            raise AdapterLoadError(f"cannot load adapter {name!r} from {path}: {message}")

    async def unload_adapter(self, name: str) -> None:
        response = await self._admin_post("/v1/unload_lora_adapter", {"lora_name": name})
        self._adapters_cache = None
        if response.status_code == 200:
            return
        if _is_route_missing(response):
            raise BackendError(_RUNTIME_LORA_HINT)
        if response.status_code == 404:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded")
        raise BackendError(f"cannot unload adapter {name!r}: {_error_message(response)}")

    # --- plumbing -----------------------------------------------------------------------------

    async def _models(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/models`` as id -> model card."""
        try:
            response = await self._http.get("/v1/models")
        except httpx.HTTPError as err:
            raise _transport_error(err) from err
        if response.status_code != 200:
            raise BackendUnavailableError(
                f"GET /v1/models answered {response.status_code}: {_error_message(response)}"
            )
        return {card["id"]: card for card in response.json()["data"]}

    async def _admin_post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        try:
            return await self._http.post(path, json=payload)
        except httpx.HTTPError as err:
            raise _transport_error(err) from err


# The request and response event hooks of the client append perf_counter() marks here, for the
# request that the current task is making (a context variable: concurrent requests each see
# their own list).
_MARKS: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "wildloop_vllm_marks", default=None
)


async def _mark(_: object) -> None:
    marks = _MARKS.get()
    if marks is not None:
        marks.append(time.perf_counter())


def _between(marks: list[float]) -> float | None:
    """Request sent -> response headers received, from the two hook marks."""
    return marks[1] - marks[0] if len(marks) >= 2 else None


class _Wait:
    """Seconds spent blocked on the server so far, and when the last piece came in."""

    __slots__ = ("last", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.last = 0.0


async def _sse_data(
    pieces: AsyncIterator[bytes], wait: _Wait | None = None
) -> AsyncIterator[bytes]:
    """The payloads of the ``data:`` lines of an SSE byte stream (comments and blank
    separators skipped), however the bytes are split into pieces. ``wait`` adds up the time
    spent waiting for the pieces."""
    pending = b""
    clock = time.perf_counter
    pieces = aiter(pieces)
    while True:
        asked = clock()
        try:
            piece = await anext(pieces)
        except StopAsyncIteration:
            break
        finally:
            if wait is not None:
                wait.last = clock()
                wait.seconds += wait.last - asked
        pending += piece
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):
        yield pending[5:].strip()


def _chunk_error(chunk: dict[str, Any]) -> str:
    error = chunk.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _finish_reason(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _generation_error(err: openai.APIError, adapter: str | None) -> BackendError:
    """Map an ``openai`` exception of a generation request to a backend error."""
    if isinstance(err, openai.APITimeoutError) and not _refused(err):
        # (checked before its base class, APIConnectionError)
        return BackendTimeoutError(f"vLLM did not answer in time: {err}")
    if isinstance(err, openai.APIConnectionError):
        return BackendUnavailableError(f"cannot reach vLLM: {err}")
    status = err.status_code if isinstance(err, openai.APIStatusError) else None
    if status == 404:
        if adapter is not None:
            return UnknownAdapterError(f"no adapter named {adapter!r} is loaded")
        return BackendUnavailableError(f"vLLM does not serve the base model: {err.message}")
    if status in (400, 422):  # e.g. "This model's maximum context length is 2048 tokens..."
        return InvalidGenerationError(err.message)
    if status in (408, 504):
        return BackendTimeoutError(err.message)
    if status is not None and status >= 500:
        return BackendUnavailableError(f"vLLM failed ({status}): {err.message}")
    return BackendError(f"vLLM error: {err.message}")  # auth, rate limit, mid-stream errors


def _refused(err: BaseException) -> bool:
    """A refused connection. The SDK's aiohttp transport reports one as a connect *timeout*
    (its error map picks ``ConnectTimeout`` for aiohttp's ``ClientConnectorError``); the cause
    chain still holds the real error."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or (
            isinstance(seen, aiohttp.ClientConnectorError) and not isinstance(seen, TimeoutError)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _transport_error(err: httpx.HTTPError) -> BackendError:
    if isinstance(err, httpx.TimeoutException):
        return BackendTimeoutError(f"vLLM did not answer in time: {err!r}")
    return BackendUnavailableError(f"cannot reach vLLM: {err!r}")


def _error_message(response: httpx.Response) -> str:
    """The message of a vLLM error body (``{"error": {"message": ...}}``), else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if "detail" in body:
            return str(body["detail"])
    return response.text


def _is_route_missing(response: httpx.Response) -> bool:
    """FastAPI's own 404/405 (no such route), as opposed to a vLLM error body."""
    if response.status_code not in (404, 405):
        return False
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and "error" in body)
