"""Fine-tuning over two processes (torchrun, gloo) trains exactly like one process with the
same global batch — full and LoRA, DDP and FSDP — on chat rows whose labelled-token counts
differ a lot per micro-batch; and a sharded LoRA run killed mid-checkpoint resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.dist.test_kill_resume import KILL_ON_RENAME
from tests.smoke.helpers import TINY_MODEL

BASE = "ftd-base"
FT = ["--train.max_steps", "10", "--train.log_every", "1", "--train.eval_every", "5",
      "--train.save_every", "5", "--train.threads", "1", "--optim.lr", "1e-3",
      "--optim.warmup_steps", "2", "--lora.dropout", "0", "--val_fraction", "0.1"]


def _rows() -> list[dict]:
    """Replies of 1 to ~40 tokens: micro-batches carry very different label counts. 40 rows:
    36 train (4.5 global batches of 8, so every batch has a row for each of 2 ranks), 4 val."""
    return [{"prompt": f"say {n} words about {w}", "completion": " ".join([w] * (1 + 3 * n))}
            for n in range(10) for w in ("tea", "rain", "ships", "snow")]


@pytest.fixture(scope="module")
def ftd(workdir: Path) -> Path:
    (workdir / "ftd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "pretrain", "--data",
                           "prepared", "--run", BASE, *TINY_MODEL, "--model.block_size", "128",
                           "--train.max_steps", "3", "--train.batch_size", "2",
                           "--train.threads", "1", "--train.eval_tokens", "1024",
                           "--sample_tokens", "0", "--overwrite"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return workdir


def _finetune(workdir: Path, name: str, nproc: int, strategy: str, method: str, batch: int,
              *extra: str, env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "lmforge.cli", "--"] if nproc > 1
                else [sys.executable, "-m", "lmforge.cli"])
    cmd = [*launcher, "finetune", "--run", f"runs/{BASE}", "--data", "ftd.jsonl", "--out", name,
           "--method", method, "--dist.strategy", strategy, "--train.batch_size", str(batch),
           *FT, *extra]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def _weights(run: Path, name: str = "model.safetensors") -> dict:
    step = (run / "latest").read_text().strip()
    return load_file(run / "checkpoints" / step / name)


@pytest.fixture(scope="module")
def single(ftd: Path) -> dict[str, Path]:
    out = {}
    for method in ("full", "lora"):
        _finetune(ftd, f"ftd-one-{method}", 1, "none", method, 8, "--overwrite")
        out[method] = ftd / "runs" / f"ftd-one-{method}"
    return out


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(ftd: Path, single: dict[str, Path], method: str,
                                 strategy: str) -> None:
    name = f"ftd-{strategy}-{method}"
    _finetune(ftd, name, 2, strategy, method, 4, "--overwrite")
    run, ref = ftd / "runs" / name, single[method]
    a, b = _losses(ref), _losses(run)
    assert len(a) == len(b) == 10
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    wa, wb = _weights(ref), _weights(run)  # both: the merged single-file checkpoint
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-4, k
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] < summary["val_loss_before"]
    if method == "lora":
        assert (run / "adapter.safetensors").is_file()


@pytest.mark.slow  # ~60 s; pretraining SIGKILL resume stays in make test; make test-slow
def test_sharded_lora_killed_mid_checkpoint_resumes_bit_identical(ftd: Path,
                                                                   tmp_path: Path) -> None:
    straight = ftd / "runs" / "ftd-kill-straight"
    _finetune(ftd, straight.name, 2, "fsdp", "lora", 4, "--overwrite")
    (tmp_path / "sitecustomize.py").write_text(KILL_ON_RENAME)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LMFORGE_TEST_KILL_RENAME": "step_00000010"}
    killed = _finetune(ftd, "ftd-kill", 2, "fsdp", "lora", 4, "--overwrite", env=env,
                       check=False)
    assert killed.returncode != 0
    run = ftd / "runs" / "ftd-kill"
    assert (run / "latest").read_text().strip() == "step_00000005"
    assert json.loads((run / "checkpoints" / "step_00000005" / "meta.json").read_text()
                      ).get("layout") == "sharded"
    _finetune(ftd, "ftd-kill", 2, "fsdp", "lora", 4, "--resume")
    for name in ("model.safetensors",):
        wa, wb = _weights(straight, name), _weights(run, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] == wb[k]).all(), k
    adapter_a = load_file(straight / "adapter.safetensors")
    adapter_b = load_file(run / "adapter.safetensors")
    assert all((adapter_a[k] == adapter_b[k]).all() for k in adapter_a)
    assert _losses(run) == _losses(straight)
    assert signal.SIGKILL  # the kill is a real SIGKILL of rank 0 (sitecustomize)


def test_a_refusal_on_rank_0_stops_every_rank(ftd: Path, single: dict[str, Path]) -> None:
    """The run exists and --overwrite is not given: rank 0 refuses, rank 1 must not wait
    forever at the next collective; torchrun ends with the one-line reason."""
    proc = _finetune(ftd, single["lora"].name, 2, "ddp", "lora", 4, check=False)
    assert proc.returncode != 0
    assert "pass --resume to continue it, --overwrite to replace it" in proc.stderr
