"""DPO over two processes (torchrun, gloo) trains like one process with the same global batch:
LoRA under FSDP (the reference is the sharded model with its adapters off) and full under DDP
(reference log-probs precomputed on every rank), on pairs whose reply lengths differ a lot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.test_finetune_dist import BASE, ftd  # noqa: F401  (the module's base run)

FT = ["--train.max_steps", "8", "--train.log_every", "1", "--train.eval_every", "4",
      "--train.save_every", "8", "--train.threads", "1", "--optim.lr", "1e-2",
      "--optim.warmup_steps", "2", "--val_fraction", "0.1"]


def _pairs() -> list[dict]:
    """40 pairs, replies of 1 to ~28 tokens: 36 train (4.5 global batches of 8), 4 val."""
    words = ("tea", "rain", "ships", "snow")
    return [{"prompt": f"say {n} words about {w}", "chosen": " ".join([w] * (1 + 3 * n)),
             "rejected": " ".join([words[(i + 1) % 4]] * (1 + 2 * n))}
            for n in range(10) for i, w in enumerate(words)]


def _dpo(workdir: Path, name: str, nproc: int, strategy: str, method: str, batch: int) -> Path:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "lmforge.cli", "--"] if nproc > 1
                else [sys.executable, "-m", "lmforge.cli"])
    cmd = [*launcher, "finetune", "--task", "dpo", "--run", f"runs/{BASE}", "--data",
           "prefd.jsonl", "--out", name, "--method", method, "--dist.strategy", strategy,
           "--train.batch_size", str(batch), "--overwrite", *FT]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir / "runs" / name


def _train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "method"), [("fsdp", "lora"), ("ddp", "full")])
def test_two_processes_match_one(ftd: Path, strategy: str, method: str) -> None:  # noqa: F811
    (ftd / "prefd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    one = _train_records(_dpo(ftd, f"prefd-one-{method}", 1, "none", method, 8))
    two = _train_records(_dpo(ftd, f"prefd-{strategy}-{method}", 2, strategy, method, 4))
    assert len(one) == len(two) == 8
    for key in ("loss", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected"):
        a, b = [r[key] for r in one], [r[key] for r in two]
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, (key, a, b)
    assert one[-1]["loss"] < one[0]["loss"]
