"""finetune --task dpo (LoRA: adapters-off reference; full: precomputed reference) and data
check of preference pairs, end to end on a tiny decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import cli
from lmforge.config import UserError
from lmforge.run import load_model
from tests.smoke.helpers import TINY_MODEL, assert_user_error, lmforge
from tests.smoke.test_classify_demo import RESUME, _assert_same, _final, _interrupted_then_resumed

BASE = "pref-base"
FT = ["--train.max_steps", "6", "--train.batch_size", "4", "--train.eval_every", "3",
      "--train.log_every", "1", "--train.threads", "1", "--optim.lr", "1e-2",
      "--optim.warmup_steps", "1", "--val_fraction", "0.25"]


@pytest.fixture(scope="module")
def prefdir(workdir: Path) -> Path:
    """A tiny base run (context 128) and a file of arithmetic preference pairs."""
    rows = [{"prompt": f"add {a} and {b}", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"}
            for a in range(6) for b in range(4)]
    (workdir / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        code = cli.run(["pretrain", "--data", "prepared", "--run", BASE, *TINY_MODEL,
                        "--model.block_size", "128", "--train.max_steps", "4",
                        "--train.batch_size", "2", "--train.threads", "1",
                        "--train.eval_tokens", "1024", "--sample_tokens", "0", "--overwrite"])
    assert code == 0
    return workdir


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_writes_a_loadable_run(prefdir: Path, method: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(prefdir)
    out = f"dpo-{method}"
    assert cli.run(["finetune", "--task", "dpo", "--run", f"runs/{BASE}", "--data", "pref.jsonl",
                    "--method", method, "--out", out, "--overwrite", *FT]) == 0
    run = prefdir / "runs" / out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "dpo" and summary["steps"] == 6
    assert summary["data"]["pairs"] == 24 and summary["data"]["bad_rows"] == 0
    before, after = summary["val_before"], summary["val_after"]
    # before any step the policy is its reference: every reward is 0, the loss log 2
    assert before["val_reward_margin"] == 0 and before["val_loss"] == pytest.approx(0.693147)
    assert after["val_reward_margin"] != 0
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == 6 and train[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert {"reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected"} <= train[-1].keys()
    loaded = load_model(run)  # what `lmforge generate` does
    assert loaded.model(torch.tensor([[1, 2, 3]])).shape[-1] == loaded.model.cfg.vocab_size
    assert (run / "adapter.safetensors").exists() == (method == "lora")


def test_bad_pairs_are_refused_by_file_and_line(prefdir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bad = prefdir / "bad-pref.jsonl"
    bad.write_text(json.dumps({"prompt": "add 1 and 2", "chosen": "3", "rejected": "4"}) + "\n"
                   + json.dumps({"prompt": "add 1 and 2", "chosen": "3", "rejected": "3"}) + "\n")
    proc = lmforge("data", "check", "bad-pref.jsonl", "--run", f"runs/{BASE}", cwd=prefdir)
    assert_user_error(proc, "bad-pref.jsonl:2", "identical")
    monkeypatch.chdir(prefdir)
    with pytest.raises(UserError, match=r"bad-pref.jsonl:2: .*identical"):
        cli.run(["finetune", "--task", "dpo", "--run", f"runs/{BASE}", "--data",
                 "bad-pref.jsonl", "--out", "never", *FT])
    assert not (prefdir / "runs" / "never").exists()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_resume_is_bit_identical(prefdir: Path, method: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the step-3 save and resumed, a DPO run ends as one never stopped (full:
    the reference log-probs are computed again from the base, not from the resumed weights)."""
    monkeypatch.chdir(prefdir)
    args = ["finetune", "--task", "dpo", "--run", f"runs/{BASE}", "--data", "pref.jsonl",
            "--method", method, "--train.batch_size", "4", "--train.threads", "1",
            "--optim.lr", "1e-2", "--optim.warmup_steps", "1", *RESUME]
    straight = prefdir / "runs" / f"dpo-{method}-straight"
    assert cli.run([*args, "--out", straight.name, "--overwrite"]) == 0
    run = _interrupted_then_resumed(args, f"dpo-{method}-broken", monkeypatch)
    _assert_same(_final(straight), _final(run))
    a, b = (json.loads((r / "summary.json").read_text()) for r in (straight, run))
    assert a["val_after"] == b["val_after"] and a["val_before"] == b["val_before"]
