"""A synchronous client of any OpenAI-compatible chat endpoint (vLLM, a hosted API), for the
parts of wildloop that ask a model something: the learner's generator and summarizer, the
checklist judge. Built on the official ``openai`` SDK; every failure is one ``ChatError``.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import urlsplit

import openai

_CONNECT_TIMEOUT_S = 5.0


class ChatError(RuntimeError):
    """The endpoint could not be reached, refused the request, or answered nothing."""


class ChatRejectedError(ChatError):
    """The endpoint refused the request itself (HTTP 400/422), e.g. an unsupported option."""


class ChatModel(Protocol):
    """Something that answers a chat: a remote endpoint or an in-process model."""

    name: str

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        response_format: dict[str, Any] | None = None,
    ) -> str: ...


class ChatEndpoint:
    """``base_url`` is the OpenAI base URL (``http://host:8000/v1``), ``model`` the served name."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 2,
    ) -> None:
        url = urlsplit(base_url or "")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{base_url!r} is not an http(s) URL such as http://host:8000/v1")
        if not model or not model.strip():
            raise ValueError("the model name is empty")
        self.base_url = base_url
        self.name = model
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or "EMPTY",
            timeout=openai.Timeout(timeout_s, connect=min(timeout_s, _CONNECT_TIMEOUT_S)),
            max_retries=max_retries,
        )

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        response_format: dict[str, Any] | None = None,
    ) -> str:
        params: dict[str, Any] = {
            "model": self.name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if response_format is not None:
            params["response_format"] = response_format
        try:
            response = self._client.chat.completions.create(**params)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            raise ChatRejectedError(f"{self.name} at {self.base_url} refused: {exc}") from exc
        except openai.APIError as exc:
            raise ChatError(f"{self.name} at {self.base_url}: {type(exc).__name__}: {exc}") from exc
        if not response.choices or response.choices[0].message.content is None:
            raise ChatError(f"{self.name} at {self.base_url} answered no text")
        return response.choices[0].message.content

    def close(self) -> None:
        self._client.close()
