"""The ``wildloop`` command line, run as a user runs it (a subprocess), on the embedded mode."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli_helpers import run

CONVERSATIONS = [
    {
        "conversation_id": "c-1",
        "source": "test",
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "That's wrong, 2+2 is 4."},
        ],
    },
    {
        "conversation_id": "c-2",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
    },
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run(tmp_path, "--help")
    assert result.returncode == 0
    for command in ("doctor", "demo", "conversations", "serve", "db", "learn"):
        assert command in result.stdout


def test_demo_round_trips_conversations_through_the_log_into_the_store_and_out(
    tmp_path: Path,
) -> None:
    result = run(tmp_path, "demo")
    assert result.returncode == 0, result.stderr
    report = result.stderr.replace("\n", " ")
    assert "recorder applied 27, skipped 0" in report
    assert "detector labelled 8 user turn(s)" in report
    assert "2: DSAT, 4: SAT" in result.stdout  # demo-1: a correction, then thanks
    exported = [json.loads(x) for x in (tmp_path / "export.jsonl").read_text().splitlines()]
    assert len(exported) == 6 and all(c["messages"] for c in exported)
    again = run(tmp_path, "demo")  # idempotent: the same events are recognised
    assert again.returncode == 0
    report = again.stderr.replace("\n", " ")
    # The turns are skipped; the 8 label events of the first run are new to the recorder (it
    # stores what the detector published) but change nothing: still 8 labels.
    assert "recorder applied 8, skipped 27" in report
    assert "detector labelled 8 user turn(s)" in report


def test_import_then_record_then_export_preserves_the_format(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [json.dumps(c) for c in CONVERSATIONS])
    assert run(tmp_path, "conversations", "import", "--input", str(source)).returncode == 0
    recorded = run(tmp_path, "serve", "recorder", "--metrics-port", "0", "--idle-exit", "1")
    assert recorded.returncode == 0, recorded.stderr
    out = tmp_path / "out.jsonl"
    result = run(tmp_path, "conversations", "export", "--output", str(out))
    assert result.returncode == 0, result.stderr
    exported = sorted(
        (json.loads(x) for x in out.read_text().splitlines()), key=lambda c: c["conversation_id"]
    )
    assert exported == CONVERSATIONS


def test_serve_detector_labels_imported_conversations_and_stops_when_idle(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [json.dumps(c) for c in CONVERSATIONS])
    assert run(tmp_path, "conversations", "import", "--input", str(source)).returncode == 0

    detected = run(tmp_path, "serve", "detector", "--metrics-port", "0", "--idle-exit", "2")
    recorded = run(tmp_path, "serve", "recorder", "--metrics-port", "0", "--idle-exit", "1")
    shown = run(tmp_path, "conversations", "show", "c-1")

    assert detected.returncode == 0, detected.stderr
    assert "detector stopped: 6 applied" in detected.stderr.replace("\n", " ")
    assert recorded.returncode == 0, recorded.stderr
    # "That's wrong, 2+2 is 4." after the answer "5". (The terser "Wrong, it's 4." is a known
    # miss of the default cascade: the classifier calls it NEUTRAL at 0.53; docs/detector.md.)
    assert "DSAT" in shown.stdout
    broken = run(
        tmp_path, "serve", "detector", "--idle-exit", "1", WILDLOOP_DETECTOR__TIERS='["llm"]'
    )
    assert broken.returncode == 2 and "WILDLOOP_DETECTOR__LLM_URL" in broken.stderr


def test_a_malformed_import_line_is_reported_with_its_number_and_skipped(tmp_path: Path) -> None:
    source = write_lines(
        tmp_path / "in.jsonl",
        [
            json.dumps(CONVERSATIONS[0]),
            "{broken",
            json.dumps({"conversation_id": "x", "messages": [{"role": "robot", "content": ""}]}),
        ],
    )
    result = run(tmp_path, "conversations", "import", "--input", str(source))
    assert result.returncode == 3
    assert f"{source}:2: skipped: invalid JSON" in result.stderr
    assert f"{source}:3: skipped: messages.0.role" in result.stderr
    assert "published 3 turn(s) of 1 conversation(s)" in result.stderr


def test_list_and_show_describe_what_was_recorded(tmp_path: Path) -> None:
    assert run(tmp_path, "demo").returncode == 0
    listed = run(tmp_path, "conversations", "list", "--json")
    ids = {json.loads(line)["conversation_id"] for line in listed.stdout.splitlines()}
    assert ids == {f"demo-{i}" for i in range(1, 7)}
    shown = run(tmp_path, "conversations", "show", "demo-1")
    assert shown.returncode == 0 and "Canberra" in shown.stdout
    as_json = json.loads(run(tmp_path, "conversations", "show", "demo-1", "--json").stdout)
    assert as_json["conversation_id"] == "demo-1" and len(as_json["messages"]) == 5


def test_unknown_conversation_and_missing_file_exit_non_zero_with_a_message(
    tmp_path: Path,
) -> None:
    shown = run(tmp_path, "conversations", "show", "nope")
    assert shown.returncode == 1 and "no conversation 'nope'" in shown.stderr
    missing = run(tmp_path, "conversations", "import", "--input", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_export_of_an_empty_store_writes_an_empty_file(tmp_path: Path) -> None:
    out = tmp_path / "empty.jsonl"
    assert run(tmp_path, "conversations", "export", "--output", str(out)).returncode == 0
    assert out.read_text() == ""


def test_invalid_settings_are_reported_before_anything_runs(tmp_path: Path) -> None:
    result = run(tmp_path, "doctor", WILDLOOP_KAFKA__PARTITIONS="zero")
    assert result.returncode == 2
    assert "WILDLOOP_KAFKA__PARTITIONS" in result.stderr


def test_doctor_passes_on_the_embedded_default(tmp_path: Path) -> None:
    result = run(tmp_path, "doctor")
    assert result.returncode == 0, result.stdout
    for item in ("settings", "store", "event bus", "model", "gpu"):
        assert item in result.stdout
    assert "ready" in result.stdout


def test_doctor_fails_clearly_when_the_configured_services_are_down(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "doctor",
        timeout=180,
        WILDLOOP_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
        WILDLOOP_KAFKA_BOOTSTRAP="127.0.0.1:1",
        WILDLOOP_VLLM_URL="http://127.0.0.1:1/v1",
    )
    assert result.returncode == 1
    assert "not ready: store, event bus, model" in result.stdout


def test_bus_topics_and_prune_maintain_the_embedded_log(tmp_path: Path) -> None:
    assert run(tmp_path, "demo").returncode == 0
    topics = run(tmp_path, "bus", "topics")
    assert topics.returncode == 0 and "chat.turns" in topics.stdout
    kept = run(tmp_path, "bus", "prune")  # default retention keeps fresh records
    assert kept.returncode == 0 and "deleted 0 record(s)" in kept.stderr
    pruned = run(tmp_path, "bus", "prune", "--older-than-hours", "0")
    # 27 chat turns + the 8 labels the demo's detector published
    assert pruned.returncode == 0 and "deleted 35 record(s)" in pruned.stderr
    # pruned offsets are never reused: the store keeps what was recorded
    assert run(tmp_path, "conversations", "show", "demo-1").returncode == 0
