"""The interface every chat backend implements (local transformers+PEFT, vLLM).

A backend serves a base model plus any number of LoRA adapters addressed by name, generates
whole completions or token streams, and loads/unloads adapters at run time. Errors are raised as
the exceptions below; the gateway maps them to OpenAI-style HTTP errors in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    messages: Sequence[ChatMessage]
    adapter: str | None = None  # None = the base model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] = field(default=())
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # Seconds the backend was blocked on a model server (request sent -> answer received), for
    # a backend that calls one; None for an in-process model. See ``StreamEnd.upstream_s``.
    upstream_s: float | None = field(default=None, compare=False)
    # When the request went out and the answer came in (``time.perf_counter()``), for a backend
    # that calls a model server. See ``StreamEnd.upstream_sent_at``.
    upstream_sent_at: float | None = field(default=None, compare=False)
    upstream_last_at: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of generated text, in order."""

    text: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item of every stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # Seconds the backend was blocked on a model server's socket (from the request going out to
    # the end of the body), for a backend that calls one. Its own work in the gateway's process
    # (building the request, parsing chunks) is excluded, so the gateway can report the time it
    # added. None for an in-process model, whose whole time is generation.
    upstream_s: float | None = field(default=None, compare=False)
    # When the request went out to the model server and when the last piece of the answer came
    # in (``time.perf_counter()``), for a backend that calls one. Between the two the gateway
    # relays, its per-chunk work overlapped with generation; before and after them is the
    # gateway's share of the user's wait (``RequestTiming``). None for an in-process model:
    # the gateway then uses the moments it called the backend and got its last item.
    upstream_sent_at: float | None = field(default=None, compare=False)
    upstream_last_at: float | None = field(default=None, compare=False)


StreamItem = TextDelta | StreamEnd


class BackendError(RuntimeError):
    """Base class of backend failures."""


class BackendUnavailableError(BackendError):
    """The model server cannot be reached or is not ready (HTTP 503)."""


class BackendTimeoutError(BackendError):
    """Generation did not finish in time (HTTP 504)."""


class UnknownAdapterError(BackendError):
    """No adapter of that name is loaded (HTTP 404)."""


class AdapterLoadError(BackendError):
    """An adapter folder could not be loaded (HTTP 400)."""


class InvalidGenerationError(BackendError):
    """The request is invalid for this model, e.g. the prompt is too long (HTTP 400)."""


@runtime_checkable
class ChatBackend(Protocol):
    """Implementations must be safe for many concurrent requests on one event loop."""

    base_model: str

    async def start(self) -> None:
        """Load or connect; called once before serving."""
        ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True when a request would be served now."""
        ...

    async def complete(self, request: GenerationRequest) -> Completion: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """Text deltas as they are generated, then exactly one ``StreamEnd``, as soon as the
        answer is complete. Closing the iterator early (client gone) stops generation; after
        ``StreamEnd``, iterate it to its end instead, where a backend still has work to finish
        (vLLM: reading the rest of the HTTP body, which keeps the connection)."""
        ...

    async def adapters(self, *, fresh: bool = False) -> dict[str, str]:
        """Loaded adapters: name -> path. A backend that keeps a recent copy of the list asks
        its server again when ``fresh`` (an adapter another gateway process just loaded)."""
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Load (or replace) adapter ``name`` from a PEFT adapter folder."""
        ...

    async def unload_adapter(self, name: str) -> None: ...
