"""What every chat backend does, checked on the real SmolLM2 model.

Each test runs once per backend in ``tests/gateway/conftest.py::BACKENDS``. Completions are kept
short (a few to a couple of dozen tokens): CI runs this on two CPU cores.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from gateway.backends.base import (
    AdapterLoadError,
    BackendTimeoutError,
    BackendUnavailableError,
    ChatBackend,
    ChatMessage,
    Completion,
    GenerationRequest,
    InvalidGenerationError,
    StreamEnd,
    StreamItem,
    TextDelta,
    UnknownAdapterError,
)
from services.models import ModelUnavailableError, ensure_base_model
from services.settings import WildloopSettings
from tests.gateway.conftest import BASE_MODEL, MAX_MODEL_LEN

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

FRANCE = "What is the capital of France?"
COLOUR = "Name a colour."  # the test adapters change this answer from its first token
COUNTING = "Count from 1 to 1000, one number per line."  # answers go on for a long time


def ask(
    question: str = FRANCE,
    *,
    max_tokens: int | None = None,
    adapter: str | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        messages=[ChatMessage("user", question)],
        adapter=adapter,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=seed,
    )


async def collect(stream: AsyncIterator[StreamItem]) -> Completion:
    """A stream as the completion it adds up to; checks it ends with exactly one StreamEnd."""
    items = [item async for item in stream]
    *deltas, end = items
    assert all(isinstance(d, TextDelta) for d in deltas), items
    assert isinstance(end, StreamEnd), items
    text = "".join(d.text for d in deltas if isinstance(d, TextDelta))
    return Completion(text, end.finish_reason, end.prompt_tokens, end.completion_tokens)


@pytest.fixture
async def loaded_adapter(
    chat_backend: ChatBackend, lora_adapter: Path, adapter_name: str
) -> AsyncIterator[str]:
    """``lora_adapter`` loaded under a fresh name for one test."""
    await chat_backend.load_adapter(adapter_name, str(lora_adapter))
    yield adapter_name
    if adapter_name in await chat_backend.adapters():
        await chat_backend.unload_adapter(adapter_name)


# --- plain generation -----------------------------------------------------------------------


async def test_greedy_completion_answers_a_simple_question(chat_backend: ChatBackend) -> None:
    answer = await chat_backend.complete(ask(max_tokens=24))

    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"
    assert answer.prompt_tokens > 5
    assert 0 < answer.completion_tokens <= 24
    assert chat_backend.base_model == BASE_MODEL
    assert await chat_backend.ready()


async def test_stream_yields_the_completion_in_pieces(chat_backend: ChatBackend) -> None:
    whole = await chat_backend.complete(ask(max_tokens=16))

    items = [item async for item in chat_backend.stream(ask(max_tokens=16))]

    deltas = [i for i in items if isinstance(i, TextDelta)]
    assert len(deltas) >= 3
    assert [type(i) for i in items] == [TextDelta] * len(deltas) + [StreamEnd]
    assert "".join(d.text for d in deltas) == whole.text
    assert items[-1] == StreamEnd(whole.finish_reason, whole.prompt_tokens, whole.completion_tokens)


async def test_max_tokens_cuts_the_completion(chat_backend: ChatBackend) -> None:
    answer = await chat_backend.complete(ask(max_tokens=5))

    assert answer.finish_reason == "length"
    assert 0 < answer.completion_tokens <= 5
    assert answer.text


@pytest.mark.parametrize(
    "stop",
    [
        "Paris",  # starts inside the token " Paris"
        "of France",  # spans tokens: " of" must be held back until " France" decides
    ],
)
async def test_stop_string_ends_the_completion_before_it(
    chat_backend: ChatBackend, stop: str
) -> None:
    whole = await chat_backend.complete(ask(max_tokens=24))
    assert stop in whole.text

    stopped = await chat_backend.complete(ask(max_tokens=24, stop=[stop, "never occurs"]))
    streamed = await collect(chat_backend.stream(ask(max_tokens=24, stop=[stop])))

    assert stopped.text == whole.text[: whole.text.index(stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < whole.completion_tokens
    assert (streamed.text, streamed.finish_reason) == (stopped.text, "stop")


async def test_same_seed_samples_the_same_text(chat_backend: ChatBackend) -> None:
    request = ask("Tell me a fun fact.", max_tokens=16, temperature=1.0, top_p=0.95, seed=1234)

    first = await chat_backend.complete(request)
    second = await chat_backend.complete(request)

    assert first.text
    assert second.text == first.text


async def test_too_long_prompt_is_rejected(chat_backend: ChatBackend) -> None:
    with pytest.raises(InvalidGenerationError):
        await chat_backend.complete(ask("hello " * (MAX_MODEL_LEN + 100), max_tokens=4))
    with pytest.raises(InvalidGenerationError):
        await collect(chat_backend.stream(ask("hello " * (MAX_MODEL_LEN + 100), max_tokens=4)))


# --- adapters -------------------------------------------------------------------------------


async def test_adapter_loaded_at_run_time_serves_and_unloads(
    chat_backend: ChatBackend, lora_adapter: Path, adapter_name: str
) -> None:
    base = await chat_backend.complete(ask(COLOUR, max_tokens=8))

    await chat_backend.load_adapter(adapter_name, str(lora_adapter))
    try:
        assert (await chat_backend.adapters())[adapter_name] == str(lora_adapter)
        tuned = await chat_backend.complete(ask(COLOUR, max_tokens=8, adapter=adapter_name))
        base_again = await chat_backend.complete(ask(COLOUR, max_tokens=8))
    finally:
        await chat_backend.unload_adapter(adapter_name)

    assert tuned.text != base.text
    assert base_again == base
    assert adapter_name not in await chat_backend.adapters()
    with pytest.raises(UnknownAdapterError):
        await chat_backend.complete(ask(max_tokens=4, adapter=adapter_name))
    with pytest.raises(UnknownAdapterError):
        await collect(chat_backend.stream(ask(max_tokens=4, adapter=adapter_name)))
    with pytest.raises(UnknownAdapterError):
        await chat_backend.unload_adapter(adapter_name)
    assert await chat_backend.complete(ask(COLOUR, max_tokens=8)) == base


async def test_concurrent_requests_for_different_adapters_never_mix(
    chat_backend: ChatBackend, other_lora_adapter: Path, loaded_adapter: str, adapter_name: str
) -> None:
    other = f"{adapter_name}-other"
    await chat_backend.load_adapter(other, str(other_lora_adapter))
    try:
        requests = [
            ask(question, max_tokens=8, adapter=adapter)
            for question in (COLOUR, FRANCE)
            for adapter in (None, loaded_adapter, other)
        ]
        alone = [await chat_backend.complete(r) for r in requests]
        # Half of them as streams: both paths must keep their adapter.
        together = await asyncio.gather(
            *(
                chat_backend.complete(r) if i % 2 else collect(chat_backend.stream(r))
                for i, r in enumerate(requests)
            )
        )
    finally:
        await chat_backend.unload_adapter(other)

    assert len({a.text for a in alone[:3]}) == 3, "base and both adapters must answer differently"
    assert list(together) == alone


async def test_bad_adapter_folders_are_refused_and_change_nothing(
    chat_backend: ChatBackend, lora_adapter: Path, adapter_name: str, tmp_path: Path
) -> None:
    base = await chat_backend.complete(ask(COLOUR, max_tokens=8))

    for make_bad in BAD_ADAPTERS:
        folder = make_bad(lora_adapter, tmp_path / make_bad.__name__)
        with pytest.raises(AdapterLoadError):
            await chat_backend.load_adapter(adapter_name, str(folder))
        assert adapter_name not in await chat_backend.adapters(), make_bad.__name__
        assert await chat_backend.complete(ask(COLOUR, max_tokens=8)) == base, make_bad.__name__

    with pytest.raises(UnknownAdapterError):
        await chat_backend.complete(ask(max_tokens=4, adapter=adapter_name))


async def test_bad_adapter_leaves_loaded_adapters_intact(
    chat_backend: ChatBackend, loaded_adapter: str, lora_adapter: Path, tmp_path: Path
) -> None:
    before = await chat_backend.complete(ask(COLOUR, max_tokens=8, adapter=loaded_adapter))

    with pytest.raises(AdapterLoadError):
        bad = wrong_rank(lora_adapter, tmp_path / "bad")
        await chat_backend.load_adapter(loaded_adapter, str(bad))

    assert (await chat_backend.adapters())[loaded_adapter] == str(lora_adapter)
    assert await chat_backend.complete(ask(COLOUR, max_tokens=8, adapter=loaded_adapter)) == before


# --- cancellation ---------------------------------------------------------------------------


async def test_closing_a_stream_stops_generation(
    chat_backend: ChatBackend, loaded_adapter: str
) -> None:
    """A long generation is abandoned after its first piece; a request for an adapter (which a
    backend that serialises adapter switches serves only once the model is free) comes back in
    the time of a short generation, not of the abandoned long one."""
    stream = chat_backend.stream(ask(COUNTING, max_tokens=MAX_MODEL_LEN - 64))
    assert isinstance(await anext(stream), TextDelta)

    started = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - started < 1.0

    started = time.monotonic()
    answer = await chat_backend.complete(ask(max_tokens=4, adapter=loaded_adapter))
    assert answer.completion_tokens > 0
    assert time.monotonic() - started < 15.0  # the abandoned one would take minutes


# --- the local backend's own limits ---------------------------------------------------------


async def test_local_backend_times_out_and_fails_open_streams_on_close(
    base_model_dir: Path,
) -> None:
    from gateway.backends.local import LocalBackend  # noqa: PLC0415 - needs torch

    backend = LocalBackend(base_model_dir, base_model=BASE_MODEL, timeout_s=1.0)
    await backend.start()
    try:
        started = time.monotonic()
        with pytest.raises(BackendTimeoutError):
            await backend.complete(ask(COUNTING, max_tokens=1000))
        assert time.monotonic() - started < 3.0
        assert (await backend.complete(ask(max_tokens=1))).completion_tokens == 1

        stream = backend.stream(ask(COUNTING, max_tokens=1000))
        assert isinstance(await anext(stream), TextDelta)
    finally:
        await backend.close()
    assert not await backend.ready()
    with pytest.raises(BackendUnavailableError):
        async for _ in stream:
            pass
    with pytest.raises(BackendUnavailableError):
        await backend.complete(ask(max_tokens=1))


# --- the base model folder ------------------------------------------------------------------


def test_base_model_is_converted_once_then_reused(
    model_settings: WildloopSettings, base_model_dir: Path
) -> None:
    weights = base_model_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns

    started = time.perf_counter()
    again = ensure_base_model(model_settings)

    assert time.perf_counter() - started < 0.5
    assert again == base_model_dir
    assert weights.stat().st_mtime_ns == written
    assert (again / "config.json").is_file()
    assert (again / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((again / "config.json").read_text())


def test_configured_base_model_folder_is_used_as_is(base_model_dir: Path, tmp_path: Path) -> None:
    configured = WildloopSettings(data_dir=tmp_path, base_model_path=base_model_dir)
    assert ensure_base_model(configured) == base_model_dir
    assert not (tmp_path / "models").exists()

    with pytest.raises(ModelUnavailableError):
        ensure_base_model(WildloopSettings(data_dir=tmp_path, base_model_path=tmp_path))


# --- broken adapter folders -----------------------------------------------------------------


def empty_folder(_good: Path, folder: Path) -> Path:
    folder.mkdir()
    return folder


def missing_folder(_good: Path, folder: Path) -> Path:
    return folder


def garbled_config(good: Path, folder: Path) -> Path:
    shutil.copytree(good, folder)
    (folder / "adapter_config.json").write_text("{not json")
    return folder


def corrupt_weights(good: Path, folder: Path) -> Path:
    shutil.copytree(good, folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return folder


def wrong_rank(good: Path, folder: Path) -> Path:
    """Valid files whose weights do not fit the config: PEFT builds the layers, then fails to
    fill them. With random initialisation, layers left behind would change every answer."""
    shutil.copytree(good, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = config["lora_alpha"] = config["r"] * 2
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


BAD_ADAPTERS: list[Callable[[Path, Path], Path]] = [
    missing_folder,
    empty_folder,
    garbled_config,
    corrupt_weights,
    wrong_rank,
]
