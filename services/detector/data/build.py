"""Assemble the hand-written detector dataset from `source/*.txt` into the FORMATS.md files.

Run: python services/detector/data/build.py   (then python services/detector/data/check.py)

The source files are what the annotator edits. Each conversation starts with a header line

    === train-017 | es | cooking

(id | ISO 639-1 language | domain), followed by messages, one tag per line:

    S: system prompt          (optional, only as the first message)
    U: user message
    A: assistant message
    L: +Gratitude -Revision @aware_with_correction

Lines without a tag continue the previous message (so messages can hold code and paragraphs).
An `L:` line labels the user message just above it; every user message that follows an
assistant message must have one, and a first user message must not. In an `L:` line, `+Name`
is a SAT rubric, `-Name` a DSAT rubric, `NEUTRAL` means no rubric, and `@category` is the
Don-Yehiya category (it may be left out for SAT-only turns, which default to `positive`, and for
NEUTRAL turns, which default to `none`). Polarity is derived from the rubrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "source"
SPLITS = ("train", "dev", "test", "holdout", "holdout2", "holdout3")
TAGS = {"S: ": "system", "U: ": "user", "A: ": "assistant", "L: ": "label"}


class SourceError(ValueError):
    """A problem in a source file, with its location."""


def _polarity(sat: list[str], dsat: list[str]) -> str:
    if sat and dsat:
        return "MIXED"
    if sat:
        return "SAT"
    if dsat:
        return "DSAT"
    return "NEUTRAL"


def _parse_label(text: str, where: str) -> tuple[list[str], list[str], str | None]:
    sat: list[str] = []
    dsat: list[str] = []
    category: str | None = None
    for token in text.split():
        if token.startswith("+"):
            sat.append(token[1:])
        elif token.startswith("-"):
            dsat.append(token[1:])
        elif token.startswith("@"):
            category = token[1:]
        elif token != "NEUTRAL":
            raise SourceError(f"{where}: bad label token {token!r}")
    if category is None:
        if sat and not dsat:
            category = "positive"
        elif not sat and not dsat:
            category = "none"
        else:
            raise SourceError(f"{where}: a DSAT or MIXED label needs an @category")
    return sat, dsat, category


def parse(path: Path) -> list[tuple[dict, list[dict]]]:
    """Parse one source file into (conversation record, label records) pairs."""
    out: list[tuple[dict, list[dict]]] = []
    conv: dict | None = None
    labels: list[dict] = []
    last_role: str | None = None
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path.name}:{lineno}"
        if raw.startswith("=== "):
            if conv is not None:
                out.append((conv, labels))
            parts = [p.strip() for p in raw[4:].split("|")]
            if len(parts) != 3:
                raise SourceError(f"{where}: header must be 'id | lang | domain'")
            conv = {
                "conversation_id": parts[0],
                "messages": [],
                "meta": {"language": parts[1], "domain": parts[2]},
            }
            labels = []
            last_role = None
            continue
        if conv is None:
            if raw.strip() and not raw.startswith("#"):
                raise SourceError(f"{where}: text before the first header")
            continue
        tag = TAGS.get(raw[:3])
        if tag == "label":
            if last_role != "user":
                raise SourceError(f"{where}: a label must follow a user message")
            turn = len(conv["messages"]) - 1
            roles = [m["role"] for m in conv["messages"][:turn]]
            if "assistant" not in roles:
                raise SourceError(f"{where}: the first user message takes no label")
            if labels and labels[-1]["turn"] == turn:
                raise SourceError(f"{where}: two labels for one turn")
            sat, dsat, category = _parse_label(raw[3:], where)
            labels.append(
                {
                    "conversation_id": conv["conversation_id"],
                    "turn": turn,
                    "polarity": _polarity(sat, dsat),
                    "sat": sat,
                    "dsat": dsat,
                    "category": category,
                    "confidence": 1.0,
                    "tier": "human",
                }
            )
            last_role = "label"
        elif tag is not None:
            if tag == "system" and conv["messages"]:
                raise SourceError(f"{where}: a system message must come first")
            conv["messages"].append({"role": tag, "content": raw[3:]})
            last_role = tag
        elif conv["messages"] and last_role != "label":
            conv["messages"][-1]["content"] += "\n" + raw
        elif raw.strip():
            raise SourceError(f"{where}: untagged line outside a message")
    if conv is not None:
        out.append((conv, labels))
    for conv, _ in out:
        for message in conv["messages"]:
            message["content"] = message["content"].strip()
    return out


def main() -> int:
    for split in SPLITS:
        pairs: list[tuple[dict, list[dict]]] = []
        for path in sorted(SOURCE.glob(f"{split}_*.txt")):
            pairs.extend(parse(path))
        with (HERE / f"{split}.conversations.jsonl").open("w", encoding="utf-8") as fh:
            for conv, _ in pairs:
                fh.write(json.dumps(conv, ensure_ascii=False) + "\n")
        with (HERE / f"{split}.labels.jsonl").open("w", encoding="utf-8") as fh:
            for _, labels in pairs:
                for label in labels:
                    fh.write(json.dumps(label, ensure_ascii=False) + "\n")
        n_labels = sum(len(labels) for _, labels in pairs)
        sys.stdout.write(f"{split}: {len(pairs)} conversations, {n_labels} labelled turns\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
