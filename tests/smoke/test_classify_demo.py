"""The README's classification demo on tiny stand-ins, and exact resume of `lmforge finetune`.

A tiny Hugging Face "BertModel" folder (random weights, a lowercasing WordPiece tokenizer.json
that adds [CLS]/[SEP] itself and pads every text to a fixed length, as all-MiniLM-L6-v2's does)
stands in for the real model: fine-tuned with --task classify straight from the folder, scored
before and after on a test file, then loaded with ``lmforge.load(run).classify``. An
interrupted fine-tune resumed with --resume ends bit-identical to one never stopped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import lmforge
from lmforge import cli
from lmforge.checkpoint import TrainState, load_model_weights, save_checkpoint
from lmforge.config import UserError, from_dict, load_yaml
from lmforge.data.classify import classify_ids, encoder_tokenizer
from lmforge.models.encoder import EncoderConfig, EncoderForClassification
from lmforge.recipes.runs import run_status
from lmforge.train import finetune
from tests.smoke.helpers import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GOOD, BAD = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "module", "with", "a", "list", "of", "values", "and", "function"]
HF_PAD_TO = 24  # the tokenizer.json pads every text to this many tokens, as MiniLM's pads to 128


def _rows(n: int, seed: int) -> list[dict]:
    """{text, label} rows in mixed case: only the sentiment word decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(GOOD if i % 2 else BAD)
        words = [*rng.sample(FILLER, 4), word.upper() if i % 3 == 0 else word.title(),
                 *rng.sample(FILLER, 3)]
        rows.append({"text": " ".join(words).capitalize(), "label": "pos" if i % 2 else "neg"})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _wordpiece() -> Tokenizer:
    vocab = {t: i for i, t in enumerate([*SPECIALS, *sorted({*GOOD, *BAD, *FILLER}), "##s"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIALS)
    tok.enable_padding(length=HF_PAD_TO, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(HF_PAD_TO)
    return tok


@pytest.fixture(scope="module")
def demo(workdir: Path) -> Path:
    """A tiny BertModel folder (hf-bert/) and train/val/test files of sentiment rows."""
    folder = workdir / "hf-bert"
    folder.mkdir(exist_ok=True)
    tok = _wordpiece()
    tok.save(str(folder / "tokenizer.json"))
    cfg = EncoderConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=2, n_head=2,
                        n_embd=32, intermediate_size=64)
    body = EncoderForClassification(cfg)
    body.init_weights(torch.Generator().manual_seed(0))
    save_file({k.removeprefix("bert."): v.contiguous() for k, v in body.state_dict().items()
               if k.startswith("bert.")}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}))
    for name, (n, seed) in {"train": (96, 0), "val": (24, 1), "test": (24, 2)}.items():
        _write_jsonl(workdir / f"cls-{name}.jsonl", _rows(n, seed))
    return workdir


CLS_ARGS = ["finetune", "--task", "classify", "--run", "hf-bert", "--data", "cls-train.jsonl",
            "--val_data", "cls-val.jsonl", "--method", "full", "--max_len", "16",
            "--train.batch_size", "8", "--optim.lr", "3e-3", "--optim.warmup_steps", "4",
            "--train.threads", "1"]


def test_hf_tokenizer_encodes_one_text_as_is(demo: Path) -> None:
    tok = encoder_tokenizer(demo / "hf-bert" / "tokenizer.json")
    ids = classify_ids(tok, "GOOD Module", 16)
    assert [tok.id_to_token(i) for i in ids] == ["[CLS]", "good", "module", "[SEP]"]  # no pads
    long = classify_ids(tok, " ".join(["nice"] * 40), 16)
    assert len(long) == 16 and tok.id_to_token(long[-1]) == "[SEP]"


def test_classify_from_a_hf_folder_scores_test_before_and_after(
        demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo)
    assert cli.run([*CLS_ARGS, "--test_data", "cls-test.jsonl", "--out", "hf-cls",
                    "--train.max_steps", "40", "--train.eval_every", "20", "--overwrite"]) == 0
    run = demo / "runs" / "hf-cls"
    s = json.loads((run / "summary.json").read_text())
    assert (s["labels"], s["train_examples"], s["val_examples"], s["test_examples"]) == (
        ["neg", "pos"], 96, 24, 24)
    for key in ("accuracy", "macro_f1", "loss"):
        assert f"test_{key}_before" in s and f"test_{key}" in s and f"val_{key}" in s
    assert s["test_accuracy"] >= 0.9 and s["test_macro_f1"] >= 0.9  # measured 1.0 (0.5 before)
    # the base's tokenizer files travel with the run, unchanged (for `lmforge export`)
    assert (run / "tokenizer.json").read_bytes() == (demo / "hf-bert/tokenizer.json").read_bytes()
    assert load_yaml(run / "config.yaml")["max_len"] == 16


def test_lora_targets_of_a_decoder_are_refused_on_an_encoder(
        demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo)
    args = [a for a in CLS_ARGS if a not in ("--method", "full")]  # the default: lora on q_proj...
    with pytest.raises(UserError, match="query,key,value,dense"):
        cli.run([*args, "--out", "hf-cls-never"])
    assert not (demo / "runs" / "hf-cls-never").exists()


def test_load_classify_matches_the_models_own_logits(demo: Path) -> None:
    run = demo / "runs" / "hf-cls"
    if not (run / "summary.json").exists():
        pytest.skip("needs the run of the test above")
    clf = lmforge.load(run)
    texts = [r["text"] for r in _rows(24, 2)]
    out = clf.classify(texts)
    # Directly: the model from config.yaml + checkpoint, fed the HF tokenizer's own encoding
    # ([CLS]/[SEP] added by its post-processor, padded to a fixed length, attention mask).
    saved = load_yaml(run / "config.yaml")
    model = EncoderForClassification(from_dict(EncoderConfig, saved["encoder"], "encoder"))
    load_model_weights(run, model)
    model.eval()
    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    encs = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encs])  # (B, HF_PAD_TO)
    mask = torch.tensor([e.attention_mask for e in encs])
    with torch.no_grad():
        logits = model(ids, mask)  # (B, 2)
    probs = logits.softmax(-1)
    assert [o["label"] for o in out] == [saved["labels"][i] for i in logits.argmax(-1).tolist()]
    for o, p in zip(out, probs.tolist()):
        assert abs(sum(o["probs"].values()) - 1) < 1e-6
        assert list(o["probs"]) == ["neg", "pos"]
        assert max(abs(a - b) for a, b in zip(o["probs"].values(), p)) < 1e-5
        assert o["score"] == max(o["probs"].values())
    one = clf.classify(texts[0])
    assert isinstance(one, dict) and one["label"] == out[0]["label"]
    with pytest.raises(UserError, match="does not generate"):
        clf.generate("hi")


def test_eval_scores_a_classifier_run(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = demo / "runs" / "hf-cls"
    if not (run / "summary.json").exists():
        pytest.skip("needs the run of the test above")
    monkeypatch.chdir(demo)
    assert cli.run(["eval", "--run", "runs/hf-cls", "--data", "cls-test.jsonl"]) == 0
    got = json.loads((run / "eval_cls-test.json").read_text())
    rows = _rows(24, 2)
    preds = [o["label"] for o in lmforge.load(run).classify([r["text"] for r in rows])]
    accuracy = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    summary = json.loads((run / "summary.json").read_text())
    assert got["examples"] == 24
    assert got["accuracy"] == pytest.approx(accuracy) == pytest.approx(summary["test_accuracy"])
    assert got["macro_f1"] == pytest.approx(summary["test_macro_f1"])
    _write_jsonl(demo / "cls-odd.jsonl", [{"text": "fine", "label": "meh"},
                                          {"text": "good", "label": "pos"}])
    with pytest.raises(UserError, match="label 'meh' is not one the classifier was trained on"):
        cli.run(["eval", "--run", "runs/hf-cls", "--data", "cls-odd.jsonl"])


# --------------------------------------------------------------------------- exact resume


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    step = (run_dir / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / step / "model.safetensors")


def _interrupted_then_resumed(args: list[str], name: str,
                              monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run ``args`` as ``name``, stopped by a Ctrl-C just after the step-3 save; then resume."""
    real = finetune.save_checkpoint

    def save_then_stop(run_dir, state, *a, **kw):  # type: ignore[no-untyped-def]
        out = real(run_dir, state, *a, **kw)
        if state.step == 3:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(finetune, "save_checkpoint", save_then_stop)
    with pytest.raises(UserError, match="--resume"):
        cli.run([*args, "--out", name, "--overwrite"])
    monkeypatch.setattr(finetune, "save_checkpoint", real)
    run = Path("runs") / name
    assert (run / "latest").read_text().strip() == "step_00000003"
    assert not (run / "summary.json").exists()
    os.utime(run / "metrics.jsonl", (0, 0))  # as if stopped long ago
    assert run_status(run)["status"] == "stopped (resumable)"
    assert cli.run([*args, "--out", name, "--resume"]) == 0
    return run


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


RESUME = ["--train.max_steps", "6", "--train.save_every", "3", "--train.eval_every", "3"]


def test_classify_resume_is_bit_identical(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo)
    args = [*CLS_ARGS, "--test_data", "cls-test.jsonl", *RESUME]
    assert cli.run([*args, "--out", "cls-straight", "--overwrite"]) == 0
    run = _interrupted_then_resumed(args, "cls-broken", monkeypatch)
    _assert_same(_final(demo / "runs" / "cls-straight"), _final(run))
    a, b = (json.loads((demo / "runs" / r / "summary.json").read_text())
            for r in ("cls-straight", "cls-broken"))
    assert a["test_accuracy_before"] == b["test_accuracy_before"]  # kept in the checkpoint
    assert a["test_accuracy"] == b["test_accuracy"] and a["steps"] == b["steps"] == 6
    with pytest.raises(UserError, match="optim.lr"):
        cli.run([*args, "--out", "cls-broken", "--resume", "--optim.lr", "1e-3"])


@pytest.fixture(scope="module")
def chat_base(workdir: Path) -> Path:
    """A tiny decoder base (context 128) and prompt/completion rows."""
    _write_jsonl(workdir / "resume-sft.jsonl", [{"prompt": f"add {a} and {b}",
                                                 "completion": f"{a + b}"}
                                                for a in range(6) for b in range(4)])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert cli.run(["pretrain", "--data", "prepared", "--run", "resume-base", *TINY_MODEL,
                        "--model.block_size", "128", "--train.max_steps", "2",
                        "--train.batch_size", "2", "--train.threads", "1",
                        "--train.eval_tokens", "512", "--sample_tokens", "0",
                        "--overwrite"]) == 0
    return workdir


@pytest.mark.parametrize("method", ["full", "lora"])
def test_chat_resume_is_bit_identical(chat_base: Path, method: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(chat_base)
    # LoRA dropout draws from the global RNG: its state must come back with the checkpoint.
    args = ["finetune", "--run", "runs/resume-base", "--data", "resume-sft.jsonl", "--method",
            method, "--lora.dropout", "0.1", "--train.batch_size", "4", "--train.threads", "1",
            "--optim.lr", "1e-3", "--optim.warmup_steps", "1", *RESUME]
    straight = chat_base / "runs" / f"chat-{method}-straight"
    assert cli.run([*args, "--out", straight.name, "--overwrite"]) == 0
    run = _interrupted_then_resumed(args, f"chat-{method}-broken", monkeypatch)
    _assert_same(_final(straight), _final(run))
    if method == "lora":
        _assert_same(load_file(straight / "adapter.safetensors"),
                     load_file(run / "adapter.safetensors"))


def test_weights_only_runs_are_not_called_resumable(tmp_path: Path) -> None:
    run = tmp_path / "imported"
    run.mkdir()
    (run / "config.yaml").write_text("task: classify\n")
    save_checkpoint(run, TrainState(), torch.nn.Linear(2, 2), None)
    assert run_status(run)["status"] == "weights only"


# --------------------------------------------------------------------------- the data script


def _vader_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("vader_sentiment",
                                                  ROOT / "examples" / "vader_sentiment.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vader_rows_labels_and_split() -> None:
    vader = _vader_script()
    text = ("1\t2.5\tA gem, by Almodóvar.\r\n2\t-0.3\tMeh.\r\n3\t-1.75\tDull &amp; long.\r\n"
            "4\t0.6\tA gem, by Almodóvar.\r\n5\t-0.5\tNot good.\r\n6\t0.5\tFine.")
    rows = vader.labeled_rows(text)
    assert rows == [{"text": "A gem, by Almodóvar.", "label": "positive"},  # dup 4 dropped
                    {"text": "Dull & long.", "label": "negative"},  # |-0.3| < 0.5 dropped
                    {"text": "Not good.", "label": "negative"},
                    {"text": "Fine.", "label": "positive"}]
    many = [{"text": str(i), "label": "positive"} for i in range(100)]
    parts = vader.split(many, 0, (0.1, 0.1))
    assert [len(parts[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert sorted(r["text"] for p in parts.values() for r in p) == sorted(r["text"] for r in many)
    assert parts == vader.split(many, 0, (0.1, 0.1))  # the seed fixes the split
