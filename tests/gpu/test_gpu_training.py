"""What only a GPU can show (marked ``gpu``; skipped without CUDA): the same code as on CPU
with a device and a dtype passed in — pretraining in bf16 with compile, LoRA and QLoRA
fine-tuning, FSDP2 over NCCL (world size 1). Run with ``pytest -m gpu tests/gpu``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.smoke.helpers import TINY_MODEL

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _lmforge(cwd: Path, *args: str, nproc: int = 0) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "lmforge.cli", "--"] if nproc
                else [sys.executable, "-m", "lmforge.cli"])
    proc = subprocess.run([*launcher, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def base(workdir: Path) -> Path:
    """A small decoder pretrained on the GPU in bf16 with torch.compile."""
    _lmforge(workdir, "pretrain", "--data", "prepared", "--run", "gpu-base", *TINY_MODEL,
             "--model.block_size", "128", "--train.max_steps", "60", "--train.batch_size", "16",
             "--dist.device", "cuda", "--train.precision", "bf16", "--train.compile",
             "--train.eval_every", "30", "--train.eval_tokens", "4096", "--sample_tokens", "8",
             "--overwrite")
    return workdir / "runs" / "gpu-base"


def test_pretrain_bf16_compiled_on_cuda_learns(base: Path) -> None:
    records = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert _summary(base)["val_loss"] < 6.0


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_on_cuda(workdir: Path, base: Path, method: str) -> None:
    rows = [{"prompt": f"add {a} and {b}", "completion": f"{a + b}"}
            for a in range(8) for b in range(8)]
    (workdir / "gpu-sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = f"gpu-{method}"
    _lmforge(workdir, "finetune", "--run", str(base), "--data", "gpu-sft.jsonl", "--method",
             method, "--out", out, "--overwrite", "--dist.device", "cuda",
             "--train.precision", "bf16", "--train.max_steps", "20", "--train.batch_size", "8",
             "--optim.lr", "1e-3")
    summary = _summary(workdir / "runs" / out)
    assert summary["val_loss"] < summary["val_loss_before"]


def test_fsdp_over_nccl_world_size_one(workdir: Path) -> None:
    _lmforge(workdir, "pretrain", "--data", "prepared", "--run", "gpu-fsdp", *TINY_MODEL,
             "--train.max_steps", "20", "--train.batch_size", "8", "--dist.strategy", "fsdp",
             "--dist.device", "cuda", "--train.precision", "bf16", "--train.eval_tokens",
             "2048", "--sample_tokens", "0", "--overwrite", nproc=1)
    ckpt = workdir / "runs" / "gpu-fsdp" / "checkpoints" / "step_00000020"
    assert json.loads((ckpt / "meta.json").read_text())["layout"] == "sharded"
    assert _summary(workdir / "runs" / "gpu-fsdp")["steps"] == 20
