"""finetune (full, LoRA, QLoRA), merge, eval and data check end to end on a tiny decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import cli
from lmforge.models.quant import bitsandbytes_available
from lmforge.run import load_model
from tests.smoke.helpers import TINY_MODEL, assert_user_error, lmforge

BASE = "ft-base"
FT = ["--train.max_steps", "6", "--train.batch_size", "4", "--train.eval_every", "3",
      "--train.threads", "1", "--optim.lr", "1e-3", "--optim.warmup_steps", "1"]


def _rows() -> list[dict]:
    return [{"prompt": f"add {a} and {b}", "completion": f"{a + b}"}
            for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def ftdir(workdir: Path) -> Path:
    """A tiny base run (context 128: a ChatML row fits) and a prompt/completion file."""
    (workdir / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        code = cli.run(["pretrain", "--data", "prepared", "--run", BASE, *TINY_MODEL,
                        "--model.block_size", "128", "--train.max_steps", "4",
                        "--train.batch_size", "2", "--train.threads", "1",
                        "--train.eval_tokens", "1024", "--sample_tokens", "0", "--overwrite"])
    assert code == 0
    return workdir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    step = (run_dir / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / step / "model.safetensors")


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_finetune_writes_a_loadable_run(ftdir: Path, method: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ftdir)
    out = f"ft-{method}"
    assert cli.run(["finetune", "--run", f"runs/{BASE}", "--data", "sft.jsonl", "--method",
                    method, "--out", out, "--overwrite", *FT]) == 0
    run = ftdir / "runs" / out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_loss"] < summary["val_loss_before"]
    assert 0 < summary["data"]["loss_fraction"] < 0.5
    loaded = load_model(run)  # what `lmforge generate` does
    assert loaded.model(torch.tensor([[1, 2, 3]])).shape[-1] == loaded.model.cfg.vocab_size
    base, tuned = _weights(ftdir / "runs" / BASE), _weights(run)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    if method == "full":
        assert "tok_emb.weight" in changed
        assert not (run / "adapter.safetensors").exists()
    else:
        assert changed and all(k.endswith(("_proj.weight",)) for k in changed)
        adapter = load_file(run / "adapter.safetensors")
        assert adapter and all(k.endswith(("lora_A", "lora_B")) for k in adapter)
        assert json.loads((run / "adapter.json").read_text())["method"] == method
    if method == "qlora":  # bitsandbytes' NF4 where it is installed, with double quantization
        want = "bitsandbytes" if bitsandbytes_available() else "torch"
        assert summary["nf4"]["backend"] == want and summary["nf4"]["double_quant"]
        assert 4.1 < summary["nf4"]["bits_per_weight"] < 4.2
        assert cli.run(["merge", "--adapter", f"runs/{out}", "--out", f"{out}-merged",
                        "--overwrite"]) == 0  # onto the base stored as it was trained
        merged = json.loads((ftdir / "runs" / f"{out}-merged" / "summary.json").read_text())
        assert merged["max_logit_diff"] < 1e-4


def test_qlora_falls_back_to_plain_pytorch_nf4(ftdir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bitsandbytes, QLoRA trains on the plain-PyTorch NF4 (and says so); its adapter
    merges onto that same base."""
    from lmforge.models import quant

    monkeypatch.chdir(ftdir)
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    assert cli.run(["finetune", "--run", f"runs/{BASE}", "--data", "sft.jsonl", "--method",
                    "qlora", "--out", "ft-qlora-torch", "--overwrite", *FT]) == 0
    run = ftdir / "runs" / "ft-qlora-torch"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nf4"]["backend"] == "torch" and summary["nf4"]["double_quant"]
    assert summary["steps"] == 6 and summary["val_loss"] < summary["val_loss_before"]
    assert json.loads((run / "adapter.json").read_text())["nf4_backend"] == "torch"
    assert cli.run(["merge", "--adapter", "runs/ft-qlora-torch", "--out", "ft-qlora-merged",
                    "--overwrite"]) == 0
    merged = json.loads((ftdir / "runs" / "ft-qlora-merged" / "summary.json").read_text())
    assert merged["max_logit_diff"] < 1e-4


def test_merge_equals_the_finetuned_run(ftdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ftdir)
    if not (ftdir / "runs" / "ft-lora" / "adapter.json").exists():
        pytest.skip("needs the lora run of the test above")
    assert cli.run(["merge", "--adapter", "runs/ft-lora", "--out", "ft-merged",
                    "--device", "cpu", "--overwrite"]) == 0
    merged = json.loads((ftdir / "runs" / "ft-merged" / "summary.json").read_text())
    assert merged["max_logit_diff"] < 1e-5
    a, b = _weights(ftdir / "runs" / "ft-lora"), _weights(ftdir / "runs" / "ft-merged")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_eval_with_baseline_writes_results(ftdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ftdir)
    (ftdir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()[:4]))
    if not (ftdir / "runs" / "ft-full").exists():
        pytest.skip("needs the full run of the test above")
    assert cli.run(["eval", "--run", "runs/ft-full", "--data", "test.jsonl", "--baseline",
                    f"runs/{BASE}", "--max_new_tokens", "4", "--threads", "1"]) == 0
    for run in ("ft-full", BASE):
        result = json.loads((ftdir / "runs" / run / "eval_test.json").read_text())
        for key in ("loss", "perplexity", "exact_match", "token_jaccard", "rouge1", "rouge2",
                    "rougeL", "bleu"):
            assert key in result, key
        assert result["examples"] == 4


def test_empty_replies_are_refused_before_training(ftdir: Path) -> None:
    (ftdir / "empty.jsonl").write_text(json.dumps({"prompt": "hi", "completion": ""}) + "\n")
    proc = lmforge("finetune", "--run", f"runs/{BASE}", "--data", "empty.jsonl", "--out",
                   "ft-never", cwd=ftdir)
    assert_user_error(proc, "no assistant token would be trained")
    assert not (ftdir / "runs" / "ft-never").exists()
    proc = lmforge("data", "check", "empty.jsonl", "--run", f"runs/{BASE}", cwd=ftdir)
    assert proc.returncode == 2 and "empty_turns" in proc.stdout


def test_template_without_end_of_turn_is_refused(ftdir: Path) -> None:
    (ftdir / "no_eot.jinja").write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    proc = lmforge("finetune", "--run", f"runs/{BASE}", "--data", "sft.jsonl", "--out",
                   "ft-never", "--template", "no_eot.jinja", cwd=ftdir)
    assert_user_error(proc, "no end-of-turn token")


def test_generation_metrics_on_known_strings() -> None:
    from lmforge.eval.generation import generation_metrics

    m = generation_metrics(["the cat sat on the mat", "Hello"], ["the cat sat on the mat",
                                                                  "hello world"])
    assert m["exact_match"] == 0.5 and m["token_jaccard"] == 0.75
    assert m["rouge1"] == pytest.approx((1 + 2 / 3) / 2)
    assert 0 < m["bleu"] <= 100


def _sentiment_rows() -> list[dict]:
    import random

    rng = random.Random(0)
    good, bad = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
    filler = ["the", "module", "with", "a", "list", "of", "values", "and", "the", "function"]
    return [{"text": " ".join([*rng.sample(filler, 4), rng.choice(good if i % 2 else bad),
                               *rng.sample(filler, 3)]), "label": "pos" if i % 2 else "neg"}
            for i in range(120)]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_classify_an_encoder(workdir: Path, method: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    (workdir / "sent.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sentiment_rows()))
    if not (workdir / "runs" / "ft-bert" / "latest").exists():
        assert cli.run(["pretrain", "--objective", "mlm", "--data", "prepared", "--run",
                        "ft-bert", "--preset", "bert-tiny", "--encoder.n_layer", "2",
                        "--encoder.n_embd", "32", "--encoder.n_head", "2",
                        "--encoder.block_size", "64", "--train.max_steps", "4",
                        "--train.batch_size", "4", "--train.threads", "1",
                        "--train.eval_tokens", "1024", "--overwrite"]) == 0
    extra = ["--lora.targets", "query,key,value,dense"] if method == "lora" else []
    assert cli.run(["finetune", "--task", "classify", "--run", "runs/ft-bert", "--data",
                    "sent.jsonl", "--method", method, "--out", f"ft-cls-{method}",
                    "--train.max_steps", "60", "--optim.lr", "3e-3", "--train.threads", "1",
                    "--train.eval_every", "30", "--val_fraction", "0.2", "--overwrite",
                    *extra]) == 0
    summary = json.loads((workdir / "runs" / f"ft-cls-{method}" / "summary.json").read_text())
    assert summary["labels"] == ["neg", "pos"] and summary["val_examples"] == 24
    if method == "full":  # measured 0.5 -> 1.0: the sentiment word decides the label
        assert summary["val_accuracy"] >= 0.9
    base = _weights(workdir / "runs" / "ft-bert")
    tuned = _weights(workdir / "runs" / f"ft-cls-{method}")
    if method == "lora":  # frozen body: embeddings and norms are bit-identical
        for key in ("bert.embeddings.word_embeddings.weight",
                    "bert.encoder.layer.0.attention.output.LayerNorm.weight"):
            assert torch.equal(base[key], tuned[key]), key


@pytest.mark.parametrize("extra", [["--base_dtype", "bf16"], ["--train.precision", "bf16"],
                                   ["--train.precision", "fp16"]])
def test_lora_with_bf16_base_or_autocast_learns(ftdir: Path, extra: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The 16-bit paths on CPU: a bf16 frozen base, bf16 autocast, fp16 with a grad scaler."""
    monkeypatch.chdir(ftdir)
    out = f"ft-16-{extra[1]}-{extra[0].strip('-').replace('.', '-')}"
    assert cli.run(["finetune", "--run", f"runs/{BASE}", "--data", "sft.jsonl", "--method",
                    "lora", "--out", out, "--overwrite", *FT, *extra]) == 0
    summary = json.loads((ftdir / "runs" / out / "summary.json").read_text())
    assert summary["val_loss"] < summary["val_loss_before"]
    loaded = load_model(ftdir / "runs" / out)  # the merged run loads as an ordinary fp32 run
    assert loaded.model.tok_emb.weight.dtype == torch.float32


def test_finetune_refuses_options_it_cannot_honour(ftdir: Path) -> None:
    for args, needle in ((["--train.seq_len", "64"], "max_len"),
                         (["--method", "full", "--base_dtype", "bf16"], "base_dtype"),
                         (["--dist.tp", "2"], "dist.tp"),
                         (["--dist.strategy", "fsdp"], "torchrun")):
        proc = lmforge("finetune", "--run", f"runs/{BASE}", "--data", "sft.jsonl", "--out",
                       "ft-refused", *args, cwd=ftdir)
        assert_user_error(proc, needle)
    assert not (ftdir / "runs" / "ft-refused").exists()
