"""The streamed chunk encoder writes exactly what the chunk model defines."""

from __future__ import annotations

import json

import pytest

from gateway.protocol import ChatCompletionChunk, ChunkChoice, ChunkEncoder, Delta, Usage

TEXTS = [
    "",
    " Paris",
    'a "quoted" word\\ and a backslash',
    "line\nbreak\ttab\r\x00\x1f\x7f",
    "naïve café, 東京, Москва, emoji 🙂👍🏽",
    "\u2028\u2029 separators </script>",
]


def sse(chunk: ChatCompletionChunk) -> bytes:
    return f"data: {chunk.model_dump_json()}\n\n".encode()


@pytest.fixture
def encoder() -> ChunkEncoder:
    return ChunkEncoder("chatcmpl-1", "wildloop", created=1_700_000_000)


def model(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1", model="wildloop", created=1_700_000_000, choices=choices, usage=usage
    )


@pytest.mark.parametrize("text", TEXTS)
def test_a_content_delta_is_byte_for_byte_the_chunk_model(encoder: ChunkEncoder, text: str) -> None:
    assert encoder.content(text) == sse(model([ChunkChoice(delta=Delta(content=text))]))
    payload = json.loads(encoder.content(text).removeprefix(b"data: "))
    assert payload["choices"][0]["delta"]["content"] == text


def test_role_finish_and_usage_events_match_the_chunk_model(encoder: ChunkEncoder) -> None:
    assert encoder.role() == sse(model([ChunkChoice(delta=Delta(role="assistant", content=""))]))
    assert encoder.finish("length") == sse(
        model([ChunkChoice(delta=Delta(), finish_reason="length")])
    )
    usage = Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10)
    assert encoder.usage(7, 3) == sse(model([], usage))


def test_model_names_and_ids_are_escaped_once_in_the_prefix() -> None:
    encoder = ChunkEncoder('id-"x"', 'adapter "v2"', created=5)
    payload = json.loads(encoder.content("hi").removeprefix(b"data: "))
    assert payload["id"] == 'id-"x"'
    assert payload["model"] == 'adapter "v2"'
    assert payload["created"] == 5


def test_a_lone_surrogate_is_replaced_rather_than_failing_the_stream(
    encoder: ChunkEncoder,
) -> None:
    payload = json.loads(encoder.content("a\ud800b").removeprefix(b"data: "))
    assert payload["choices"][0]["delta"]["content"] == "a?b"
