"""Two processes under torchrun (gloo, CPU) train exactly like one process with the same
global batch: DDP and FSDP2 losses match within 1e-5 over 20 steps, and a checkpoint written by
the sharded run loads into a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.smoke.helpers import TINY_MODEL

ARGS = [
    "pretrain", "--data", "prepared", *TINY_MODEL, "--train.max_steps", "20",
    "--train.eval_every", "10", "--train.save_every", "20", "--train.log_every", "1",
    "--train.eval_tokens", "512", "--optim.warmup_steps", "3", "--sample_tokens", "0",
    "--train.threads", "1",
]


def _train(workdir: Path, name: str, nproc: int, strategy: str, batch: int) -> Path:
    # `--` ends torchrun's own options: without it torchrun's argparse would take `--run` for
    # an abbreviation of its `--run-path`.
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "lmforge.cli", "--"] if nproc > 1
                else [sys.executable, "-m", "lmforge.cli"])
    cmd = [*launcher, *ARGS, "--run", name, "--dist.strategy", strategy,
           "--train.batch_size", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir / "runs" / name


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(workdir: Path) -> Path:
    return _train(workdir, "dist-single", 1, "none", 8)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(workdir: Path, single: Path, strategy: str):
    run = _train(workdir, f"dist-{strategy}", 2, strategy, 4)
    ref, got = _losses(single), _losses(run)
    assert len(ref) == len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5
    # the checkpoint is the ordinary single-process format: same names, same values
    wa = load_file(single / "checkpoints" / "step_00000020" / "model.safetensors")
    wb = load_file(run / "checkpoints" / "step_00000020" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= 1e-4, name
