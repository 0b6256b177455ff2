"""SIGKILL in the middle of a run, and in the middle of a checkpoint write: resume is exact.

The kill is real (the process gets SIGKILL, nothing runs after it). To hit the exact moment of
a checkpoint write, a ``sitecustomize`` module (loaded by Python at start-up from PYTHONPATH)
wraps ``os.replace`` so that the process kills itself just before the completed temporary
checkpoint folder would be renamed into place — the worst moment: every file written, the
rename not done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.smoke.helpers import TINY_MODEL

ARGS = [
    "pretrain", "--data", "prepared", *TINY_MODEL, "--train.max_steps", "60",
    "--train.batch_size", "4", "--train.eval_every", "20", "--train.save_every", "10",
    "--train.eval_tokens", "512", "--optim.warmup_steps", "3", "--model.dropout", "0.1",
    "--sample_tokens", "0", "--train.keep_last", "2", "--train.threads", "1",
]

KILL_ON_RENAME = """
import os, signal
_replace = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == os.environ["LMFORGE_TEST_KILL_RENAME"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *a, **k)
os.replace = replace
"""


def _cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", *ARGS, *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _weights(run_dir: Path) -> dict:
    step = (run_dir / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / step / "model.safetensors")


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] == wb[name]).all(), name


@pytest.fixture(scope="module")
def straight(workdir: Path) -> Path:
    subprocess.run(_cmd("--run", "kill-straight"), cwd=workdir, env=_env(), check=True,
                   capture_output=True, timeout=300)
    return workdir / "runs" / "kill-straight"


def test_sigkill_mid_run_then_resume_is_bit_identical(workdir: Path, straight: Path):
    run = workdir / "runs" / "kill-midrun"
    proc = subprocess.Popen(_cmd("--run", "kill-midrun"), cwd=workdir, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "latest").is_file() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    subprocess.run(_cmd("--run", "kill-midrun", "--resume"), cwd=workdir, env=_env(),
                   check=True, capture_output=True, timeout=300)
    _assert_identical(straight, run)


def test_sigkill_mid_checkpoint_write_then_resume_is_bit_identical(
    workdir: Path, straight: Path, tmp_path: Path
):
    (tmp_path / "sitecustomize.py").write_text(KILL_ON_RENAME)
    run = workdir / "runs" / "kill-ckpt"
    env = _env(PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               LMFORGE_TEST_KILL_RENAME="step_00000030")
    proc = subprocess.run(_cmd("--run", "kill-ckpt"), cwd=workdir, env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # the half-written checkpoint exists only under its temporary name and is never picked up
    assert (run / "latest").read_text().strip() == "step_00000020"
    assert not (run / "checkpoints" / "step_00000030").exists()
    assert any(p.name.startswith(".step_00000030") for p in (run / "checkpoints").iterdir())
    subprocess.run(_cmd("--run", "kill-ckpt", "--resume"), cwd=workdir, env=_env(),
                   check=True, capture_output=True, timeout=300)
    _assert_identical(straight, run)
    # steps after 20 ran twice but are logged once: the log reads like the uninterrupted run's
    steps = _train_steps(straight)
    assert steps and steps[-1] == 60 and _train_steps(run) == steps


def _train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]
