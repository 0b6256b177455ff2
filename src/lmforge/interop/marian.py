"""Encoder-decoder runs as Hugging Face folders, both ways: MarianMTModel and Pegasus.

``models/seq2seq.py`` is the original Transformer, and two transformers classes compute it:

===================================  =========================================================
MarianMTModel                        post-norm (the paper's layout); shared or separate source,
                                     target and output matrices
PegasusForConditionalGeneration      pre-norm with a final LayerNorm per stack; one shared
                                     matrix (Pegasus always shares source and target)
===================================  =========================================================

Both scale embeddings by sqrt(d_model), add the same fixed sine table (sines in the first
half, cosines in the second, positions from 0) and use LayerNorm with eps 1e-5, so a state
dict maps by prefixing ``model.`` (``lm_head.weight`` stays). ``final_logits_bias`` is written
as zeros, and read only when it is zeros (our head has no bias). A pre-norm model with separate
embeddings has no transformers class and is refused in one line.

Special ids as our training uses them: the decoder starts from [BOS]
(``decoder_start_token_id``), ends at <|endoftext|> (``eos_token_id``) and pads with [PAD].
The exported tokenizer appends the EOS to every text, as training appends it to each source,
so ``tokenizer(text)`` gives the ids the encoder was trained on.

transformers is imported only inside ``load_back_check``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.interop.hf import (
    CONFIG_FILE,
    GENERATION_FILE,
    TOKENIZER_FILE,
    SafetensorsFolder,
    load_exported,
    read_json,
    save_weights,
)
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig, sinusoid_table

# architecture -> (model_type, the norm layout it computes)
SEQ2SEQ_ARCHITECTURES = {"MarianMTModel": ("marian", "post"),
                         "PegasusForConditionalGeneration": ("pegasus", "pre")}
# transformers' activation names -> ours (ACT2FN: "gelu" is the exact erf GELU, "swish" = SiLU).
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu"}
_BIAS = "final_logits_bias"
_EPS = 1e-5  # nn.LayerNorm's default, which both classes use (no config field)
_POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")


@dataclass(frozen=True)
class Seq2SeqIds:
    """The special ids of an encoder-decoder: padding, the decoder's first token, the end."""

    pad: int
    start: int
    eos: int


def seq2seq_architecture(hf: dict[str, Any]) -> str | None:
    """The encoder-decoder architecture a config.json names, or None (not one of ours)."""
    archs = hf.get("architectures") or []
    return archs[0] if len(archs) == 1 and archs[0] in SEQ2SEQ_ARCHITECTURES else None


def export_architecture(cfg: Seq2SeqConfig) -> str:
    """The transformers class that computes what ``cfg`` does, or a one-line UserError."""
    if cfg.norm_eps != _EPS:
        raise UserError(f"seq2seq.norm_eps: Marian and Pegasus fix the LayerNorm epsilon at "
                        f"{_EPS:g}, this model uses {cfg.norm_eps:g}; train with norm_eps={_EPS:g}")
    if cfg.norm == "post":
        return "MarianMTModel"
    if not cfg.tie_embeddings:
        raise UserError("seq2seq.tie_embeddings: a pre-norm model exports as Pegasus, which "
                        "always shares the source and target embeddings; train with "
                        "tie_embeddings=true (or norm=post, which exports as MarianMTModel)")
    return "PegasusForConditionalGeneration"


# --------------------------------------------------------------------------- export


def hf_config(cfg: Seq2SeqConfig, ids: Seq2SeqIds) -> dict[str, Any]:
    """config.json for ``cfg``: Marian (post-norm) or Pegasus (pre-norm) with our special ids."""
    arch = export_architecture(cfg)
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": SEQ2SEQ_ARCHITECTURES[arch][0],
        "vocab_size": cfg.vocab_size, "d_model": cfg.n_embd,
        "encoder_layers": cfg.n_encoder_layer, "decoder_layers": cfg.n_decoder_layer,
        "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.ffn_dim, "decoder_ffn_dim": cfg.ffn_dim,
        "max_position_embeddings": cfg.block_size, "activation_function": cfg.activation,
        "scale_embedding": True, "dropout": cfg.dropout, "attention_dropout": cfg.dropout,
        "activation_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": ids.pad, "decoder_start_token_id": ids.start,
        "eos_token_id": ids.eos, "bos_token_id": None,
        # Both classes default to forcing EOS at max_length; our generation never does.
        "forced_eos_token_id": None, "is_encoder_decoder": True,
    }
    if arch == "MarianMTModel":
        out.update(share_encoder_decoder_embeddings=cfg.tie_embeddings,
                   decoder_vocab_size=cfg.vocab_size)
    return out


def hf_state_dict(model: Seq2Seq) -> dict[str, Tensor]:
    """Our tensors under transformers' names, as its save_pretrained writes them: a shared
    matrix once (``model.shared``), plus the zero ``final_logits_bias`` and, for Pegasus,
    the sine tables it stores."""
    cfg, state = model.cfg, model.state_dict()
    embeddings = ("shared.weight", "encoder.embed_tokens.weight",
                  "decoder.embed_tokens.weight", "lm_head.weight")
    out = {}
    for key, t in state.items():
        if cfg.tie_embeddings and key in embeddings[1:]:
            continue  # the same Parameter as shared.weight
        out[key if key == "lm_head.weight" else f"model.{key}"] = t
    out[_BIAS] = torch.zeros(1, cfg.vocab_size)
    if export_architecture(cfg) == "PegasusForConditionalGeneration":
        out.update({k: _exact_sine_table(cfg.block_size, cfg.n_embd) for k in _POSITIONS})
    return out


def _exact_sine_table(block_size: int, n_embd: int) -> Tensor:
    """The sine table (block_size, C) computed in float64, then rounded to fp32, as Pegasus
    computes the one it stores (our model's fp32 table differs by ~1e-6)."""
    pos = torch.arange(block_size, dtype=torch.float64)[:, None]  # (block_size, 1)
    i = torch.arange(0, n_embd, 2, dtype=torch.float64)  # 2i, (C/2,)
    angles = pos / torch.pow(10000.0, i / n_embd)  # (block_size, C/2)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).float()  # (block_size, C)


def write_tokenizer(tokenizer_json: Path, out: Path, ids: Seq2SeqIds, max_length: int) -> None:
    """tokenizer.json (EOS appended to every text, as training appends it to each source) and a
    tokenizer_config.json that names the EOS and padding tokens for AutoTokenizer."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = tok.id_to_token(ids.eos)
    if tok.encode("").ids != [ids.eos]:  # an imported (or re-exported) one appends it already
        append = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                               special_tokens=[(eos, ids.eos)])
        tok.post_processor = (append if tok.post_processor is None
                              else processors.Sequence([tok.post_processor, append]))
    tok.save(str(out / TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "eos_token": eos, "pad_token": tok.id_to_token(ids.pad),
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                               encoding="utf-8")


def write_folder(model: Seq2Seq, tokenizer_json: Path, out: Path, ids: Seq2SeqIds,
                 dtype: torch.dtype) -> str:
    """config.json, model.safetensors, generation_config.json and the tokenizer files of an
    encoder-decoder into ``out``; the architecture written."""
    config = hf_config(model.cfg, ids)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = {k: t.detach().to(dtype).cpu().contiguous() for k, t in hf_state_dict(model).items()}
    save_weights(tensors, out)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"decoder_start_token_id": ids.start, "eos_token_id": ids.eos,
                  "pad_token_id": ids.pad, "forced_eos_token_id": None}
    (out / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(tokenizer_json, out, ids, model.cfg.block_size)
    return config["architectures"][0]


def check_inputs(cfg: Seq2SeqConfig, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """(src, src_mask, tgt), each (2, length): fixed pseudo-random ids; the second source ends
    in padding, so the check covers the source mask of self- and cross-attention."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, cfg.vocab_size, (2, length), generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, max(1, length - length // 3):] = 0
    return src, mask, tgt


def load_back_check(model: Seq2Seq, folder: Path, dtype: torch.dtype) -> float:
    """Load ``folder`` with transformers (AutoModelForSeq2SeqLM); max |Δlogits| against
    ``model`` in fp32, teacher-forced, on a padded source batch.

    ``model`` is rounded in place to the written ``dtype`` (kept in fp32), as hf's checks.
    UserError when transformers reports missing/unexpected/mismatched keys.
    """
    theirs = load_exported("AutoModelForSeq2SeqLM", folder)
    model.to(dtype).float()
    src, mask, tgt = check_inputs(model.cfg, min(model.cfg.block_size, 32))
    with torch.no_grad():
        ours = model.eval()(src, tgt, mask)
        ref = theirs.eval()(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    return (ours - ref).abs().max().item()


# --------------------------------------------------------------------------- import


def _refuse(where: str, key: str, value: Any, why: str) -> UserError:
    return UserError(f"{where}: {key}={value!r} is not supported; {why}")


def seq2seq_config_from_hf(hf: dict[str, Any], where: str) -> tuple[Seq2SeqConfig, str]:
    """(our config, architecture) for a Marian or Pegasus config.json; a one-line UserError
    naming the first setting our Transformer cannot compute."""
    arch = seq2seq_architecture(hf)
    if arch is None:
        raise UserError(f"{where}: architecture {hf.get('architectures')} is not supported; "
                        f"lmforge imports {', '.join(SEQ2SEQ_ARCHITECTURES)} as seq2seq runs")
    act = hf.get("activation_function", "gelu")
    if act not in _ACTIVATIONS:
        raise _refuse(where, "activation_function", act,
                      f"lmforge's feed-forward uses one of {', '.join(_ACTIVATIONS)}")
    if not hf.get("scale_embedding", False):
        raise _refuse(where, "scale_embedding", hf.get("scale_embedding", False),
                      "lmforge scales embeddings by sqrt(d_model), as the paper (need true)")
    # Keys a BART/MBart-style config would carry: the layouts our model does not have.
    for key, ok in (("normalize_before", SEQ2SEQ_ARCHITECTURES[arch][1] == "pre"),
                    ("normalize_embedding", False), ("layernorm_embedding", False),
                    ("add_final_layer_norm", SEQ2SEQ_ARCHITECTURES[arch][1] == "pre"),
                    ("static_position_embeddings", True), ("is_decoder", False)):
        if key in hf and hf[key] != ok:
            what = "learned positions" if key == "static_position_embeddings" else "that layout"
            raise _refuse(where, key, hf[key], f"lmforge's {arch} import has no {what} "
                          f"(needs {key}={ok!r})")
    vocab = hf.get("vocab_size")
    if hf.get("decoder_vocab_size") not in (None, vocab):
        raise _refuse(where, "decoder_vocab_size", hf["decoder_vocab_size"],
                      f"lmforge uses one vocabulary for source and target (vocab_size={vocab})")
    heads = (hf.get("encoder_attention_heads"), hf.get("decoder_attention_heads"))
    ffn = (hf.get("encoder_ffn_dim"), hf.get("decoder_ffn_dim"))
    for name, pair in (("encoder/decoder_attention_heads", heads),
                       ("encoder/decoder_ffn_dim", ffn)):
        if pair[0] != pair[1]:
            raise _refuse(where, name, pair, "lmforge's encoder and decoder share these sizes")
    tied = bool(hf.get("tie_word_embeddings", True)) and bool(
        hf.get("share_encoder_decoder_embeddings", True))
    def need(key: str) -> Any:
        if key not in hf:
            raise UserError(f"{where}: has no '{key}'; is it the config.json of an "
                            "encoder-decoder?")
        return hf[key]

    try:
        cfg = Seq2SeqConfig(
            vocab_size=need("vocab_size"), block_size=need("max_position_embeddings"),
            n_encoder_layer=need("encoder_layers"), n_decoder_layer=need("decoder_layers"),
            n_head=need("encoder_attention_heads"), n_embd=need("d_model"),
            intermediate_size=need("encoder_ffn_dim"),
            norm=SEQ2SEQ_ARCHITECTURES[arch][1],  # type: ignore[arg-type]
            activation=_ACTIVATIONS[act],  # type: ignore[arg-type]
            tie_embeddings=tied, dropout=float(hf.get("dropout", 0.1)))
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None
    return cfg, arch


def _sources(hf: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Our embedding keys -> the file's keys that may hold them, in order of preference.

    A file that shares source and target but not the output head (or the reverse) is read as
    three separate matrices holding the copies it implies: the same numbers."""
    tie_out = bool(hf.get("tie_word_embeddings", True))
    enc = ("model.encoder.embed_tokens.weight", "model.shared.weight")
    dec = ("model.decoder.embed_tokens.weight", "model.shared.weight")
    return {"shared.weight": ("model.shared.weight", *enc[:1]),
            "encoder.embed_tokens.weight": enc, "decoder.embed_tokens.weight": dec,
            "lm_head.weight": dec if tie_out else ("lm_head.weight",)}


def load_hf_seq2seq(folder: Path, dtype: torch.dtype | None = None) -> tuple[Seq2Seq, str]:
    """(our model holding a Marian or Pegasus folder's weights, its architecture), eval mode."""
    where = folder / CONFIG_FILE
    hf = read_json(where)
    cfg, arch = seq2seq_config_from_hf(hf, str(where))
    with torch.device("meta"):  # every tensor is overwritten by the file: skip the init
        model = Seq2Seq(cfg)
    model.to_empty(device="cpu")  # re-ties the shared matrix and recomputes the sine table
    weights = SafetensorsFolder(folder)
    if dtype is None and weights.files:
        dtype = weights.get(next(iter(weights.files))).dtype
    model.to(dtype or torch.float32)
    _load_weights(model, hf, weights, folder)
    return model.eval(), arch


def _load_weights(model: Seq2Seq, hf: dict[str, Any], weights: SafetensorsFolder,
                  folder: Path) -> None:
    """Copy every tensor in by name; UserError for a missing, misshapen or unused one."""
    hint = f"do {CONFIG_FILE} and the weights in {folder} belong together?"
    sources, used = _sources(hf), {_BIAS, *_POSITIONS}
    if bool(hf.get("tie_word_embeddings", True)):
        used.add("lm_head.weight")  # older files store the tied head too; transformers re-ties
    if {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"} <= set(
            weights.files):
        used.add("model.shared.weight")  # untied (v5: tie_word_embeddings=false): not computed with
    for key, t in model.state_dict().items():
        names = sources.get(key, (key if key == "lm_head.weight" else f"model.{key}",))
        name = next((n for n in names if n in weights.files), None)
        if name is None:
            raise UserError(f"{folder}: tensor {names[0]} is missing; {hint}")
        src = weights.get(name)
        if src.shape != t.shape:
            raise UserError(f"{folder}: tensor {name} has shape {tuple(src.shape)} but "
                            f"{CONFIG_FILE} implies {tuple(t.shape)}; {hint}")
        with torch.no_grad():
            t.copy_(src)
        used.add(name)
    if _BIAS in weights.files and weights.get(_BIAS).abs().max().item() != 0.0:
        raise UserError(f"{folder}: {_BIAS} is not zero; lmforge's output projection has no "
                        "bias, so it cannot hold these logits")
    table = sinusoid_table(model.cfg.block_size, model.cfg.n_embd)
    for name in (k for k in _POSITIONS if k in weights.files):  # Pegasus stores its tables
        if (weights.get(name).float() - table).abs().max().item() > 1e-4:
            raise UserError(f"{folder}: {name} is not the fixed sine table; lmforge's "
                            "positions are sinusoids and cannot hold learned ones")
    extra = sorted(set(weights.files) - used)
    if extra:
        raise UserError(f"{folder}: tensor {extra[0]} is not used by this model; {hint}")


def special_ids(hf: dict[str, Any], where: str) -> Seq2SeqIds:
    """(pad, decoder start, eos) from a Marian/Pegasus config.json, as our generation needs."""
    pad, eos = hf.get("pad_token_id"), hf.get("eos_token_id")
    start = hf.get("decoder_start_token_id", pad)
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    for name, value in (("pad_token_id", pad), ("decoder_start_token_id", start),
                        ("eos_token_id", eos)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _refuse(where, name, value, "lmforge needs one token id here")
    return Seq2SeqIds(pad, start, eos)

