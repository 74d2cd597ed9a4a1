"""``wildloop learn build`` and ``wildloop learn train`` as a user runs them: files in, a dataset
folder with its manifest out, then an adapter; bad input gets an exit code and a message."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from learner.dataset import read_manifest, read_pairs, read_unpaired
from services.adapters import inspect_adapter
from tests.cli_helpers import WILDLOOP, run, wildloop_env
from tests.learner.corpus import CONVERSATIONS, LABELS, write_jsonl


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return (
        write_jsonl(tmp_path / "conversations.jsonl", CONVERSATIONS),
        write_jsonl(tmp_path / "labels.jsonl", LABELS),
    )


def test_build_writes_a_dataset_with_lineage_and_counts(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    conversations, labels = files
    out = tmp_path / "data"

    result = run(
        tmp_path,
        "learn", "build",
        "--conversations", str(conversations),
        "--labels", str(labels),
        "--output", str(out),
        WILDLOOP_LEARNER__MAX_USER_SHARE="1.0",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert result.stdout.strip() == manifest.content_hash
    assert manifest.pairs == 3 and manifest.strategies == {"natural": 3}
    assert manifest.desirable == manifest.undesirable
    assert manifest.drops["unsafe_request"] == 1
    assert manifest.drops["no_generator_or_judge"] == 1  # the unresolved complaint
    assert {s["conversation_id"] for s in manifest.sources if s["kind"] == "pair"} == {
        "revision",
        "two-complaints",
    }
    pairs = read_pairs(out)
    assert all(p.checklist for p in pairs)
    assert len(read_unpaired(out)) == manifest.unpaired
    assert "DPO pairs" in result.stderr


def test_malformed_lines_are_reported_by_number_and_skipped(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    conversations, labels = files
    with labels.open("a") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({"conversation_id": "x", "turn": -1}) + "\n")
    out = tmp_path / "data"

    result = run(
        tmp_path,
        "learn", "build",
        "--conversations", str(conversations),
        "--labels", str(labels),
        "--output", str(out),
    )  # fmt: skip

    assert result.returncode == 3
    n = len(LABELS)
    assert f"labels.jsonl:{n + 1}: skipped" in result.stderr
    assert f"labels.jsonl:{n + 2}: skipped" in result.stderr
    assert read_manifest(out).pairs == 3  # the good lines still count


def test_an_existing_dataset_is_only_replaced_when_asked(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    conversations, labels = files
    out = tmp_path / "data"
    args = ("learn", "build", "--conversations", str(conversations), "--labels", str(labels))
    assert run(tmp_path, *args, "--output", str(out)).returncode == 0

    again = run(tmp_path, *args, "--output", str(out))
    assert again.returncode == 2
    assert "--overwrite" in again.stderr
    assert run(tmp_path, *args, "--output", str(out), "--overwrite").returncode == 0

    other = tmp_path / "not-a-dataset"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    refused = run(tmp_path, *args, "--output", str(other), "--overwrite")
    assert refused.returncode == 2
    assert (other / "precious.txt").read_text() == "keep me"


def test_half_a_file_pair_is_a_usage_error(tmp_path: Path, files: tuple[Path, Path]) -> None:
    result = run(
        tmp_path,
        "learn",
        "build",
        "--conversations",
        str(files[0]),
        "--output",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2
    assert "both --conversations and --labels" in result.stderr


def test_missing_input_files_are_a_usage_error(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "learn", "build",
        "--conversations", str(tmp_path / "nope.jsonl"),
        "--labels", str(tmp_path / "nope2.jsonl"),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "no such file" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_turns_a_built_dataset_into_an_adapter(
    tmp_path: Path, files: tuple[Path, Path], base_model_dir: Path
) -> None:
    conversations, labels = files
    data, adapter = tmp_path / "data", tmp_path / "adapter"
    env = {
        "WILDLOOP_BASE_MODEL_PATH": str(base_model_dir),
        "WILDLOOP_LEARNER__BATCH_SIZE": "2",
        "WILDLOOP_LEARNER__GRADIENT_ACCUMULATION_STEPS": "1",
        "WILDLOOP_LEARNER__MAX_LENGTH": "160",
    }
    built = run(
        tmp_path,
        "learn", "build",
        "--conversations", str(conversations),
        "--labels", str(labels),
        "--output", str(data),
        **env,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr

    trained = run(
        tmp_path,
        "learn", "train",
        "--data", str(data),
        "--method", "dpo",
        "--output", str(adapter),
        "--max-steps", "1",
        timeout=600,
        **env,
    )  # fmt: skip

    assert trained.returncode == 0, trained.stderr
    assert "trained" in trained.stderr and "1 steps" in trained.stderr
    assert inspect_adapter(adapter).rank == 16
    assert (adapter / "wildloop-adapter.json").is_file()

    again = run(tmp_path, "learn", "train", "--data", str(data), "--output", str(adapter), **env)
    assert again.returncode == 2
    assert "not empty" in again.stderr
    bad = run(tmp_path, "learn", "train", "--data", str(tmp_path / "none"), "--output", "x", **env)
    assert bad.returncode == 2


@pytest.mark.slow
def test_training_runs_unchanged_under_a_distributed_launch(
    tmp_path: Path, files: tuple[Path, Path], base_model_dir: Path
) -> None:
    # Two DDP processes on CPU (gloo); on GPUs the same command runs under
    # `accelerate launch --multi_gpu` (docs/learner.md). Rank 0 alone writes the adapter.
    conversations, labels = files
    data, adapter = tmp_path / "data", tmp_path / "adapter"
    env = {
        "WILDLOOP_BASE_MODEL_PATH": str(base_model_dir),
        "WILDLOOP_LEARNER__BATCH_SIZE": "1",
        "WILDLOOP_LEARNER__GRADIENT_ACCUMULATION_STEPS": "1",
        "WILDLOOP_LEARNER__MAX_LENGTH": "128",
    }
    args = ("--conversations", str(conversations), "--labels", str(labels), "--output", str(data))
    assert run(tmp_path, "learn", "build", *args, **env).returncode == 0
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    result = subprocess.run(
        [
            torchrun, "--nproc_per_node", "2", "-m", "services.cli.main",
            "learn", "train", "--data", str(data), "--output", str(adapter), "--max-steps", "1",
        ],
        env=wildloop_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((adapter / "wildloop-adapter.json").read_text())
    assert manifest["metrics"]["world_size"] == 2
    assert inspect_adapter(adapter).rank == 16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter")] == []


@pytest.mark.slow
def test_the_main_job_demo_then_learn_run_registers_a_candidate(
    tmp_path: Path, base_model_dir: Path
) -> None:
    # The README's main job on the embedded default, as a new user runs it.
    env = {"WILDLOOP_BASE_MODEL_PATH": str(base_model_dir)}
    assert run(tmp_path, "demo", **env).returncode == 0
    exported = run(tmp_path, "learn", "build", "--output", str(tmp_path / "from-store"), **env)
    assert exported.returncode == 0, exported.stderr
    assert read_manifest(tmp_path / "from-store").origin == "store"
    assert read_manifest(tmp_path / "from-store").pairs >= 1  # demo-1: wrong capital, fixed

    first = run(tmp_path, "learn", "run", "--force", "--max-steps", "1", timeout=600, **env)

    assert first.returncode == 0, first.stderr
    adapter_id = first.stdout.strip()
    assert adapter_id.startswith("dpo-")
    assert "registered" in first.stderr
    assert inspect_adapter(tmp_path / "adapters" / adapter_id).rank == 16
    again = run(tmp_path, "learn", "run", "--force", "--max-steps", "1", **env)
    assert again.returncode == 0
    assert "nothing to train" in again.stderr


@pytest.mark.slow
def test_serve_learner_trains_a_candidate_serves_metrics_and_stops_on_sigterm(
    tmp_path: Path, base_model_dir: Path
) -> None:
    env = {
        "WILDLOOP_BASE_MODEL_PATH": str(base_model_dir),
        "WILDLOOP_LEARNER__POLL_S": "1",
        "WILDLOOP_LEARNER__MIN_PAIRS": "1",
        "WILDLOOP_LEARNER__MIN_NEW_PAIRS": "1",
        "WILDLOOP_LEARNER__GRADIENT_ACCUMULATION_STEPS": "1",
        "WILDLOOP_LEARNER__MAX_LENGTH": "128",
    }
    assert run(tmp_path, "demo", **env).returncode == 0
    proc = subprocess.Popen(
        [WILDLOOP, "serve", "learner", "--metrics-port", "0"],
        env=wildloop_env(tmp_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    port = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if (found := re.search(r"metrics_port=(\d+)", line)) is not None:
                port = int(found.group(1))
            if "candidate registered" in line:
                break
        assert port is not None, "".join(lines)
        assert any("candidate registered" in x for x in lines), "".join(lines)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'wildloop_learner_runs_total{status="succeeded"} 1.0' in metrics
        assert "wildloop_learner_examples_built_total" in metrics
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert "learner stopped" in rest
    (adapter,) = [p for p in (tmp_path / "adapters").iterdir() if p.name.startswith("dpo-")]
    assert inspect_adapter(adapter).rank == 16
