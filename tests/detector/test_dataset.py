"""The labelled dataset in ``services/detector/data`` is valid and matches its sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "services" / "detector" / "data"


def run(script: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(script)]
    return subprocess.run(command, cwd=script.parent, capture_output=True, text=True, check=False)


def test_the_committed_jsonl_files_are_exactly_what_the_sources_build(tmp_path: Path) -> None:
    """Nobody edited a .jsonl by hand or forgot to rebuild after editing ``source/*.txt``."""
    (tmp_path / "build.py").write_bytes((DATA / "build.py").read_bytes())
    (tmp_path / "source").symlink_to(DATA / "source")
    result = run(tmp_path / "build.py")
    assert result.returncode == 0, result.stderr
    committed = sorted(p.name for p in DATA.glob("*.jsonl"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.jsonl"))
    for name in committed:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name} is stale"


def test_every_split_passes_the_dataset_checks() -> None:
    """Formats, label/rubric consistency, unique ids, no reused user text, and no near copy of
    a train/dev turn in the held-out splits (``check.py``)."""
    result = run(DATA / "check.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK: all checks passed" in result.stdout
