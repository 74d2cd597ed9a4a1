from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WILDLOOP = str(Path(sys.executable).with_name("wildloop"))


def wildloop_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WILDLOOP_")}
    env.update(WILDLOOP_DATA_DIR=str(data_dir), WILDLOOP_LOG_FORMAT="console", COLUMNS="200")
    env.update(extra)
    return env


def run(
    data_dir: Path, *args: str, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [WILDLOOP, *args],
        env=wildloop_env(data_dir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
