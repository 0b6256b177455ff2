"""Two processes under torchrun (gloo, CPU) train exactly like one process with the same
global batch: DDP and FSDP2 losses match within 1e-5 over 20 steps. The FSDP run's checkpoints
are sharded (one DCP safetensors shard per rank); they load whole into a single process and
resume there, at another world size, continuing exactly like the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.checkpoint import read_meta, read_weights
from tests.smoke.helpers import TINY_MODEL

ARGS = [
    "pretrain", "--data", "prepared", *TINY_MODEL, "--train.max_steps", "20",
    "--train.eval_every", "10", "--train.save_every", "10", "--train.log_every", "1",
    "--train.eval_tokens", "512", "--optim.warmup_steps", "3", "--sample_tokens", "0",
    "--train.threads", "1",
]


def _train(workdir: Path, name: str, nproc: int, strategy: str, batch: int,
           *extra: str) -> Path:
    # `--` ends torchrun's own options: without it torchrun's argparse would take `--run` for
    # an abbreviation of its `--run-path`.
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "lmforge.cli", "--"] if nproc > 1
                else [sys.executable, "-m", "lmforge.cli"])
    cmd = [*launcher, *ARGS, "--run", name, "--dist.strategy", strategy,
           "--train.batch_size", str(batch), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir / "runs" / name


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def _assert_close_weights(a: Path, b: Path, tol: float) -> None:
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() <= tol, name


@pytest.fixture(scope="module")
def single(workdir: Path) -> Path:
    return _train(workdir, "dist-single", 1, "none", 8)


@pytest.fixture(scope="module")
def fsdp(workdir: Path) -> Path:
    return _train(workdir, "dist-fsdp", 2, "fsdp", 4)


def test_ddp_two_ranks_match_one_process(workdir: Path, single: Path):
    run = _train(workdir, "dist-ddp", 2, "ddp", 4)
    ref, got = _losses(single), _losses(run)
    assert len(ref) == len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5
    assert not read_meta(run).get("layout")  # DDP: rank 0 writes the single-file layout
    _assert_close_weights(single, run, 1e-4)


def test_fsdp_two_ranks_match_one_process(single: Path, fsdp: Path):
    ref, got = _losses(single), _losses(fsdp)
    assert len(ref) == len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5
    # sharded: one DCP safetensors shard per rank for the weights and for the optimizer
    ckpt = fsdp / "checkpoints" / "step_00000020"
    meta = read_meta(ckpt)
    assert meta["layout"] == "sharded" and meta["world_size"] == 2
    for part in ("model", "optimizer"):
        assert len(list((ckpt / part).glob("*.safetensors"))) == 2, part
    assert not list(ckpt.rglob(".metadata")) and not list(ckpt.rglob("*.pt"))
    # ...and loads whole into a single process, equal to the single-process run
    _assert_close_weights(single, fsdp, 1e-4)


def _cut_to_step_10(run: Path, name: str) -> Path:
    """A copy of a 20-step run as if it had stopped right after its step-10 checkpoint."""
    cut = run.parent / name
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000020")
    (cut / "latest").write_text("step_00000010\n")
    return cut


def test_fsdp_checkpoint_resumes_in_one_process(workdir: Path, single: Path, fsdp: Path):
    # Cut the sharded run back to its step-10 checkpoint, then finish it in one process.
    run = _cut_to_step_10(fsdp, "dist-fsdp-cut")
    _train(workdir, "dist-fsdp-cut", 1, "none", 8, "--resume")
    ref, got = _losses(single), _losses(run)
    assert len(got) == 20  # steps 11-20 of the sharded run were dropped from the log, then redone
    assert max(abs(a - b) for a, b in zip(ref[10:], got[10:])) <= 1e-5
    assert not read_meta(run).get("layout")  # one process writes single-file checkpoints
    _assert_close_weights(single, run, 1e-4)


def test_fsdp_resumes_from_its_shards(workdir: Path, fsdp: Path):
    # the same cut, finished by two FSDP ranks reading their slices back (DCP load)
    run = _cut_to_step_10(fsdp, "dist-fsdp-cut2")
    _train(workdir, "dist-fsdp-cut2", 2, "fsdp", 4, "--resume")
    ref, got = _losses(fsdp), _losses(run)
    assert len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref[10:], got[10:])) <= 1e-6
    _assert_close_weights(fsdp, run, 1e-6)


def test_damaged_shard_is_a_clear_error(workdir: Path, fsdp: Path, tmp_path: Path):
    from lmforge.config import UserError

    ckpt = tmp_path / "step_00000020"
    shutil.copytree(fsdp / "checkpoints" / "step_00000020", ckpt)
    shard = sorted((ckpt / "model").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read the shards in .*model.*damaged"):
        read_weights(ckpt)


def test_tensor_parallel_matches_one_process(workdir: Path, single: Path):
    # tp=2: both ranks see the same batch of 8; each holds half the heads and MLP units
    run = _train(workdir, "dist-tp", 2, "auto", 8, "--dist.tp", "2")
    ref, got = _losses(single), _losses(run)
    assert len(ref) == len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5
    meta = read_meta(run)
    assert meta["layout"] == "sharded"
    # tokens are counted once per TP group, not once per rank
    assert meta["tokens"] == read_meta(single)["tokens"]
    _assert_close_weights(single, run, 1e-4)


@pytest.mark.slow  # ~35 s; FSDP and TP alone stay in make test; make test-slow
def test_fsdp_times_tensor_parallel_matches_one_process(workdir: Path, single: Path):
    # 4 processes on a (dp=2, tp=2) mesh: FSDP over dp, TP inside each pair; batch 4 per dp rank
    run = _train(workdir, "dist-fsdp-tp", 4, "fsdp", 4, "--dist.tp", "2")
    ref, got = _losses(single), _losses(run)
    assert len(ref) == len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) <= 1e-5
    assert read_meta(run)["world_size"] == 4
    _assert_close_weights(single, run, 1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--dist.tp", "2"], "needs torchrun"),
    (["--dist.strategy", "fsdp"], "needs torchrun"),
    (["--dist.tp", "0"], "dist.tp must be >= 1"),
])
def test_parallel_options_without_torchrun_are_clear_errors(workdir: Path, extra, message):
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", *ARGS, "--run", "dist-bad",
                           *extra], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (workdir / "runs" / "dist-bad").exists()


def test_tp_must_divide_the_heads(workdir: Path):
    # 2 KV heads cannot be split 4 ways: refused before anything is written
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=4", "-m", "lmforge.cli", "--"]
    proc = subprocess.run([*launcher, *ARGS, "--run", "dist-bad-tp", "--dist.tp", "4"],
                          cwd=workdir, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    # every rank stops with our one-line error (torchrun then adds its own failure report)
    assert proc.stderr.count("lmforge: error: dist.tp: 4 does not divide the model's "
                             "kv_heads (2)") == 4
    assert not (workdir / "runs" / "dist-bad-tp").exists()
