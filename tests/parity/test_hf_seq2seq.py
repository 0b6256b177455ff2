"""Parity with transformers for the encoder-decoder: MarianMTModel and Pegasus, both ways.

A tiny random transformers model (post-norm Marian with shared or separate embeddings, pre-norm
Pegasus) is saved, imported with `lmforge import`, compared teacher-forced on a padded batch and
in greedy generation, exported with `lmforge export` and loaded back into transformers with no
missing or unexpected keys: the same tensors it started from. Configs our Transformer cannot
compute are refused in one line. (A run trained by lmforge is exported in
tests/smoke/test_families.py.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import main, run  # noqa: E402
from lmforge.config import UserError, load_yaml  # noqa: E402
from lmforge.infer.seq2seq_generate import encode_sources, generate_seq2seq  # noqa: E402
from lmforge.interop import marian  # noqa: E402
from lmforge.models.seq2seq import Seq2SeqConfig  # noqa: E402
from lmforge.run import load_run  # noqa: E402

V = 48
EOS, PAD, BOS = 0, 1, 2
WORDS = ["<|endoftext|>", "[PAD]", "[BOS]", "[UNK]", *(f"w{i}" for i in range(V - 4))]
TOL = 1e-4
# name -> (transformers class, extra config): post-norm with one shared matrix, post-norm with
# three separate ones (and swish), pre-norm (Pegasus, which always shares).
KINDS = {
    "marian": ("MarianMTModel", {"activation_function": "relu"}),
    "marian-untied": ("MarianMTModel", {"activation_function": "swish",
                                        "share_encoder_decoder_embeddings": False,
                                        "tie_word_embeddings": False}),
    "pegasus": ("PegasusForConditionalGeneration", {"activation_function": "gelu"}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_model(kind: str) -> Any:
    """A tiny random model with large weights (sharp attention) and non-trivial norms/biases."""
    arch, extra = KINDS[kind]
    config_cls = transformers.MarianConfig if arch == "MarianMTModel" else \
        transformers.PegasusConfig
    config = config_cls(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=40, scale_embedding=True, dropout=0.0, pad_token_id=PAD,
        eos_token_id=EOS, decoder_start_token_id=BOS, forced_eos_token_id=None, **extra)
    model = getattr(transformers, arch)(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue  # the fixed sine table
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
    tok.add_special_tokens(WORDS[:4])
    tok.save(str(folder / "tokenizer.json"))


def sources() -> list[list[int]]:
    """Three sources of different lengths (so the batch pads), each ending in EOS."""
    g = torch.Generator().manual_seed(1)
    return [[*torch.randint(4, V, (n,), generator=g).tolist(), EOS] for n in (11, 6, 3)]


def max_diff(ours: torch.nn.Module, theirs: Any) -> float:
    src, mask = encode_sources(sources(), PAD)
    tgt = torch.randint(4, V, (3, 9), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = BOS
    with torch.no_grad():
        mine = ours(src, tgt, mask)
        ref = theirs(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    return (mine - ref).abs().max().item()


def their_greedy(theirs: Any, n: int) -> list[list[int]]:
    """transformers' greedy generation, each row cut before its first EOS."""
    src, mask = encode_sources(sources(), PAD)
    out = theirs.generate(input_ids=src, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          num_beams=1)
    rows = [r[1:].tolist() for r in out]  # drop the decoder start token
    return [r[: r.index(EOS)] if EOS in r else r for r in rows]


@dataclass
class Case:
    kind: str
    hf: Any
    src: Path
    run: Path


@pytest.fixture(scope="module", params=list(KINDS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model = hf_model(kind)
    model.save_pretrained(root / "hf")
    write_tokenizer(root / "hf")
    assert run(["import", str(root / "hf"), "--out", str(root / "run")]) == 0
    return Case(kind, model, root / "hf", root / "run")


def test_import_writes_a_seq2seq_run(case: Case) -> None:
    saved = load_yaml(case.run / "config.yaml")
    assert saved["objective"] == "seq2seq" and saved["architecture"] == KINDS[case.kind][0]
    s2s = saved["seq2seq"]
    assert s2s["norm"] == ("pre" if case.kind == "pegasus" else "post")
    assert s2s["tie_embeddings"] is (case.kind != "marian-untied")
    assert s2s["activation"] == {"marian": "relu", "marian-untied": "silu", "pegasus": "gelu"}[
        case.kind]
    assert (saved["bos_id"], saved["eos_id"], saved["pad_id"]) == (BOS, EOS, PAD)
    loaded = load_run(case.run)
    assert loaded.kind == "seq2seq" and loaded.spec.eos_id == EOS and loaded.spec.bos_id == BOS


def test_imported_logits_and_greedy_tokens_match_transformers(case: Case) -> None:
    model = load_run(case.run).model
    diff = max_diff(model, case.hf)
    print(f"import {case.kind}: max |Δlogits| = {diff:.2e}")
    assert diff <= TOL
    ours = generate_seq2seq(model, sources(), 12, BOS, EOS, PAD)
    assert ours == their_greedy(case.hf, 12)
    assert any(len(r) > 1 for r in ours)  # something was generated, not just an EOS


def test_export_loads_cleanly_and_holds_the_same_tensors(case: Case, tmp_path: Path,
                                                         capsys: Any) -> None:
    out = tmp_path / "hf"
    assert run(["export", "--run", str(case.run), "--format", "hf", "--out", str(out)]) == 0
    assert "load-back check" in capsys.readouterr().out
    theirs, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert type(theirs).__name__ == KINDS[case.kind][0]
    ref = dict(case.hf.state_dict())
    assert set(theirs.state_dict()) == set(ref)
    for key, t in theirs.state_dict().items():
        assert torch.equal(t, ref[key]), key
    diff = max_diff(load_run(case.run).model, theirs.eval())
    print(f"export {case.kind}: max |Δlogits| = {diff:.2e}")
    assert diff <= TOL
    config = json.loads((out / "config.json").read_text())
    assert (config["decoder_start_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        BOS, EOS, PAD)
    # The tokenizer appends EOS, as training does to each source, and pads with [PAD].
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("w3 w7").input_ids == [WORDS.index("w3"), WORDS.index("w7"), EOS]
    assert tok.pad_token_id == PAD and tok.eos_token_id == EOS


@pytest.mark.parametrize("layout", ["shared-source-target-own-head", "every-copy-stored"])
def test_other_embedding_layouts_import_to_the_same_numbers(layout: str, tmp_path: Path) -> None:
    """Marian with source and target shared but its own output head (read as three separate
    matrices), and a tied file that stores every copy, as older exports did (copies ignored as
    transformers ignores them)."""
    from safetensors.torch import save_file

    if layout == "every-copy-stored":
        model = hf_model("marian")
        model.save_pretrained(tmp_path)
        tensors = {k: t.detach().clone().contiguous() for k, t in model.state_dict().items()
                   if "embed_positions" not in k}
        save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    else:
        config = {**_base(), "tie_word_embeddings": False}
        model = transformers.MarianMTModel(transformers.MarianConfig.from_dict(config))
        model.load_state_dict(hf_model("marian").state_dict(), strict=False)
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
        model.eval().save_pretrained(tmp_path)
    ours, _ = marian.load_hf_seq2seq(tmp_path)
    assert ours.cfg.tie_embeddings is (layout == "every-copy-stored")
    assert max_diff(ours, model) <= TOL


# --------------------------------------------------------------------------- refusals


def _base() -> dict[str, Any]:
    return {**hf_model("marian").config.to_dict(), "architectures": ["MarianMTModel"]}


@pytest.mark.parametrize(("change", "needle"), [
    ({"activation_function": "gelu_new"}, "activation_function='gelu_new'"),
    ({"scale_embedding": False}, "scale_embedding=False"),
    ({"decoder_vocab_size": V + 8}, "decoder_vocab_size"),
    ({"normalize_before": True}, "normalize_before=True"),
    ({"static_position_embeddings": False}, "learned positions"),
    ({"decoder_ffn_dim": 64}, "encoder/decoder_ffn_dim"),
    ({"architectures": ["BartForConditionalGeneration"]}, "MarianMTModel, Pegasus"),
])
def test_configs_that_do_not_map_are_refused_in_one_line(change: dict[str, Any],
                                                         needle: str) -> None:
    with pytest.raises(UserError) as err:
        marian.seq2seq_config_from_hf({**_base(), **change}, "x/config.json")
    message = str(err.value)
    assert "\n" not in message and message.startswith("x/config.json: ") and needle in message


def test_import_refuses_an_output_bias_in_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = hf_model("marian")
    model.final_logits_bias.fill_(0.5)
    model.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the CLI as a user meets it: exit 2, one line
        main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "final_logits_bias is not zero" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


def test_what_neither_class_computes_is_refused_on_export() -> None:
    cfg = Seq2SeqConfig(vocab_size=V, n_embd=32, norm="pre", tie_embeddings=False)
    with pytest.raises(UserError, match="seq2seq.tie_embeddings: .*Pegasus"):
        marian.export_architecture(cfg)
    with pytest.raises(UserError, match="seq2seq.norm_eps: .*1e-05, this model uses 1e-06"):
        marian.export_architecture(Seq2SeqConfig(norm_eps=1e-6))
    assert marian.export_architecture(Seq2SeqConfig(norm="pre")) == \
        "PegasusForConditionalGeneration"
    assert marian.export_architecture(Seq2SeqConfig(tie_embeddings=False)) == "MarianMTModel"


def test_a_bfloat16_export_holds_our_weights_rounded(case: Case, tmp_path: Path) -> None:
    """--dtype bfloat16: every tensor is the original rounded once; transformers and lmforge
    computing in bf16 on CPU from it agree to bf16 precision."""
    if case.kind != "marian":
        pytest.skip("one layout is enough: the dtype path is shared")
    out = tmp_path / "bf16"
    assert run(["export", "--run", str(case.run), "--dtype", "bfloat16", "--out", str(out)]) == 0
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(out), dtype=torch.bfloat16)
    ref = dict(case.hf.state_dict())
    for key, t in theirs.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[key].to(torch.bfloat16)), key
    ours = load_run(case.run, dtype="bf16").model
    diff = max_diff(ours, theirs.eval())
    print(f"bf16 marian: max |Δlogits| = {diff:.2e}")
    assert diff <= 0.1  # the two compute in bf16 in different orders: bf16's 2^-8 of |logits|


def test_an_export_beyond_the_tolerance_leaves_nothing(case: Case, tmp_path: Path) -> None:
    if case.kind != "marian":
        pytest.skip("one layout is enough: the check path is shared")
    out = tmp_path / "strict"
    with pytest.raises(UserError, match=r"differ from lmforge's by .* nothing was written"):
        run(["export", "--run", str(case.run), "--tolerance", "1e-12", "--out", str(out)])
    assert not out.exists() and not list(tmp_path.iterdir())
