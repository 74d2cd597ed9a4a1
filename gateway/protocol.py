"""Wire models of the gateway's HTTP API (OpenAI chat completions, models, feedback, errors)."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# --- requests ------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None

    def text(self) -> str:
        """The message's text; only text content parts are supported."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts: list[str] = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part type {part.type!r} is not supported (text only)")
            texts.append(part.text)
        return "".join(texts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's request the gateway honours; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[RequestMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only n=1 is supported.")
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conversation_id: str = Field(min_length=1, max_length=256)
    turn: int = Field(ge=0, description="Index of the assistant message the feedback is about.")
    rating: Literal["up", "down"]
    comment: str | None = Field(default=None, max_length=10_000)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=128)


# --- responses -----------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "wildloop"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackAccepted(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    conversation_id: str
    turn: int
    rating: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

    @classmethod
    def of(
        cls, message: str, type_: str, code: str | None = None, param: str | None = None
    ) -> dict[str, Any]:
        return cls(
            error=ErrorBody(message=message, type=type_, code=code, param=param)
        ).model_dump()


class ChunkEncoder:
    """The SSE events of one streamed completion, as bytes, without a model per chunk.

    Every generated token is one ``chat.completion.chunk`` event, so encoding runs once per
    token for every open stream. Building and dumping a :class:`ChatCompletionChunk` costs
    ~6.6 us; this splices the JSON-escaped text into a prefix made once per stream (~1.3 us). The
    bytes are exactly ``data: <ChatCompletionChunk(...).model_dump_json()>\\n\\n``
    (``tests/gateway/test_protocol.py`` checks it), so the model stays the format's definition.
    """

    __slots__ = ("_content", "_head", "_tail")

    def __init__(self, chunk_id: str, model: str, created: int | None = None) -> None:
        head = ChatCompletionChunk(id=chunk_id, model=model, created=created or _now(), choices=[])
        dumped = head.model_dump_json()
        # {"id":..,"object":..,"created":..,"model":..,"choices":[],"usage":null}
        cut = dumped.rindex('"choices":[]')
        self._head = ("data: " + dumped[:cut]).encode()
        self._content = self._head + b'"choices":[{"index":0,"delta":{"role":null,"content":'
        self._tail = b'},"finish_reason":null,"logprobs":null}],"usage":null}\n\n'

    def content(self, text: str) -> bytes:
        """A delta carrying ``text``."""
        return self._content + _json_string(text) + self._tail

    def role(self) -> bytes:
        """The first event: the assistant role with empty content."""
        return self._event([ChunkChoice(delta=Delta(role="assistant", content=""))], None)

    def finish(self, reason: str) -> bytes:
        return self._event([ChunkChoice(delta=Delta(), finish_reason=reason)], None)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The closing usage event (``stream_options.include_usage``), with no choices."""
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return self._event([], usage)

    def _event(self, choices: list[ChunkChoice], usage: Usage | None) -> bytes:
        rest = ChatCompletionChunk(id="", model="", choices=choices, usage=usage).model_dump_json()
        return self._head + rest[rest.index('"choices":') :].encode() + b"\n\n"


def _json_string(text: str) -> bytes:
    """``text`` as a JSON string literal, UTF-8, as pydantic writes it (no ASCII escaping). A
    lone surrogate, which pydantic refuses, becomes ``?`` rather than failing the stream."""
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "replace")
