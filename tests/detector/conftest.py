"""Fixtures for the detector tests: the session's one vLLM server (tests/support/vllm_server.py).

When the gateway tests run in the same session, both directories share the one server (the first
to ask starts it); it serves the root conftest's ``base_model_dir``.
"""

from __future__ import annotations

from tests.support.vllm_server import vllm_server_fixture  # noqa: F401 - fixture
