"""A non-editable install (the Docker image's) carries the migrations and bundled data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_migrations_demo_data_and_the_console_script(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("wildloop-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "services/store/migrations/env.py",
        "services/store/migrations/versions/0001_initial_schema.py",
        "services/store/migrations/versions/0003_detector_pending.py",
        "services/data/demo_conversations.jsonl",
        "services/detector/models/classifier_heads.npz",
        "services/detector/models/classifier_heads.json",
        "services/detector/models/encoder/encoder.json",
        "services/detector/models/encoder/adapter_config.json",
        "services/detector/models/encoder/adapter_model.safetensors",
        "services/detector/models/encoder/heads.safetensors",
    ):
        assert required in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "wildloop = services.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
