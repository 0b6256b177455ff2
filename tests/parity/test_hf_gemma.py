"""Parity with transformers for Gemma 2 and Gemma 3 (text), the decoder with Gemma's fields set.

Each: a tiny random Gemma2ForCausalLM / Gemma3ForCausalLM built from transformers' own config
classes, saved, imported with `lmforge import`, compared on 40 tokens with a sliding window of
8 (logits <= 1e-4, then step by step through our static KV cache at explicit positions, then
20 greedy tokens), exported with `lmforge export` and loaded back into transformers with no
missing or unexpected keys and the same tensors and logits. Gemma 2 has both soft caps and
alternating local/global layers; Gemma 3 has q/k norms, 5 local : 1 global layers with their
own RoPE base, and linear RoPE scaling on the global ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import run  # noqa: E402
from lmforge.config import UserError  # noqa: E402
from lmforge.models.decoder import Decoder  # noqa: E402
from lmforge.run import load_model  # noqa: E402
from tests.parity.test_hf_decoder import (  # noqa: E402
    TOL,
    V,
    greedy_pair,
    ids,
    max_diff,
    one_line_error,
    randomize,
    write_tokenizer,
)

WINDOW = 8  # the local layers' window, well under the 40-token and 32-token sequences
FAMILIES = ["gemma2", "gemma3"]
ARCH = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
            sliding_window=WINDOW, query_pre_attn_scalar=20, bos_token_id=2, eos_token_id=1,
            pad_token_id=0)


def hf_model(family: str, **over: Any) -> Any:
    """A tiny random Gemma: head_dim 24 (not 64/4), GQA, tied head as every Gemma; ``over``
    changes BASE."""
    t = transformers
    torch.manual_seed(0)
    base = {**BASE, **over}
    if family == "gemma2":  # layers 0 and 2 slide; both soft caps small enough to bite
        config = t.Gemma2Config(**base, num_hidden_layers=4, attn_logit_softcapping=5.0,
                                final_logit_softcapping=10.0)
        return randomize(t.Gemma2ForCausalLM(config))
    # Gemma 3 4B+'s RoPE: global base 1e6 stretched linearly by 8, local base 1e4; layers
    # 0-4 slide, layer 5 is global (sliding_window_pattern 6).
    config = t.Gemma3TextConfig(**base, num_hidden_layers=6,
                                rope_scaling={"rope_type": "linear", "factor": 8.0})
    return randomize(t.Gemma3ForCausalLM(config))


@dataclass
class Case:
    family: str
    hf: Any
    run: Path
    model: Decoder


@pytest.fixture(scope="module", params=FAMILIES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = hf_model(family)
    model.save_pretrained(root / "hf")
    write_tokenizer(family, root / "hf")
    assert run(["import", str(root / "hf"), "--out", str(root / "run")]) == 0
    return Case(family, model, root / "run", load_model(root / "run").model)


def test_import_maps_gemma_to_fields(case: Case) -> None:
    cfg = case.model.cfg
    assert (cfg.norm, cfg.mlp, cfg.embed_scale, cfg.sandwich_norm) == ("rmsnorm1p", "geglu",
                                                                        True, True)
    assert cfg.head_dim == 24 and cfg.kv_heads == 2 and cfg.tie_embeddings
    assert cfg.query_pre_attn_scalar == 20 and cfg.sliding_window == WINDOW
    if case.family == "gemma2":
        assert cfg.local_layers == [0, 2] and not cfg.qk_norm
        assert (cfg.attn_softcap, cfg.logit_softcap, cfg.rope_local_theta) == (5.0, 10.0, None)
    else:
        assert cfg.local_layers == [0, 1, 2, 3, 4] and cfg.qk_norm
        assert (cfg.attn_softcap, cfg.logit_softcap) == (None, None)
        assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
        assert (cfg.rope_scaling.type, cfg.rope_scaling.factor) == ("linear", 8.0)


def test_logits_and_greedy_tokens_match_transformers(case: Case) -> None:
    diff = max_diff(case.model, case.hf, ids(40))
    print(f"{case.family}: max |Δlogits| = {diff:.2e}")
    assert diff <= TOL
    mine, theirs = greedy_pair(case.model, case.hf)  # 12 + 20 tokens: past the window
    assert len(mine) == 20 and mine == theirs


def test_static_cache_decode_matches_transformers_step_by_step(case: Case) -> None:
    """Prefill 12 tokens at input_pos 0..11 (last position only), then one token per step at
    input_pos p up to 39: every step's logits are transformers' full-forward logits there."""
    x = ids(40)
    with torch.no_grad():
        ref = case.hf(x).logits  # (2, 40, V)
        cache = case.model.new_cache(batch=2, max_len=40)
        first = case.model(x[:, :12], cache, input_pos=torch.arange(12), last=True)
        steps = [case.model(x[:, p:p + 1], cache, input_pos=torch.tensor([p]))
                 for p in range(12, 40)]
    assert (first - ref[:, 11:12]).abs().max().item() <= TOL
    assert (torch.cat(steps, dim=1) - ref[:, 12:]).abs().max().item() <= TOL


CHANGES = {"norm": "rmsnorm", "mlp": "swiglu", "embed_scale": False, "sandwich_norm": False,
           "query_pre_attn_scalar": None, "logit_softcap": None, "local_layers": None}


@pytest.mark.parametrize("field", [*CHANGES, "attn_softcap", "rope_local_theta"])
def test_every_gemma_field_matters(case: Case, field: str) -> None:
    """Undo one field, keep the weights: the logits move far from transformers'."""
    value = CHANGES.get(field)
    if getattr(case.model.cfg, field) == value:
        pytest.skip(f"{case.family} does not set {field}")
    changed = Decoder(dataclasses.replace(case.model.cfg, **{field: value})).eval()
    changed.load_state_dict(case.model.state_dict(), strict=field != "sandwich_norm")
    assert max_diff(changed, case.hf, ids(40)) > 100 * TOL


def test_export_loads_cleanly_in_transformers_and_matches(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert run(["export", "--run", str(case.run), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == [ARCH[case.family]]
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert type(theirs).__name__ == ARCH[case.family]
    local = case.model.cfg.local_layers
    assert local is not None
    card_row = f"| sliding window | {WINDOW} on {len(local)} of {case.model.cfg.n_layer} layers |"
    assert card_row in (out / "README.md").read_text()
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "rope_parameters",
                "final_logit_softcapping"):
        assert getattr(theirs.config, key) == getattr(case.hf.config, key), key
    if case.family == "gemma2":
        assert theirs.config.attn_logit_softcapping == case.hf.config.attn_logit_softcapping
    ref = case.hf.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in theirs.state_dict().items())
    fresh = load_model(case.run).model  # the export's check rounded the run's model in place
    diff = max_diff(fresh, theirs.eval(), ids(40, seed=3))
    print(f"{case.family} export: max |Δlogits| = {diff:.2e}")
    assert diff <= TOL
    mine, hf_tokens = greedy_pair(fresh, theirs)
    assert mine == hf_tokens


# --------------------------------------------------------------------------- refusals


def test_multimodal_gemma3_is_refused_in_one_line(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    config = transformers.Gemma3Config(text_config=dict(BASE, num_hidden_layers=1),
                                       vision_config=dict(hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2,
                                                          intermediate_size=64))
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(src)
    message = one_line_error(["import", str(src), "--out", str(tmp_path / "run")])
    assert "only the text model" in message and "Gemma3ForCausalLM" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["gemma2"], indirect=True)
def test_gguf_export_of_a_gemma_llama_cpp_cannot_scale_is_refused_in_one_line(
        case: Case, tmp_path: Path) -> None:
    """query_pre_attn_scalar 20 with head_dim 24: llama.cpp's gemma2 has no key for it."""
    message = one_line_error(["export", "--run", str(case.run), "--format", "gguf", "--out",
                              str(tmp_path / "g")])
    assert message.startswith("model.query_pre_attn_scalar: ") and "--format hf" in message
    assert not (tmp_path / "g").exists()


def test_a_gemma_mix_that_no_architecture_computes_is_refused() -> None:
    from lmforge.interop.hf import export_architecture

    g3 = hf_model("gemma3").config
    from lmforge.interop.hf import decoder_config_from_hf

    cfg, _ = decoder_config_from_hf(g3.to_dict() | {"architectures": ["Gemma3ForCausalLM"]},
                                    "config.json")
    with pytest.raises(UserError, match="model.attn_softcap"):
        export_architecture(dataclasses.replace(cfg, attn_softcap=50.0))
    with pytest.raises(UserError, match="model.rope_local_theta"):
        export_architecture(dataclasses.replace(cfg, qk_norm=False))
    with pytest.raises(UserError, match="model.mlp"):
        export_architecture(dataclasses.replace(cfg, mlp="swiglu"))
    with pytest.raises(UserError, match="model.logit_softcap"):
        export_architecture(dataclasses.replace(cfg, norm="rmsnorm", mlp="swiglu",
                                                embed_scale=False, sandwich_norm=False,
                                                local_layers=None, query_pre_attn_scalar=None,
                                                rope_local_theta=None, logit_softcap=3.0))


# --------------------------------------------------------------------------- tokenizer, chat

# Gemma's chat turns (its template without the system-role branch): "model" for the assistant.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def gemma_like_tokenizer() -> Any:
    """A SentencePiece-style BPE as Gemma's tokenizer.json is (▁ for spaces, byte fallback),
    with Gemma's special ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, turn markers 4 and 5."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator(["what is the capital of france", "paris is the capital"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    return tok


def test_gemma_tokenizer_end_of_turn_and_chat_template(tmp_path: Path) -> None:
    """An instruct Gemma folder: its tokenizer encodes as before, <end_of_turn> is a stop id
    (generation_config's list), and our template renderer writes what transformers' does."""
    from lmforge.infer.chat import load_chat_template

    tok = gemma_like_tokenizer()
    t = transformers
    torch.manual_seed(0)
    hf = t.Gemma3ForCausalLM(t.Gemma3TextConfig(**{**BASE, "vocab_size": tok.get_vocab_size()},
                                                num_hidden_layers=2))
    hf.generation_config.eos_token_id = [1, 5]  # <eos>, <end_of_turn>, as gemma-3-*-it
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
         "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True}))
    (src / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    assert run(["import", str(src), "--out", str(tmp_path / "run")]) == 0
    loaded = load_model(tmp_path / "run")
    assert loaded.eos_ids == [1, 5] and loaded.bos_id == 2
    text = "what is the capital of  café?"
    assert loaded.tokenizer.encode(text).ids == tok.encode(text).ids
    assert "<0xC3>" in tok.encode(text).tokens  # é went through the byte fallback
    template = load_chat_template(tmp_path / "run")
    assert template.stop == ("<end_of_turn>",)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "paris"},
                {"role": "user", "content": "what is the capital?"}]
    out = tmp_path / "export"
    assert run(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 5]
    theirs = t.AutoTokenizer.from_pretrained(out)
    want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert template.render(messages) == want
    assert want.startswith("<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert theirs(text, add_special_tokens=False).input_ids == tok.encode(text).ids


# --------------------------------------------------------------------------- config.json forms

V4_GEMMA3 = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
             "vocab_size": V, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 1,
             "head_dim": 32, "max_position_embeddings": 256, "sliding_window": 16,
             "sliding_window_pattern": 4, "rope_theta": 1000000.0,
             "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear",
                                                               "factor": 8.0},
             "query_pre_attn_scalar": 32, "final_logit_softcapping": None,
             "attn_logit_softcapping": None}
V4_GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": V,
             "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 5,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "rope_theta": 10000.0, "sliding_window": 16, "query_pre_attn_scalar": 16}


@pytest.mark.parametrize("hf", [V4_GEMMA2, V4_GEMMA3], ids=["gemma2", "gemma3"])
def test_v4_config_json_reads_as_transformers_reads_it(hf: dict[str, Any]) -> None:
    """Configs saved before transformers v5 (no layer_types; Gemma 3's rope_local_base_freq,
    sliding_window_pattern and rope_scaling for the global layers only): our fields are what
    transformers' own config class makes of the same dict."""
    from lmforge.interop.hf import decoder_config_from_hf

    cfg, _ = decoder_config_from_hf(hf, "config.json")
    gemma3 = hf["model_type"] == "gemma3_text"
    theirs = (transformers.Gemma3TextConfig if gemma3 else transformers.Gemma2Config)(
        **{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    local = [i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention"]
    assert cfg.local_layers == local and cfg.sliding_window == theirs.sliding_window
    rope = theirs.rope_parameters
    if gemma3:
        assert cfg.rope_theta == rope["full_attention"]["rope_theta"]
        assert cfg.rope_local_theta == rope["sliding_attention"]["rope_theta"]
        assert (cfg.rope_scaling.type, cfg.rope_scaling.factor) == (
            rope["full_attention"]["rope_type"], rope["full_attention"]["factor"])
        assert rope["sliding_attention"]["rope_type"] == "default"
    else:
        assert (cfg.rope_theta, cfg.rope_scaling.type) == (rope["rope_theta"], "none")
        assert (cfg.attn_softcap, cfg.logit_softcap) == (theirs.attn_logit_softcapping,
                                                         theirs.final_logit_softcapping)
    assert cfg.kv_heads == theirs.num_key_value_heads and cfg.block_size == \
        theirs.max_position_embeddings


@pytest.mark.parametrize("change, words", [
    ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "sliding_attention has rope_type linear"),
])
def test_unsupported_gemma_configs_are_one_line_errors(change: dict[str, Any],
                                                       words: str) -> None:
    from lmforge.interop.hf import decoder_config_from_hf

    with pytest.raises(UserError, match=words) as err:
        decoder_config_from_hf({**V4_GEMMA3, **change}, "config.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("config.json: ")
