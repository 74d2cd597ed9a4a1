"""Offline detection: conversations JSON Lines in, turn labels JSON Lines out (FORMATS.md).

Every eligible user turn of every well-formed conversation gets exactly one label, in input
order. A line that is not UTF-8, not JSON, not a conversation, or repeats an earlier
conversation id is reported with its line number and skipped; the output is still written (to a
temporary file renamed into place, so it is never half-written) and the caller exits with 3.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from services.detector.cascade import Cascade
from services.detector.extract import record_contexts
from services.detector.judgement import TurnContext, Verdict
from services.events.schemas import DsatRubric, SatRubric
from services.formats import ConversationRecord, LineError, read_jsonl, write_jsonl_atomic

_SAT_ORDER = {r: i for i, r in enumerate(SatRubric)}
_DSAT_ORDER = {r: i for i, r in enumerate(DsatRubric)}


@dataclass
class DetectReport:
    conversations: int = 0
    labels: int = 0
    errors: list[LineError] = field(default_factory=list)
    by_polarity: dict[str, int] = field(default_factory=dict)
    by_tier: dict[str, int] = field(default_factory=dict)


def label_record(context: TurnContext, verdict: Verdict) -> dict[str, Any]:
    """The public turn-label record; rubrics in the paper's order."""
    return {
        "conversation_id": context.conversation_id,
        "turn": context.turn,
        "polarity": verdict.polarity.value,
        "sat": [r.value for r in sorted(verdict.sat, key=_SAT_ORDER.__getitem__)],
        "dsat": [r.value for r in sorted(verdict.dsat, key=_DSAT_ORDER.__getitem__)],
        "category": verdict.category.value,
        "confidence": round(verdict.confidence, 4),
        "tier": verdict.tier,
    }


def read_conversations(
    stream: IO[bytes], report: DetectReport
) -> Iterator[tuple[int, ConversationRecord]]:
    """Well-formed conversations with their line numbers; problems go to ``report.errors``."""
    seen: dict[str, int] = {}
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.errors.append(LineError(number, f"not UTF-8 (byte {exc.start})"))
            continue
        for _, parsed in read_jsonl(io.StringIO(text), ConversationRecord):
            if isinstance(parsed, LineError):
                report.errors.append(LineError(number, parsed.message))
                continue
            first = seen.setdefault(parsed.conversation_id, number)
            if first != number:
                report.errors.append(
                    LineError(
                        number,
                        f"conversation_id {parsed.conversation_id!r} repeats line {first}",
                    )
                )
                continue
            yield number, parsed


def detect_file(
    input_path: Path,
    output_path: Path,
    cascade: Cascade,
    *,
    history_messages: int,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> DetectReport:
    """Label ``input_path`` into ``output_path``; ``progress(bytes_read)`` is called as it goes."""
    report = DetectReport()

    def labels() -> Iterator[dict[str, Any]]:
        batch: list[TurnContext] = []
        with input_path.open("rb") as stream:
            for _, record in read_conversations(stream, report):
                report.conversations += 1
                batch.extend(record_contexts(record, history_messages=history_messages))
                if len(batch) >= batch_size:
                    yield from judged(batch)
                    batch = []
                if progress is not None:
                    progress(stream.tell())
            if batch:
                yield from judged(batch)

    def judged(batch: list[TurnContext]) -> Iterator[dict[str, Any]]:
        for context, verdict in zip(batch, cascade.judge(batch), strict=True):
            polarity = verdict.polarity.value
            report.by_polarity[polarity] = report.by_polarity.get(polarity, 0) + 1
            report.by_tier[verdict.tier] = report.by_tier.get(verdict.tier, 0) + 1
            yield label_record(context, verdict)

    report.labels = write_jsonl_atomic(output_path, labels())
    return report
