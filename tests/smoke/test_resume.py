"""An interrupted pretraining run, resumed, ends bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge import cli
from lmforge.config import UserError
from lmforge.data import loader
from tests.smoke.helpers import TINY_MODEL

ARGS = [
    "pretrain", "--data", "prepared", *TINY_MODEL, "--train.max_steps", "16",
    "--train.batch_size", "4", "--train.eval_every", "8", "--train.save_every", "4",
    "--train.eval_tokens", "1024", "--optim.warmup_steps", "3", "--model.dropout", "0.1",
    "--sample_tokens", "0",
]


def _final_weights(run_dir: Path) -> dict:
    step = (run_dir / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / step / "model.safetensors")


def test_resume_after_interrupt_is_bit_identical(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(workdir)
    assert cli.run([*ARGS, "--run", "straight"]) == 0

    # Interrupt the second run while it draws the batch of step 11 (after the step-8 save):
    # like Ctrl-C, a KeyboardInterrupt from inside the loop.
    real_next = loader.RandomBatches.__next__
    calls = {"n": 0}

    def interrupting_next(self):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(loader.RandomBatches, "__next__", interrupting_next)
    with pytest.raises(UserError, match="--resume"):
        cli.run([*ARGS, "--run", "broken"])
    monkeypatch.setattr(loader.RandomBatches, "__next__", real_next)
    assert (workdir / "runs" / "broken" / "latest").read_text().strip() == "step_00000008"

    assert cli.run([*ARGS, "--run", "broken", "--resume"]) == 0
    a = _final_weights(workdir / "runs" / "straight")
    b = _final_weights(workdir / "runs" / "broken")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
