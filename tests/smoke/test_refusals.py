"""A refused pretrain / finetune leaves no run folder; --train.epochs and --optim.warmup_ratio
resolve into the steps the run takes and the config.yaml it saves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lmforge import cli
from lmforge.config import UserError
from lmforge.data.loader import TokenDataset
from tests.smoke.helpers import TINY_MODEL, assert_user_error, lmforge

QUICK = ["--train.threads", "1", "--train.eval_tokens", "1024", "--sample_tokens", "0",
         "--train.trackers", ""]


def _refused(argv: list[str], cwd: Path, capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the CLI in-process; assert exit 2 and a one-line error; return that line."""
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--train.batch_size", "0"], "train.batch_size"),
    (["--data", "nowhere"], "nowhere"),
    (["--train.trackers", "nosuch"], "nosuch"),
    (["--optim.lr", "nan"], "--optim.lr"),
    (["--optim.beta2", "-inf"], "--optim.beta2"),
    (["--train.epochs", "1", "--train.max_steps", "5"], "train.epochs"),
    (["--optim.warmup_ratio", "1.5"], "optim.warmup_ratio"),
    (["--train.seq_len", "1000"], "train.seq_len"),
])
def test_refused_pretrain_leaves_no_run_folder(argv: list[str], needle: str, workdir: Path,
                                               tmp_path: Path, capsys, monkeypatch):
    data = str(workdir / "prepared")
    line = _refused(["pretrain", "--data", data, "--run", "r", *TINY_MODEL, *QUICK, *argv],
                    tmp_path, capsys, monkeypatch)
    assert needle in line
    assert not (tmp_path / "runs").exists()


def test_a_refusal_while_setting_up_training_leaves_no_run_folder(workdir: Path, tmp_path: Path,
                                                                  capsys, monkeypatch):
    def refuse(*_: object) -> None:
        raise UserError("optim: refused by the optimizer")

    monkeypatch.setattr("lmforge.train.setup.build_optimizer", refuse)
    _refused(["pretrain", "--data", str(workdir / "prepared"), "--run", "r", *TINY_MODEL, *QUICK],
             tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "runs").exists()


def test_nan_through_the_real_executable_is_one_line(workdir: Path, tmp_path: Path):
    proc = lmforge("pretrain", "--data", str(workdir / "prepared"), "--optim.lr", "nan",
                   cwd=tmp_path)
    assert_user_error(proc, "--optim.lr", "finite")
    assert list(tmp_path.iterdir()) == []


def test_pretrain_epochs_set_the_length_and_the_saved_config(workdir: Path, monkeypatch):
    monkeypatch.chdir(workdir)
    assert cli.run(["pretrain", "--data", "prepared", "--run", "epochs", *TINY_MODEL, *QUICK,
                    "--train.batch_size", "8", "--train.epochs", "0.03",
                    "--optim.warmup_ratio", "0.2", "--overwrite"]) == 0
    train_tokens = TokenDataset.open(workdir / "prepared").num_tokens("train")
    steps = math.ceil(0.03 * train_tokens / (8 * 64))
    saved = yaml.safe_load((workdir / "runs" / "epochs" / "config.yaml").read_text())
    assert (saved["train"]["max_steps"], saved["train"]["epochs"]) == (steps, None)
    assert saved["optim"]["warmup_steps"] == math.ceil(0.2 * steps)
    summary = json.loads((workdir / "runs" / "epochs" / "summary.json").read_text())
    assert summary["steps"] == steps


# --------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def base(workdir: Path) -> Path:
    """A tiny decoder run to fine-tune, and 24 prompt/completion rows."""
    rows = [{"prompt": f"add {a} and {b}", "completion": f"{a + b}"}
            for a in range(6) for b in range(4)]
    (workdir / "refusal-sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert cli.run(["pretrain", "--data", "prepared", "--run", "refusal-base", *TINY_MODEL,
                        "--model.block_size", "128", "--train.max_steps", "2",
                        "--train.batch_size", "2", *QUICK, "--overwrite"]) == 0
    return workdir / "runs" / "refusal-base"


@pytest.mark.parametrize(("argv", "needle"), [
    (["--train.batch_size", "0"], "train.batch_size"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--optim.lr", "inf"], "--optim.lr"),
    (["--train.epochs", "1", "--train.max_steps", "3"], "train.epochs"),
    (["--optim.warmup_ratio", "0.1", "--optim.warmup_steps", "3"], "optim.warmup_ratio"),
    (["--task", "classify"], "label"),  # chat rows are no {text, label} rows
])
def test_refused_finetune_leaves_no_run_folder(argv: list[str], needle: str, base: Path,
                                               tmp_path: Path, capsys, monkeypatch):
    data = str(base.parent.parent / "refusal-sft.jsonl")
    line = _refused(["finetune", "--run", str(base), "--data", data, "--out", "ft",
                     "--train.threads", "1", *argv], tmp_path, capsys, monkeypatch)
    assert needle in line
    assert not (tmp_path / "runs").exists()


def test_finetune_epochs_count_train_examples(base: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = str(base.parent.parent / "refusal-sft.jsonl")
    # 24 rows, 10% (2) held out: 22 / batch 4 = 5.5 steps an epoch; half an epoch = 3 steps
    assert cli.run(["finetune", "--run", str(base), "--data", data, "--out", "ft",
                    "--method", "full", "--train.batch_size", "4", "--train.threads", "1",
                    "--train.epochs", "0.5", "--optim.warmup_ratio", "0.25"]) == 0
    saved = yaml.safe_load((tmp_path / "runs" / "ft" / "config.yaml").read_text())["finetune"]
    assert (saved["train"]["max_steps"], saved["train"]["epochs"]) == (3, None)
    assert (saved["optim"]["warmup_steps"], saved["optim"]["warmup_ratio"]) == (1, None)
    assert json.loads((tmp_path / "runs" / "ft" / "summary.json").read_text())["steps"] == 3


