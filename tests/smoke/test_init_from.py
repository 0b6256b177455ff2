"""`pretrain --init_from RUN`: continued pretraining from a run's architecture and weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge import cli
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.loader import TokenDataset, eval_batches
from lmforge.eval.lm import lm_loss
from lmforge.run import load_model
from tests.smoke.helpers import TINY_MODEL, assert_user_error, lmforge

QUICK = ["--train.batch_size", "4", "--train.threads", "1", "--train.eval_tokens", "2048",
         "--sample_tokens", "0", "--train.log_every", "1"]


@pytest.fixture(scope="module")
def cont(workdir: Path) -> Path:
    """A base run on the shared corpus, and new text prepared with the base's tokenizer."""
    new = workdir / "corpus-new"
    new.mkdir(exist_ok=True)
    for name, text in sorted(pydoc_topics_text().items())[60:100]:
        (new / f"{name}.txt").write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert cli.run(["pretrain", "--data", "prepared", "--run", "cont-base", *TINY_MODEL,
                        "--train.max_steps", "60", *QUICK, "--overwrite"]) == 0
        assert cli.run(["data", "prepare", str(new), "--out", "prepared-new", "--tokenizer",
                        "runs/cont-base/tokenizer.json"]) == 0
    return workdir


def test_init_from_starts_at_the_base_and_lowers_its_loss_on_new_text(
        cont: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cont)
    ds = TokenDataset.open("prepared-new")
    val = eval_batches(ds.split("val"), 4, 64, 2048)
    base_loss, _ = lm_loss(load_model("runs/cont-base").model, val)
    assert cli.run(["pretrain", "--init_from", "runs/cont-base", "--data", "prepared-new",
                    "--run", "cont", "--train.max_steps", "30", "--optim.warmup_steps", "3",
                    "--optim.lr", "1e-3", *QUICK, "--overwrite"]) == 0
    run = cont / "runs" / "cont"
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    fresh = cont / "runs" / "cont-base" / "metrics.jsonl"
    fresh_first = json.loads(fresh.read_text().splitlines()[0])["loss"]
    # step 1 is trained from the base's weights: far below a fresh init's first loss
    assert first["loss"] < fresh_first - 0.5
    summary = json.loads((run / "summary.json").read_text())
    print(f"\nnew text val loss: base {base_loss:.4f} -> continued {summary['val_loss']:.4f}")
    assert summary["val_loss"] < base_loss
    saved = (run / "config.yaml").read_text()
    assert "init_from: runs/cont-base" in saved


def test_init_from_refuses_data_of_another_tokenizer_and_a_preset(cont: Path) -> None:
    # the same new text, with a tokenizer of its own: the ids mean other tokens
    assert lmforge("data", "prepare", str(cont / "corpus-new"), "--out", "prepared-other",
                   "--vocab_size", "512", cwd=cont).returncode == 0
    proc = lmforge("pretrain", "--init_from", "runs/cont-base", "--data", "prepared-other",
                   "--run", "cont-bad", cwd=cont)
    assert_user_error(proc, "prepared-other", "--tokenizer runs/cont-base/tokenizer.json")
    proc = lmforge("pretrain", "--init_from", "runs/cont-base", "--preset", "llama-1m",
                   "--data", "prepared-new", "--run", "cont-bad2", cwd=cont)
    assert_user_error(proc, "init_from", "preset")
    assert not (cont / "runs" / "cont-bad").exists() and not (cont / "runs" / "cont-bad2").exists()
