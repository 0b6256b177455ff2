"""Helpers for the smoke tests: run the real `lmforge` executable and check its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LMFORGE = [sys.executable, "-m", "lmforge.cli"]
TINY_MODEL = [
    "--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "4",
    "--model.n_kv_head", "2", "--model.block_size", "64",
]


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "2"}
    return subprocess.run([*LMFORGE, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lmforge: error:")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
