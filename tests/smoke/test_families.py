"""The encoder (mlm) and encoder-decoder (seq2seq) objectives end to end through the CLI."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lmforge import cli
from lmforge.config import ConfigError, UserError
from lmforge.data.tokenizer import load_tokenizer
from tests.smoke.helpers import lmforge

TINY_ENCODER = ["--encoder.n_layer", "2", "--encoder.n_embd", "32", "--encoder.n_head", "4",
                "--encoder.block_size", "64"]
TINY_SEQ2SEQ = ["--seq2seq.n_encoder_layer", "1", "--seq2seq.n_decoder_layer", "1",
                "--seq2seq.n_embd", "64", "--seq2seq.n_head", "4", "--seq2seq.dropout", "0"]
# One thread: these models are so small that a second thread costs more than it gives
# (measured 12 ms vs 90 ms per seq2seq step on a busy 2-core machine).
SHORT = ["--train.eval_every", "20", "--train.save_every", "40", "--optim.warmup_steps", "5",
         "--optim.lr", "1e-2", "--train.threads", "1"]


def _evals(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def mlm_run(workdir: Path) -> Path:
    proc = lmforge("pretrain", "--objective", "mlm", "--preset", "bert-tiny", "--data",
                   "prepared", "--run", "tiny-mlm", *TINY_ENCODER, *SHORT,
                   "--train.max_steps", "40", "--train.batch_size", "8",
                   "--train.eval_tokens", "4096", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "masked-token loss" in proc.stdout
    return workdir / "runs" / "tiny-mlm"


@pytest.fixture(scope="module")
def seq2seq_run(workdir: Path) -> Path:
    synth = lmforge("data", "synth", "--task", "reverse", "--out", "reverse", "--n_train",
                    "2000", "--n_val", "64", "--max_len", "6", "--n_words", "16", cwd=workdir)
    assert synth.returncode == 0, synth.stderr
    proc = lmforge("pretrain", "--objective", "seq2seq", "--data", "reverse", "--run",
                   "tiny-s2s", *TINY_SEQ2SEQ, *SHORT, "--train.max_steps", "40",
                   "--train.batch_size", "32", cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "greedy exact match" in proc.stdout
    return workdir / "runs" / "tiny-s2s"


def test_mlm_pretraining_learns_and_saves_an_encoder_run(mlm_run: Path) -> None:
    evals = _evals(mlm_run)
    assert len(evals) == 2 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    summary = json.loads((mlm_run / "summary.json").read_text())
    tok = load_tokenizer(mlm_run / "tokenizer.json")  # the run's tokenizer gained [MASK]
    vocab = tok.get_vocab_size()
    assert tok.token_to_id("[MASK]") is not None and tok.token_to_id("[CLS]") is not None
    assert summary["objective"] == "mlm" and summary["val_loss"] < math.log(vocab)
    assert 0 < summary["val_accuracy"] < 1 and summary["unigram_baseline_loss"] > 0
    saved = yaml.safe_load((mlm_run / "config.yaml").read_text())
    assert saved["objective"] == "mlm" and saved["encoder"]["n_embd"] == 32
    assert saved["encoder"]["vocab_size"] == vocab and saved["mlm"]["probability"] == 0.15
    assert "model" not in saved and "seq2seq" not in saved  # only the sections it uses
    assert (mlm_run / "latest").is_file() and (mlm_run / "loss.png").is_file()


def test_seq2seq_pretraining_learns_and_reports_exact_match(seq2seq_run: Path) -> None:
    evals = _evals(seq2seq_run)
    assert len(evals) == 2 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all(0.0 <= e["val_exact_match"] <= 1.0 for e in evals)
    summary = json.loads((seq2seq_run / "summary.json").read_text())
    assert summary["objective"] == "seq2seq" and summary["steps"] == 40
    assert summary["val_loss"] < math.log(16)  # better than a uniform guess over the words
    saved = yaml.safe_load((seq2seq_run / "config.yaml").read_text())
    assert saved["seq2seq"]["n_embd"] == 64 and "encoder" not in saved


def test_seq2seq_resume_continues_from_the_checkpoint(seq2seq_run: Path, workdir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    config = str(seq2seq_run / "config.yaml")
    threads = torch.get_num_threads()
    try:  # the run's config sets train.threads 1 in this process: give the others theirs back
        assert cli.run(["pretrain", "--config", config, "--resume",
                        "--train.max_steps", "50"]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((seq2seq_run / "summary.json").read_text())
    assert summary["steps"] == 50
    assert (seq2seq_run / "latest").read_text().strip() == "step_00000050"


def test_objective_mistakes_are_named(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    base = ["pretrain", "--run", "never", "--data", "prepared"]
    cases = [
        (["--objective", "mlm", "--preset", "llama-1m"], r"decoder preset.*bert-tiny"),
        (["--encoder.n_layer", "2"], r"encoder\.\*.*--objective clm.*--model\.\*"),
        (["--objective", "seq2seq", "--model.n_layer", "2"], r"model\.\*.*--seq2seq\.\*"),
        (["--objective", "mlm", "--mlm.probability", "1.5"], r"mlm\.probability"),
        (["--objective", "seq2seq"], r"prepared: has no train\.jsonl.*lmforge data synth"),
        (["--objective", "seq2seq", "--data", "reverse", "--train.seq_len", "8"],
         r"train\.seq_len"),
        (["--objective", "bogus"], r"objective"),
    ]
    for extra, pattern in cases:
        with pytest.raises((ConfigError, UserError), match=pattern):
            cli.run([*base, *extra])
    assert not (workdir / "runs" / "never").exists()


def test_help_lists_the_new_command_and_sections(workdir: Path) -> None:
    top = lmforge("--help", cwd=workdir)
    assert "data synth" in top.stdout
    help_text = cli.command_help("pretrain", importlib.import_module(cli.COMMANDS["pretrain"]))
    assert "--objective" in help_text and "--encoder.type_vocab_size" in help_text
    assert "--seq2seq.norm" in help_text and "--mlm.probability" in help_text


def test_load_run_opens_every_kind_of_run(mlm_run: Path, seq2seq_run: Path, workdir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One loader for every run the commands write: pretrain (clm, mlm, seq2seq) and
    finetune --task classify (an import of a HF folder: tests/parity/test_hf_bert.py)."""
    from lmforge.models.decoder import Decoder
    from lmforge.models.encoder import EncoderForClassification, EncoderForMaskedLM
    from lmforge.models.seq2seq import Seq2Seq
    from lmforge.run import load_model, load_run

    monkeypatch.chdir(workdir)
    rows = [{"text": f"the module {w} value", "label": "pos" if i % 2 else "neg"}
            for i, w in enumerate(["good", "bad"] * 10)]
    (workdir / "kinds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    threads = torch.get_num_threads()
    try:  # train.threads 1 would stay set in this process: give the others theirs back
        assert cli.run(["pretrain", "--data", "prepared", "--run", "kinds-clm",
                        "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "4",
                        "--model.n_kv_head", "2", "--model.block_size", "32",
                        "--train.max_steps", "2", "--train.batch_size", "2",
                        "--train.eval_every", "2", "--train.save_every", "2",
                        "--train.eval_tokens", "256", "--sample_tokens", "1",
                        "--train.threads", "1", "--overwrite"]) == 0
        assert cli.run(["finetune", "--task", "classify", "--run", str(mlm_run), "--data",
                        "kinds.jsonl", "--method", "full", "--out", "kinds-cls",
                        "--train.max_steps", "2", "--train.threads", "1",
                        "--train.save_every", "2", "--overwrite"]) == 0
    finally:
        torch.set_num_threads(threads)
    expect = {workdir / "runs" / "kinds-clm": ("decoder", Decoder),
              mlm_run: ("encoder", EncoderForMaskedLM),
              workdir / "runs" / "kinds-cls": ("classifier", EncoderForClassification),
              seq2seq_run: ("seq2seq", Seq2Seq)}
    for run, (kind, cls) in expect.items():
        loaded = load_run(run)
        assert loaded.kind == kind and type(loaded.model) is cls, run
        assert not loaded.model.training and loaded.spec.step > 0
    clf = load_run(workdir / "runs" / "kinds-cls").spec
    assert clf.labels == ("neg", "pos") and clf.max_len == 64
    assert load_run(seq2seq_run).spec.eos_id is not None
    with pytest.raises(UserError, match="is an encoder run; this needs a decoder run"):
        load_model(mlm_run)


# --------------------------------------------------------------------------- export


def _card_metric(run: Path) -> str:
    """The exported checkpoint's own validation loss, as the model card prints it."""
    from lmforge.checkpoint import read_meta
    from lmforge.run import read_run_spec

    loss = read_meta(read_run_spec(run).checkpoint)["info"]["metrics"]["val_loss"]
    return f"| validation loss (nats/token) | {loss:.4f} |"


def test_seq2seq_run_exports_as_marian_that_transformers_runs_alike(seq2seq_run: Path,
                                                                    workdir: Path,
                                                                    tmp_path: Path) -> None:
    """A trained run -> MarianMTModel: loads with no missing keys; its tokenizer gives the
    training's source ids; teacher-forced logits and greedy tokens equal ours on real pairs."""
    transformers = pytest.importorskip("transformers")
    from lmforge.data.pairs import PairIds, collate, encode_pairs, read_pairs
    from lmforge.infer.seq2seq_generate import generate_seq2seq
    from lmforge.run import load_run

    out = tmp_path / "marian"
    assert cli.run(["export", "--run", str(seq2seq_run), "--format", "hf", "--out", str(out)]) == 0
    theirs, info = transformers.MarianMTModel.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    loaded = load_run(seq2seq_run)
    tok, model = loaded.tokenizer, loaded.model
    ids = PairIds(tok.token_to_id("[PAD]"), tok.token_to_id("[BOS]"), loaded.spec.eos_id)
    pairs = read_pairs(workdir / "reverse" / "val.jsonl")[:6]
    items, _ = encode_pairs(tok, pairs, ids, model.cfg.block_size)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok([p.source for p in pairs]).input_ids == [s for s, _ in items]
    (src, tgt, mask), _ = collate(items, ids)
    with torch.no_grad():
        ref = theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        assert (model(src, tgt, mask) - ref).abs().max().item() <= 1e-4
    ours = generate_seq2seq(model, [s for s, _ in items], 10, ids.bos, ids.eos, ids.pad)
    gen = theirs.generate(input_ids=src, attention_mask=mask, max_new_tokens=10,
                          do_sample=False, num_beams=1)
    rows = [r[1:].tolist() for r in gen]  # after the decoder start token
    assert ours == [r[: r.index(ids.eos)] if ids.eos in r else r for r in rows]
    config = json.loads((out / "config.json").read_text())
    assert (config["decoder_start_token_id"], config["eos_token_id"],
            config["pad_token_id"]) == (ids.bos, ids.eos, ids.pad)
    card = (out / "README.md").read_text()
    for line in (f"| parameters | {model.num_params():,} |", "| encoder layers | 1 |",
                 "| width | 64 |", "post-norm", "- objective: seq2seq", "- data: `reverse`",
                 "pipeline_tag: text2text-generation", "AutoModelForSeq2SeqLM",
                 "validation greedy exact match", _card_metric(seq2seq_run)):
        assert line in card, line
    with pytest.raises(UserError, match="exports only as --format hf"):
        cli.run(["export", "--run", str(seq2seq_run), "--format", "onnx", "--out",
                 str(tmp_path / "onnx")])


def test_encoder_exports_get_a_model_card_from_their_run(mlm_run: Path, workdir: Path,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A masked-LM run and a classifier fine-tuned from it: the card's architecture, task,
    training and metrics come from the run."""
    pytest.importorskip("transformers")
    from lmforge.run import load_run

    monkeypatch.chdir(workdir)
    rows = [{"text": f"the module {w} value", "label": "pos" if i % 2 else "neg"}
            for i, w in enumerate(["good", "bad"] * 10)]
    (workdir / "card.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    threads = torch.get_num_threads()
    try:
        assert cli.run(["finetune", "--task", "classify", "--run", str(mlm_run), "--data",
                        "card.jsonl", "--method", "full", "--out", "card-cls",
                        "--train.max_steps", "2", "--train.threads", "1",
                        "--train.save_every", "2", "--overwrite"]) == 0
    finally:
        torch.set_num_threads(threads)
    cls_run = workdir / "runs" / "card-cls"
    for run, tag, lines in (
            (mlm_run, "fill-mask", ["- objective: mlm", "- data: `prepared` (", "- batch: 8 x ",
                                    "AutoModelForMaskedLM", _card_metric(mlm_run)]),
            (cls_run, "text-classification", [f"classification fine-tune of `{mlm_run.name}`",
                                              "| labels | neg, pos |", "- data: `card.jsonl`",
                                              "examples of up to 64 tokens",
                                              "AutoModelForSequenceClassification",
                                              "validation macro-F1"])):
        out = tmp_path / run.name
        assert cli.run(["export", "--run", str(run), "--out", str(out)]) == 0
        card = (out / "README.md").read_text()
        params = load_run(run).model.num_params()
        for line in (f"pipeline_tag: {tag}", f"| parameters | {params:,} |", "| layers | 2 |",
                     "| width | 32 |", "BERT", "max |Δlogits|", *lines):
            assert line in card, (run.name, line)
