"""``wildloop detect`` exactly as FORMATS.md specifies: offline, one label per eligible turn,
malformed lines reported by number and skipped (exit 3), the output never half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.formats import LabelRecord
from tests.cli_helpers import run

CONVERSATIONS = [
    {
        "conversation_id": "a",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of Australia?"},
            {"role": "assistant", "content": "Sydney."},
            {"role": "user", "content": "That's wrong, it's Canberra."},
            {"role": "assistant", "content": "Sorry, Canberra it is."},
            {"role": "user", "content": "Thanks a lot, that's all I needed!"},
        ],
        "extra": {"kept": True},
    },
    {
        "conversation_id": "b",
        "messages": [
            {"role": "assistant", "content": "Hi! What can I do for you?"},
            {"role": "user", "content": "Write a haiku about rain."},
        ],
    },
    {"conversation_id": "c", "messages": [{"role": "user", "content": "hello?"}]},
]


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    with path.open("wb") as out:
        for line in lines:
            out.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def read_labels(path: Path) -> list[LabelRecord]:
    return [LabelRecord.model_validate_json(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("tiers", ["rules", "rules,classifier"])
def test_every_user_turn_after_an_answer_gets_exactly_one_label(tmp_path: Path, tiers: str) -> None:
    source = write_lines(tmp_path / "in.jsonl", [json.dumps(c) for c in CONVERSATIONS])
    out = tmp_path / "labels.jsonl"

    done = run(tmp_path, "detect", "--input", str(source), "--output", str(out), "--tiers", tiers)

    assert done.returncode == 0, done.stderr
    labels = read_labels(out)
    assert [(lb.conversation_id, lb.turn) for lb in labels] == [("a", 3), ("a", 5), ("b", 1)]
    by_turn = {(lb.conversation_id, lb.turn): lb for lb in labels}
    assert by_turn["a", 3].polarity == "DSAT" and "Factual_Error" in by_turn["a", 3].dsat
    assert by_turn["a", 5].polarity == "SAT" and "Gratitude" in by_turn["a", 5].sat
    assert by_turn["b", 1].polarity == "NEUTRAL"
    assert all(lb.tier in tiers.split(",") and 0 <= lb.confidence <= 1 for lb in labels)
    assert "labelled 3 turn(s) of 3 conversation(s)" in done.stderr


def test_malformed_lines_are_reported_by_number_skipped_and_exit_3(tmp_path: Path) -> None:
    good = json.dumps(CONVERSATIONS[0])
    source = write_lines(
        tmp_path / "in.jsonl",
        [
            good,
            "{not json",
            json.dumps({"conversation_id": "x", "messages": [{"role": "robot", "content": "?"}]}),
            b"\xff\xfe\x00 not utf-8",
            "",
            good,  # the same conversation again
            json.dumps(CONVERSATIONS[1]),
        ],
    )
    out = tmp_path / "labels.jsonl"

    done = run(tmp_path, "detect", "-i", str(source), "-o", str(out), "--tiers", "rules")

    assert done.returncode == 3
    for line in (2, 3, 4, 6):
        assert f"in.jsonl:{line}: skipped" in done.stderr, done.stderr
    assert "not UTF-8" in done.stderr and "repeats line 1" in done.stderr
    assert [(lb.conversation_id, lb.turn) for lb in read_labels(out)] == [
        ("a", 3),
        ("a", 5),
        ("b", 1),
    ]


def test_usage_errors_exit_2_and_leave_no_output(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [json.dumps(CONVERSATIONS[0])])
    out = tmp_path / "labels.jsonl"

    missing = run(tmp_path, "detect", "-i", str(tmp_path / "nope.jsonl"), "-o", str(out))
    unknown = run(tmp_path, "detect", "-i", str(source), "-o", str(out), "--tiers", "magic")
    no_llm = run(tmp_path, "detect", "-i", str(source), "-o", str(out), "--tiers", "rules,llm")

    assert (missing.returncode, unknown.returncode, no_llm.returncode) == (2, 2, 2)
    assert "no such file" in missing.stderr
    assert "unknown tier 'magic'" in unknown.stderr
    assert "WILDLOOP_DETECTOR__LLM_URL" in no_llm.stderr
    assert not out.exists()


def test_an_output_that_cannot_be_written_fails_cleanly(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [json.dumps(CONVERSATIONS[0])])
    blocked = tmp_path / "file"
    blocked.write_text("x")

    target = str(blocked / "labels.jsonl")
    done = run(tmp_path, "detect", "-i", str(source), "-o", target, "--tiers", "rules")

    assert done.returncode == 1
    assert "cannot write" in done.stderr
