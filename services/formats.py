"""The fixed offline formats (conversations and turn labels as JSON Lines; FORMATS.md).

Unknown keys are accepted and kept (``extra="allow"``) so a record the project re-writes keeps
them. Parsing is strict about what the format does define.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class MessageRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: str

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ConversationRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    conversation_id: str = Field(min_length=1, max_length=256)
    messages: list[MessageRecord]

    @model_validator(mode="after")
    def _system_only_first(self) -> ConversationRecord:
        for i, m in enumerate(self.messages):
            if m.role == "system" and i != 0:
                raise ValueError(f"messages.{i}: a system message may only come first")
        return self

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def labelable_turns(self) -> list[int]:
        """Indices of user messages that follow at least one assistant message."""
        seen_assistant = False
        out: list[int] = []
        for i, m in enumerate(self.messages):
            if m.role == "assistant":
                seen_assistant = True
            elif m.role == "user" and seen_assistant:
                out.append(i)
        return out


class LabelRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    conversation_id: str
    turn: int = Field(ge=0)
    polarity: Literal["SAT", "DSAT", "MIXED", "NEUTRAL"]
    sat: list[str]
    dsat: list[str]
    category: str
    confidence: float = Field(ge=0.0, le=1.0)
    tier: str


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    message: str


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    return f"{where}: {err['msg']}"


T = TypeVar("T", bound=BaseModel)


def read_jsonl(stream: IO[str], model: type[T]) -> Iterator[tuple[int, T | LineError]]:
    """Yield (line number, record or error) for every non-blank line."""
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, LineError(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        try:
            yield number, model.model_validate(doc)
        except ValidationError as exc:
            yield number, LineError(number, _first_error(exc))


def write_jsonl_atomic(path: Path, records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write records to ``path`` through a temporary file, so a failure leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for rec in records:
                doc = rec.model_dump(mode="json") if isinstance(rec, BaseModel) else rec
                out.write(json.dumps(doc, ensure_ascii=False) + "\n")
                count += 1
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return count
