"""The in-process chat backend: transformers for the base model, PEFT for LoRA adapters.

It serves the base model and any number of LoRA adapters from one copy of the base weights. PEFT
keeps every loaded adapter inside the model and applies one of them (or none) to every forward
pass, so "which adapter" is model-wide state. That shapes the design:

Concurrency: requests are admitted in arrival order by :class:`_Gate`, which lets requests for the
*same* adapter (or the base model) generate together, up to ``max_concurrency`` at once, and
switches the model to another adapter only when nothing is generating. A request therefore always
runs with the adapter it asked for, never one that another request switched to. With the default
``max_concurrency=1`` generation is simply serialised; a larger value lets concurrent requests for
one adapter share the machine (worth it on a GPU, where one generation leaves the device idle).
Strict arrival order means a busy adapter cannot starve another one. Loading and unloading
adapters change the model too, so they wait until nothing generates and hold off new requests.

Threads: ``generate()`` blocks, so each request runs in a worker thread of the backend's own pool
(``max_concurrency`` threads) and never on the event loop. The gate is built on ``threading``
primitives and each request brings its own event-loop queue, so the backend is not tied to the
loop that started it.

Streaming: a ``transformers`` streamer turns each new token into text as it is generated (holding
back an incomplete UTF-8 character, and any tail that may be the start of a stop string) and hands
it to the request's ``asyncio.Queue`` with ``call_soon_threadsafe``. ``complete()`` is the same
stream, collected, so both return the same text. Closing the stream (a client gone) sets the
request's cancel flag, which a stopping criterion checks after every token; a timed-out request
stops the same way, so a worker never keeps generating for nobody.

Sampling: ``temperature`` 0 or unset means greedy decoding. Otherwise the next token is drawn by a
logits processor with a ``torch.Generator`` of the request's own, seeded with ``seed`` when given,
so a seed reproduces its text even while other requests sample at the same time
(``generate(do_sample=True)`` would draw from torch's process-wide generator instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftConfig, PeftModel, PeftType
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from gateway.backends.base import (
    AdapterLoadError,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ChatMessage,
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

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512
"""Completion budget when a request sets none (capped by what is left of the context)."""

_POLL_S = 0.05
"""How often a request waiting for its turn re-checks whether it was cancelled or timed out."""

_Event = TextDelta | StreamEnd | BaseException


class _AbandonedError(Exception):
    """The request was cancelled or timed out before it got its turn."""


# --- admission ------------------------------------------------------------------------------


class _Gate:
    """Admits generations in arrival order, together only when they use the same adapter.

    A generation asks for a key (adapter name, ``None`` for the base model). The request at the
    head of the queue is admitted when nothing runs, or when the running generations use its key
    and fewer than ``limit`` run. Before admitting a request whose key differs from the model's
    current one, the gate calls ``switch(key)``, while nothing runs. ``exclusive()`` waits until
    nothing runs and holds everyone else off (for loading and unloading adapters).
    """

    _UNKNOWN = object()

    def __init__(self, limit: int, switch: Callable[[str | None], None]) -> None:
        self._limit = limit
        self._switch = switch
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._running = 0
        self._exclusive = False
        self._current: object = self._UNKNOWN

    @contextmanager
    def shared(self, key: str | None, abandoned: Callable[[], bool]) -> Iterator[None]:
        """Hold a generation slot for ``key``; raises ``_AbandonedError`` if ``abandoned()``
        turns true while waiting."""
        with self._cond:
            self._wait_turn(lambda: self._admits(key), abandoned)
            if key != self._current:  # nothing runs: _admits guarantees it
                self._current = self._UNKNOWN  # stays unknown if the switch fails half-way
                self._switch(key)
                self._current = key
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model alone; the current adapter is unknown afterwards."""
        with self._cond:
            self._wait_turn(lambda: self._running == 0, lambda: False)
            self._exclusive = True
            self._current = self._UNKNOWN
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def _admits(self, key: str | None) -> bool:
        if self._running == 0:
            return True
        return key == self._current and self._running < self._limit

    def _wait_turn(self, can_run: Callable[[], bool], abandoned: Callable[[], bool]) -> None:
        """Queue up and wait (holding ``_cond``) until first in line, not excluded, and
        ``can_run()``. Leaves the queue either way and wakes the next in line."""
        ticket = object()
        self._queue.append(ticket)
        try:
            while not (self._queue[0] is ticket and not self._exclusive and can_run()):
                if abandoned():
                    raise _AbandonedError
                self._cond.wait(_POLL_S)
        finally:
            self._queue.remove(ticket)
            self._cond.notify_all()


# --- one request ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """A validated request on its way through a worker thread."""

    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    deadline: float
    emit: Callable[[_Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def abandoned(self) -> bool:
        return self.cancelled.is_set() or self.expired()

    @property
    def greedy(self) -> bool:
        return not self.temperature


class _TextAssembler:
    """Turns generated token ids into text deltas, applying stop strings.

    Every step decodes all generated ids again (cheap next to a forward pass) so that characters
    spanning several tokens come out whole. Text that ends in an incomplete character, or in a
    prefix of a stop string, is held back until the next token decides it. Tokens after a stop
    string are ignored (generation halts at the next step).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._emitted = 0
        self.stopped = False

    @property
    def count(self) -> int:
        return len(self._ids)

    @property
    def last(self) -> int | None:
        return self._ids[-1] if self._ids else None

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token)
        text = self._decode(self._ids)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._take(text[:cut])
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character
            return ""
        return self._take(text[: len(text) - self._stop_prefix(text)])

    def flush(self) -> str:
        """What is still held back, once generation has ended."""
        return "" if self.stopped else self._take(self._decode(self._ids))

    def _take(self, text: str) -> str:
        delta = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, max(0, self._emitted)) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that starts some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class _Streamer(BaseStreamer):
    """Feeds tokens from ``generate()`` to the assembler and the request's queue."""

    def __init__(self, job: _Job, assembler: _TextAssembler) -> None:
        self._job = job
        self._assembler = assembler
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            delta = self._assembler.push(int(token))
            if delta:
                self._job.emit(TextDelta(delta))

    def end(self) -> None:
        tail = self._assembler.flush()
        if tail and not self._job.abandoned():
            self._job.emit(TextDelta(tail))


class _Halt(StoppingCriteria):
    """Stops generation after a stop string, or once the request is cancelled or timed out."""

    def __init__(self, job: _Job, assembler: _TextAssembler) -> None:
        self._job = job
        self._assembler = assembler

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        halt = self._assembler.stopped or self._job.abandoned()
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


class _SeededSampler(LogitsProcessor):
    """Draws the next token with the request's own generator (temperature, then top-p) and
    leaves only that token possible, so ``generate()``'s greedy pick selects it."""

    def __init__(self, temperature: float, top_p: float | None, generator: torch.Generator):
        self._warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(temperature)]
        if top_p is not None and top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(float(top_p)))
        self._generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self._warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=self._generator)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, choice, 0.0)


@dataclass(frozen=True, slots=True)
class _LoadedAdapter:
    peft_name: str  # our own name inside PEFT: public names may contain "." and replace atomically
    path: str


# --- the backend ----------------------------------------------------------------------------


class LocalBackend:
    """A :class:`~gateway.backends.base.ChatBackend` running the model in this process.

    ``model_dir`` is a transformers model folder with a chat template (see
    ``services.models.ensure_base_model``); ``device`` defaults to CUDA when available (bfloat16)
    and the CPU otherwise (float32). ``max_concurrency`` bounds how many requests for one adapter
    generate at once; ``max_model_len`` bounds prompt plus completion, in tokens; ``timeout_s``
    bounds a request from its arrival (queueing included) to its last token.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        base_model: str,
        device: str | None = None,
        max_concurrency: int = 1,
        max_model_len: int = 2048,
        timeout_s: float = 120,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.base_model = base_model
        self._model_dir = Path(model_dir)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._max_concurrency = max_concurrency
        self._max_model_len = max_model_len
        self._timeout_s = timeout_s
        self._gate = _Gate(max_concurrency, self._activate)
        self._tokenizer_lock = threading.Lock()
        self._serial = itertools.count(1)
        self._adapters: dict[str, _LoadedAdapter] = {}  # replaced, never mutated: see _publish
        self._jobs: set[_Job] = set()
        self._tokenizer: Any = None
        self._base: PreTrainedModel | None = None
        self._peft: PeftModel | None = None  # wraps _base once an adapter is loaded
        self._eos_ids: frozenset[int] = frozenset()
        self._executor: ThreadPoolExecutor | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load tokenizer and model (in a thread: it takes seconds)."""
        if self._executor is not None:
            return
        await asyncio.to_thread(self._load_model)
        self._gate = _Gate(self._max_concurrency, self._activate)  # a fresh model: no adapter
        self._executor = ThreadPoolExecutor(
            max_workers=self._max_concurrency, thread_name_prefix="local-backend"
        )

    async def close(self) -> None:
        """Stop serving: cancel in-flight requests, wait for the workers to notice (one token at
        most), then drop the model and its adapters (a later ``start()`` loads afresh)."""
        executor, self._executor = self._executor, None
        for job in list(self._jobs):
            job.cancelled.set()
            job.emit(BackendUnavailableError("the backend was closed"))
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        self._publish({})
        self._base = self._peft = self._tokenizer = None

    async def ready(self) -> bool:
        return self._executor is not None and self._base is not None

    def _load_model(self) -> None:
        tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        if not tokenizer.chat_template:
            raise BackendUnavailableError(f"{self._model_dir}: the tokenizer has no chat template")
        dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self._model_dir, dtype=dtype)
        model.to(self._device).eval()
        self._eos_ids = _eos_ids(model, tokenizer)
        # The request decides how to decode: drop the checkpoint's sampling defaults, which
        # generate() would otherwise merge into every call.
        model.generation_config = GenerationConfig(
            bos_token_id=model.generation_config.bos_token_id,
            eos_token_id=sorted(self._eos_ids),
            pad_token_id=_pad_id(tokenizer, self._eos_ids),
        )
        self._tokenizer = tokenizer
        self._base = model
        log.info("local backend: %s on %s (%s)", self._model_dir, self._device, dtype)

    # --- generation --------------------------------------------------------------------------

    async def complete(self, request: GenerationRequest) -> Completion:
        parts: list[str] = []
        async for item in self.stream(request):
            if isinstance(item, TextDelta):
                parts.append(item.text)
            else:
                return Completion(
                    text="".join(parts),
                    finish_reason=item.finish_reason,
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                )
        raise BackendError("stream ended without StreamEnd")  # pragma: no cover - _run always ends

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """Deltas as tokens are generated, then one :class:`StreamEnd`.

        The async side owns the deadline: it gives up at ``timeout_s`` even if a forward pass is
        slow to return, and the worker then stops at its next token."""
        executor = self._require_started()
        events: asyncio.Queue[_Event] = asyncio.Queue()
        job = self._plan(request, _deliver_to(asyncio.get_running_loop(), events))
        self._jobs.add(job)
        try:
            executor.submit(self._run, job)
            while True:
                event = await self._next_event(events, job)
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, StreamEnd):
                    return
        finally:
            job.cancelled.set()
            self._jobs.discard(job)

    async def _next_event(self, events: asyncio.Queue[_Event], job: _Job) -> _Event:
        try:
            async with asyncio.timeout(max(0.0, job.deadline - time.monotonic())):
                return await events.get()
        except TimeoutError:
            raise self._timeout_error() from None

    def _timeout_error(self) -> BackendTimeoutError:
        return BackendTimeoutError(f"generation took longer than {self._timeout_s:g} s")

    def _require_started(self) -> ThreadPoolExecutor:
        if self._executor is None or self._base is None:
            raise BackendUnavailableError("the local model is not loaded (start() not called?)")
        return self._executor

    def _plan(self, request: GenerationRequest, emit: Callable[[_Event], None]) -> _Job:
        """Validate the request and tokenise its prompt (about a millisecond, done inline)."""
        _check_sampling(request)
        if request.adapter is not None and request.adapter not in self._adapters:
            raise UnknownAdapterError(f"no adapter named {request.adapter!r} is loaded")
        prompt_ids = self._encode(request.messages)
        room = self._max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidGenerationError(
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length "
                f"is {self._max_model_len} tokens"
            )
        max_tokens = request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS
        if request.max_tokens is not None and request.max_tokens > room:
            raise InvalidGenerationError(
                f"max_tokens={request.max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                f"exceed this model's maximum context length of {self._max_model_len} tokens"
            )
        return _Job(
            prompt_ids=prompt_ids,
            max_new_tokens=min(max_tokens, room),
            adapter=request.adapter,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=_stop_strings(request.stop),
            deadline=time.monotonic() + self._timeout_s,
            emit=emit,
        )

    def _encode(self, messages: Sequence[ChatMessage]) -> list[int]:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        with self._tokenizer_lock:
            text = self._tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
            ids: list[int] = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def _run(self, job: _Job) -> None:
        """Worker thread: wait for the gate, generate, report the outcome to the request."""
        try:
            with self._gate.shared(job.adapter, job.abandoned):
                end = self._generate(job)
        except _AbandonedError:
            end = None
        except BackendError as exc:
            job.emit(exc)
            return
        except Exception as exc:
            log.exception("local generation failed")
            job.emit(BackendError(f"generation failed: {exc}"))
            return
        if end is not None:
            job.emit(end)
        elif job.expired():
            job.emit(self._timeout_error())

    def _generate(self, job: _Job) -> StreamEnd | None:
        """Run ``generate()`` for one request; ``None`` if it was cancelled or timed out."""
        model = self._peft if self._peft is not None else self._base
        if model is None or job.abandoned():  # closed, or given up while it waited
            return None
        assembler = _TextAssembler(self._decode, job.stop)
        input_ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self._device)
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=job.max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList(self._samplers(job)),
                stopping_criteria=StoppingCriteriaList([_Halt(job, assembler)]),
                streamer=_Streamer(job, assembler),
            )
        finish = self._finish_reason(job, assembler)
        if finish is None:
            return None
        return StreamEnd(finish, len(job.prompt_ids), assembler.count)

    def _samplers(self, job: _Job) -> list[LogitsProcessor]:
        if job.greedy:
            return []
        generator = torch.Generator(device=self._device)
        if job.seed is None:
            generator.seed()
        else:
            generator.manual_seed(job.seed & 0xFFFF_FFFF_FFFF_FFFF)
        return [_SeededSampler(float(job.temperature or 1.0), job.top_p, generator)]

    def _finish_reason(self, job: _Job, assembler: _TextAssembler) -> FinishReason | None:
        if assembler.stopped or assembler.last in self._eos_ids:
            return "stop"
        if assembler.count >= job.max_new_tokens:
            return "length"
        return None  # halted early: cancelled or timed out

    # --- adapters ----------------------------------------------------------------------------

    async def adapters(self, *, fresh: bool = False) -> dict[str, str]:
        """The adapters this process holds (always current: ``fresh`` changes nothing)."""
        return {name: loaded.path for name, loaded in self._adapters.items()}

    async def load_adapter(self, name: str, path: str) -> None:
        """Load (or atomically replace) adapter ``name``; waits for running generations."""
        if not name:
            raise AdapterLoadError("an adapter needs a name")
        folder = Path(path)
        try:
            inspect_adapter(folder)  # cheap checks first: bad folders never touch the model
        except InvalidAdapterError as exc:
            raise AdapterLoadError(f"cannot load adapter {name!r} from {path}: {exc}") from None
        await self._exclusively(self._attach, name, folder)

    async def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded")
        await self._exclusively(self._detach, name)

    async def _exclusively(self, action: Callable[..., None], *args: Any) -> None:
        """Run ``action`` in a worker thread while no generation runs."""
        executor = self._require_started()

        def locked() -> None:
            with self._gate.exclusive():
                action(*args)

        await asyncio.get_running_loop().run_in_executor(executor, locked)

    def _attach(self, name: str, folder: Path) -> None:
        config = _lora_config(folder)
        peft_name = f"adapter{next(self._serial)}"
        try:
            self._inject(peft_name, config, folder)
        except Exception as exc:
            self._remove(peft_name)
            raise AdapterLoadError(f"cannot load adapter {name!r} from {folder}: {exc}") from exc
        previous = self._adapters.get(name)
        self._publish({**self._adapters, name: _LoadedAdapter(peft_name, str(folder))})
        if previous is not None:
            self._remove(previous.peft_name)
        log.info("loaded adapter %s from %s", name, folder)

    def _inject(self, peft_name: str, config: PeftConfig, folder: Path) -> None:
        """Add the adapter's layers and weights; the first adapter wraps the base model."""
        if self._peft is None:
            wrapper = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
            self._peft = wrapper(self._base, config, adapter_name=peft_name)
        result = self._peft.load_adapter(
            str(folder), adapter_name=peft_name, torch_device=str(self._device)
        )
        unfit = [*result.missing_keys, *result.unexpected_keys]
        if unfit:
            raise AdapterLoadError(f"weights do not fit this model, e.g. {unfit[:3]}")
        self._peft.eval()

    def _detach(self, name: str) -> None:
        loaded = self._adapters.get(name)
        if loaded is None:  # another unload, queued before this one, got there first
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded")
        self._publish({k: v for k, v in self._adapters.items() if k != name})
        self._remove(loaded.peft_name)
        log.info("unloaded adapter %s", name)

    def _remove(self, peft_name: str) -> None:
        """Delete one PEFT adapter; the last one unwraps the base model entirely."""
        if self._peft is None:  # wrapping the base failed half-way
            _strip_adapter_layers(self._base)
            return
        if peft_name not in self._peft.peft_config:
            return
        remaining = [n for n in self._peft.peft_config if n != peft_name]
        if remaining:
            if self._peft.active_adapter == peft_name:  # else PEFT warns while it picks one
                self._peft.set_adapter(remaining[0], inference_mode=True)
            self._peft.delete_adapter(peft_name)
            return
        self._base = self._peft.unload()
        self._peft = None

    def _publish(self, adapters: dict[str, _LoadedAdapter]) -> None:
        """Replace the registry in one assignment: the event loop reads it without a lock."""
        self._adapters = adapters

    def _activate(self, adapter: str | None) -> None:
        """Point the model at ``adapter`` (``None``: the base). Called by the gate while nothing
        generates, so per-layer switches are used rather than ``disable_adapter()``, a context
        that one request would leave while others of its group still generate."""
        if adapter is None:
            if self._peft is not None:
                self._peft.base_model.disable_adapter_layers()
            return
        loaded = self._adapters.get(adapter)
        if loaded is None or self._peft is None:  # unloaded while the request waited
            raise UnknownAdapterError(f"no adapter named {adapter!r} is loaded")
        self._peft.base_model.enable_adapter_layers()
        self._peft.set_adapter(loaded.peft_name, inference_mode=True)


# --- helpers --------------------------------------------------------------------------------


def _check_sampling(request: GenerationRequest) -> None:
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidGenerationError("max_tokens must be at least 1")
    if request.temperature is not None and request.temperature < 0:
        raise InvalidGenerationError("temperature must not be negative")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise InvalidGenerationError("top_p must be in (0, 1]")


def _stop_strings(stop: Sequence[str] | str) -> tuple[str, ...]:
    """Non-empty stop strings; a lone string is one stop string, not one per character."""
    return tuple(s for s in ((stop,) if isinstance(stop, str) else stop) if s)


def _deliver_to(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_Event]
) -> Callable[[_Event], None]:
    """A thread-safe ``emit`` that hands events to ``queue`` on ``loop``."""

    def emit(event: _Event) -> None:
        # RuntimeError: the loop is closed, so nobody waits for this request any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, event)

    return emit


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> frozenset[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)


def _pad_id(tokenizer: Any, eos_ids: frozenset[int]) -> int | None:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return min(eos_ids) if eos_ids else None


def _lora_config(folder: Path) -> PeftConfig:
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise AdapterLoadError(f"{folder}: unreadable adapter_config.json: {exc}") from exc
    if config.peft_type != PeftType.LORA:
        raise AdapterLoadError(f"{folder}: a {config.peft_type} adapter; only LoRA is served")
    config.inference_mode = True
    return config


def _strip_adapter_layers(model: torch.nn.Module | None) -> None:
    """Put back the original layers wherever PEFT injected adapter layers."""
    if model is None:
        return
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
