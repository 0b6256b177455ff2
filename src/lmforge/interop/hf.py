"""Hugging Face model folders in and out: the decoder family, and BERT (at the end).

A Hugging Face causal-LM folder is ``config.json`` + safetensors weights (one file, or shards
with ``model.safetensors.index.json``) + tokenizer files. Five architectures map onto our
``DecoderConfig`` exactly, so a round trip changes no number:

=====================  ==================================================================
LlamaForCausalLM       rope + rmsnorm + swiglu, optional GQA, attention_bias/mlp_bias = bias
Qwen2ForCausalLM       the same with biases on q/k/v only (``qkv_bias``)
Qwen3ForCausalLM       the same with no biases and RMSNorm on q and k per head (``qk_norm``)
MistralForCausalLM     the same with a ``sliding_window``
Phi3ForCausalLM        Llama's computation (optionally a window) with q/k/v fused as
                       ``qkv_proj`` and gate/up as ``gate_up_proj``: split on import, fused
                       on export (an import from Phi-3 exports as Phi-3 again)
GPT2LMHeadModel        learned positions + layernorm + tanh-GELU MLP + biases
Gemma2ForCausalLM      rope + Gemma's (1 + w) RMSNorm + GeGLU, embeddings times sqrt(hidden),
                       sandwich norms, query_pre_attn_scalar, attention and final soft caps,
                       a sliding window on alternate layers (``local_layers``)
Gemma3ForCausalLM      Gemma 2 with q/k norms, no attention cap, 5 local : 1 global layers
                       and a RoPE base of their own for the local ones (``rope_local_theta``)
=====================  ==================================================================

The rope families also carry ``head_dim`` (``head_size``) and ``rope_scaling`` of type
linear, llama3 (Llama 3.1+) or yarn (``RopeScaling``).

Reading uses only safetensors and json (never a pickle). transformers is imported only by
``load_back_check``, inside the function, so this module stays light.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.models.decoder import Decoder, DecoderConfig, RopeScaling
from lmforge.models.encoder import (
    Encoder,
    EncoderConfig,
    EncoderForClassification,
    EncoderForMaskedLM,
)
from lmforge.utils.io import chmod_like_open

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Largest weights file before an export is split into shards: transformers v5's
# save_pretrained default (max_shard_size="50GB"; v4 used 5GB).
MAX_SHARD_BYTES = 50 * 10**9
GENERATION_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
# Tokenizer companions kept verbatim through import and export (special tokens, chat template).
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# architecture -> (model_type, tensor-naming family)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "llama"),
    "Qwen3ForCausalLM": ("qwen3", "llama"),
    "MistralForCausalLM": ("mistral", "llama"),
    "Phi3ForCausalLM": ("phi3", "phi3"),
    "GPT2LMHeadModel": ("gpt2", "gpt2"),
    "Gemma2ForCausalLM": ("gemma2", "gemma"),
    "Gemma3ForCausalLM": ("gemma3_text", "gemma"),
}
# Architectures whose text model we could hold but whose folder is more than that.
_TEXT_ONLY = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
# Values transformers assumes when config.json leaves a key out (its config-class defaults).
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "head_dim": 128},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False},
    "phi3": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "gemma2": {"max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
               "head_dim": 256, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0, "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3_text": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": True, "head_dim": 256, "num_key_value_heads": 4,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "final_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh"},
}
# Buffers some older files carry that hold nothing learned (causal masks, rotary frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# --------------------------------------------------------------------------- configs


def _need(hf: dict[str, Any], key: str, where: str) -> Any:
    if key not in hf:
        raise UserError(f"{where}: has no '{key}'; is it the config.json of a causal LM?")
    return hf[key]


_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling]:
    """(base, scaling) of a v4 (rope_theta + rope_scaling) or v5 (rope_parameters) config.

    As transformers v5's ``convert_rope_params_to_dict``: rope_scaling wins over
    rope_parameters, and a theta inside the dict over a top-level one.
    """
    p = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = float(p.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = p.get("rope_type", p.get("type")) or "default"
    if kind not in _ROPE_TYPES:
        raise UserError(f"{where}: rope_scaling type '{kind}' is not supported; lmforge "
                        f"implements {', '.join(_ROPE_TYPES)} (dynamic has no fixed table)")
    if p.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{where}: partial_rotary_factor is not supported; lmforge rotates "
                        "the whole head")
    if kind == "default":
        return theta, RopeScaling()
    factor = p.get("factor")
    if factor is None:  # transformers' yarn derives it; the others require it
        raise UserError(f"{where}: rope_scaling has no 'factor'; lmforge needs it for {kind}")
    original = p.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    extra = {}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in p:
                raise UserError(f"{where}: rope_scaling has no '{key}'; llama3 scaling needs it")
        extra = {"low_freq_factor": p["low_freq_factor"], "high_freq_factor": p["high_freq_factor"]}
    elif kind == "yarn":
        extra = {"beta_fast": p.get("beta_fast") or 32.0, "beta_slow": p.get("beta_slow") or 1.0,
                 "attention_factor": _yarn_attention_factor(p, float(factor)),
                 "truncate": bool(p.get("truncate", True))}
    scaling = RopeScaling(type=_ROPE_TYPES[kind], factor=float(factor),  # type: ignore[arg-type]
                          original_block_size=None if kind == "linear" else original, **extra)
    return theta, scaling


def _yarn_attention_factor(p: dict[str, Any], factor: float) -> float | None:
    """YaRN's cos/sin scale: explicit, from DeepSeek's mscale pair, or None (derived later)."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        return None

    def get_mscale(scale: float, m: float) -> float:  # transformers' _compute_yarn_parameters
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))


def _sliding_window(hf: dict[str, Any], model_type: str, n_layer: int, where: str) -> int | None:
    """One window for every layer (Mistral), or per-layer Qwen2 settings that amount to one."""
    window = hf.get("sliding_window")
    if model_type in ("mistral", "phi3"):
        return window
    if model_type not in ("qwen2", "qwen3"):
        return None
    types = hf.get("layer_types")
    if types is None:  # transformers v4: layers from max_window_layers on slide
        slide = bool(hf.get("use_sliding_window")) and window is not None
        first = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if slide and i >= first else "full" for i in range(n_layer)]
    kinds = {"sliding" if t == "sliding_attention" else "full" for t in types}
    if kinds == {"full"}:
        return None
    if kinds == {"sliding"} and window is not None:
        return window
    raise UserError(
        f"{where}: layer_types mixes sliding-window and full-attention layers; lmforge uses "
        "one sliding_window for every layer"
    )


def _llama_like_config(hf: dict[str, Any], model_type: str, where: str) -> DecoderConfig:
    """Llama, Qwen2, Qwen3, Mistral and Phi-3 configs -> DecoderConfig."""
    d = {**_DEFAULTS[model_type], **hf}
    c, heads = _need(d, "hidden_size", where), _need(d, "num_attention_heads", where)
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act '{act}' is not supported; lmforge's SwiGLU uses silu")
    head_dim = d.get("head_dim") or c // heads
    # Qwen3's attention_bias puts biases on q/k/v/o but not the MLP: no lmforge field says that.
    mlp_bias = d.get("mlp_bias", False) if model_type != "qwen3" else False
    bias = bool(d.get("attention_bias", False))
    if bias != bool(mlp_bias):
        raise UserError(f"{where}: attention_bias and mlp_bias differ; lmforge's bias covers "
                        "both (set them equal)")
    kv = d.get("num_key_value_heads") or heads
    n_layer = _need(d, "num_hidden_layers", where)
    theta, scaling = _rope(d, where)
    return DecoderConfig(
        vocab_size=_need(d, "vocab_size", where), block_size=d["max_position_embeddings"],
        n_layer=n_layer, n_head=heads, n_kv_head=None if kv == heads else kv, n_embd=c,
        intermediate_size=_need(d, "intermediate_size", where), norm="rmsnorm",
        norm_eps=d["rms_norm_eps"], pos="rope", rope_theta=theta, rope_scaling=scaling,
        mlp="swiglu", bias=bias, qkv_bias=model_type == "qwen2",
        sliding_window=_sliding_window(d, model_type, n_layer, where),
        head_size=None if head_dim * heads == c else head_dim, qk_norm=model_type == "qwen3",
        tie_embeddings=bool(d["tie_word_embeddings"]), dropout=0.0,
        init_std=d.get("initializer_range", 0.02),
    )


def _gemma_config(hf: dict[str, Any], model_type: str, where: str) -> DecoderConfig:
    """Gemma 2 and Gemma 3 (text) configs -> DecoderConfig, as transformers' modeling reads them.

    Gemma 3 ignores attn_logit_softcapping (its attention passes no cap), and so do we.
    """
    d = {**_DEFAULTS[model_type], **hf}
    act = d.get("hidden_activation") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise UserError(f"{where}: hidden_activation '{act}' is not supported; lmforge's GeGLU "
                        "uses the tanh GELU (gelu_pytorch_tanh)")
    for key in ("use_bidirectional_attention", "attention_bias"):
        if d.get(key):
            raise UserError(f"{where}: {key}=true is not supported; lmforge imports causal LMs "
                            "without biases")
    c, heads = _need(d, "hidden_size", where), _need(d, "num_attention_heads", where)
    n_layer = _need(d, "num_hidden_layers", where)
    local = _gemma_local_layers(d, model_type, n_layer, where)
    gemma3 = model_type == "gemma3_text"
    if gemma3:
        theta, scaling, local_theta = _gemma3_rope(d, where)
    else:
        (theta, scaling), local_theta = _rope(d, where), None
    window = d.get("sliding_window") if local else None
    kv, head_dim = d.get("num_key_value_heads") or heads, d.get("head_dim") or c // heads
    return DecoderConfig(
        vocab_size=_need(d, "vocab_size", where), block_size=d["max_position_embeddings"],
        n_layer=n_layer, n_head=heads, n_kv_head=None if kv == heads else kv, n_embd=c,
        intermediate_size=_need(d, "intermediate_size", where), norm="rmsnorm1p",
        norm_eps=d["rms_norm_eps"], pos="rope", rope_theta=theta, rope_scaling=scaling,
        mlp="geglu", sliding_window=window,
        local_layers=None if window is None or len(local) == n_layer else local,
        head_size=None if head_dim * heads == c else head_dim, qk_norm=gemma3,
        embed_scale=True, sandwich_norm=True,
        query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
        attn_softcap=None if gemma3 else d.get("attn_logit_softcapping"),
        logit_softcap=d.get("final_logit_softcapping"),
        rope_local_theta=local_theta if window is not None else None,
        tie_embeddings=bool(d["tie_word_embeddings"]), dropout=0.0,
        init_std=d.get("initializer_range", 0.02),
    )


def _gemma_local_layers(d: dict[str, Any], model_type: str, n_layer: int,
                        where: str) -> list[int]:
    """Indices of the sliding-window layers: ``layer_types``, else transformers' default
    pattern (Gemma 2: every other layer from the first; Gemma 3: all but every 6th)."""
    types = d.get("layer_types")
    if types is None:
        every = 2 if model_type == "gemma2" else int(d.get("sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % every else "full_attention"
                 for i in range(n_layer)]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown or len(types) != n_layer:
        raise UserError(f"{where}: layer_types must name sliding_attention or full_attention "
                        f"for each of the {n_layer} layers; got {types}")
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def _gemma3_rope(d: dict[str, Any], where: str) -> tuple[float, RopeScaling, float]:
    """(global base, global scaling, local base) of a Gemma 3 config: transformers v5's
    per-layer-type rope_parameters, or v4's rope_theta + rope_scaling + rope_local_base_freq."""
    p = d.get("rope_parameters")
    if isinstance(p, dict) and {"full_attention", "sliding_attention"} & p.keys():
        full, local = dict(p.get("full_attention") or {}), dict(p.get("sliding_attention") or {})
    else:
        full = {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", 1e6)}
        local = {"rope_theta": d.get("rope_local_base_freq", 10000.0)}
    full.setdefault("rope_theta", 1e6)  # Gemma3TextConfig.default_theta
    local.setdefault("rope_theta", 10000.0)
    size = {"max_position_embeddings": d["max_position_embeddings"]}
    theta, scaling = _rope({"rope_parameters": full, **size}, where)
    local_theta, local_scaling = _rope({"rope_parameters": local, **size}, where)
    if local_scaling.type != "none":
        raise UserError(f"{where}: rope_parameters.sliding_attention has rope_type "
                        f"{local_scaling.type}; lmforge gives the local layers plain RoPE")
    return theta, scaling, local_theta


def _gpt2_config(hf: dict[str, Any], where: str) -> DecoderConfig:
    """GPT-2 config -> DecoderConfig (tanh GELU, learned positions, biases everywhere)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation_function '{act}' is not supported; lmforge's "
                        "GPT-2 MLP uses the tanh GELU (gelu_new)")
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                    ("scale_attn_weights", True)):
        if hf.get(key, ok) != ok:
            raise UserError(f"{where}: {key}={hf[key]} is not supported (lmforge needs {ok})")
    return DecoderConfig(
        vocab_size=_need(hf, "vocab_size", where),
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=_need(hf, "n_layer", where), n_head=_need(hf, "n_head", where),
        n_embd=_need(hf, "n_embd", where), intermediate_size=hf.get("n_inner"),
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned",
        mlp="gelu", bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout=0.0, init_std=hf.get("initializer_range", 0.02),
    )


def decoder_config_from_hf(hf: dict[str, Any], where: str) -> tuple[DecoderConfig, str]:
    """(our config, architecture) for a Hugging Face config.json dict read from ``where``."""
    archs = hf.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if arch in _TEXT_ONLY:
        raise UserError(f"{where}: {arch} (text and images) is not supported; lmforge imports "
                        f"only the text model, a {_TEXT_ONLY[arch]} folder")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{where}: architecture {archs or hf.get('model_type')} is not supported; "
            f"lmforge imports {', '.join(ARCHITECTURES)}"
        )
    model_type = ARCHITECTURES[arch][0]
    try:
        if model_type == "gpt2":
            return _gpt2_config(hf, where), arch
        if ARCHITECTURES[arch][1] == "gemma":
            return _gemma_config(hf, model_type, where), arch
        return _llama_like_config(hf, model_type, where), arch
    except ConfigError as e:  # e.g. a head count that does not divide the width
        raise UserError(f"{where}: {e}") from None


def export_architecture(cfg: DecoderConfig, prefer: str | None = None) -> str:
    """The Hugging Face architecture that computes exactly what ``cfg`` does, or UserError.

    ``prefer`` (the architecture a run was imported from) wins where it computes the same:
    a Phi-3 import exports as Phi3ForCausalLM, not as the Llama it equals.
    """
    if (cfg.norm, cfg.mlp) == ("rmsnorm1p", "geglu") or cfg.embed_scale or cfg.sandwich_norm:
        return _gemma_architecture(cfg)
    for name in ("local_layers", "query_pre_attn_scalar", "attn_softcap", "logit_softcap",
                 "rope_local_theta"):
        if getattr(cfg, name) is not None:
            raise UserError(f"model.{name}: only the Gemma architectures have {name}, and "
                            "this model is not a Gemma (norm rmsnorm1p, mlp geglu, embed_scale, "
                            "sandwich_norm); use null to export")
    if (prefer == "Phi3ForCausalLM" and (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "rmsnorm",
                                                                         "swiglu")
            and not (cfg.bias or cfg.qkv_bias or cfg.qk_norm)):
        return prefer
    style = (cfg.pos, cfg.norm, cfg.mlp)
    if style == ("learned", "layernorm", "gelu"):
        if not cfg.bias:
            raise UserError("model.bias: GPT2LMHeadModel has biases everywhere; a GPT-2 style "
                            "model exports only with bias=true")
        for name, bad in (("n_kv_head", cfg.kv_heads != cfg.n_head),
                          ("sliding_window", cfg.sliding_window is not None),
                          ("head_size", cfg.head_size is not None), ("qk_norm", cfg.qk_norm)):
            if bad:
                raise UserError(f"model.{name}: GPT2LMHeadModel has no equivalent of "
                                f"{name}={getattr(cfg, name)}; use null to export")
        return "GPT2LMHeadModel"
    if style != ("rope", "rmsnorm", "swiglu"):
        raise UserError(
            f"model.pos/norm/mlp: {'/'.join(style)} has no Hugging Face equivalent; the hf "
            "format needs rope/rmsnorm/swiglu (Llama family) or learned/layernorm/gelu (GPT-2)"
        )
    if cfg.bias and cfg.sliding_window is not None:
        raise UserError("model.sliding_window: no Hugging Face architecture has a sliding "
                        "window and biases on every linear layer (bias=true)")
    if cfg.qk_norm:
        if cfg.bias or cfg.qkv_bias:
            raise UserError("model.qk_norm: Qwen3ForCausalLM (q/k norms) has no biases on the "
                            "MLP nor q/k/v biases alone; export with bias=false, qkv_bias=false")
        return "Qwen3ForCausalLM"
    if cfg.bias:
        return "LlamaForCausalLM"  # attention_bias = mlp_bias = true
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM" if cfg.sliding_window is None else "MistralForCausalLM"


def _gemma_architecture(cfg: DecoderConfig) -> str:
    """Gemma3ForCausalLM (q/k norms) or Gemma2ForCausalLM for a Gemma-style ``cfg``, or a
    UserError naming the field neither has."""
    for name, want in (("pos", "rope"), ("norm", "rmsnorm1p"), ("mlp", "geglu"),
                       ("embed_scale", True), ("sandwich_norm", True), ("bias", False),
                       ("qkv_bias", False)):
        if getattr(cfg, name) != want:
            raise UserError(f"model.{name}: the Gemma architectures need {name}={want} with "
                            "the other Gemma fields (norm rmsnorm1p, mlp geglu, embed_scale, "
                            f"sandwich_norm); got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"model.n_head: transformers' Gemma configs need n_head to divide "
                        f"n_embd={cfg.n_embd}, got {cfg.n_head} (head_size may differ)")
    has_local = any(cfg.window(i) is not None for i in range(cfg.n_layer))
    own_local_rope = (cfg.rope_local_theta is not None and has_local
                      and (cfg.rope_local_theta != cfg.rope_theta
                           or cfg.rope_scaling.type != "none"))
    if not cfg.qk_norm:
        if own_local_rope:
            raise UserError("model.rope_local_theta: Gemma2ForCausalLM has one RoPE for every "
                            "layer (Gemma3ForCausalLM, with qk_norm, has a local one); use null")
        return "Gemma2ForCausalLM"
    if cfg.attn_softcap is not None:
        raise UserError("model.attn_softcap: Gemma3ForCausalLM (q/k norms) does not cap "
                        "attention scores and Gemma2ForCausalLM has no q/k norms; use null")
    if cfg.rope_local_theta is None and has_local and cfg.rope_scaling.type != "none":
        raise UserError("model.rope_local_theta: Gemma3ForCausalLM gives the sliding layers "
                        "RoPE without rope_scaling; set rope_local_theta to export")
    return "Gemma3ForCausalLM"


def hf_config(cfg: DecoderConfig, bos_id: int | None, eos_id: int | list[int] | None,
              prefer: str | None = None, pad_id: int | None = None) -> dict[str, Any]:
    """The config.json dict for ``cfg`` (v4-style keys, which transformers v4 and v5 both read).

    pad_token_id is always written (null when there is none): Phi3Config's default, 32000,
    is beyond a small vocabulary.
    """
    arch = export_architecture(cfg, prefer)
    common = {"architectures": [arch], "model_type": ARCHITECTURES[arch][0],
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "pad_token_id": pad_id}
    if arch == "GPT2LMHeadModel":
        return {**common, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ffn_dim,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if ARCHITECTURES[arch][1] == "gemma":
        return {**common, **_gemma_hf_config(cfg, arch)}
    out = {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_scaling": hf_rope_scaling(cfg),
           "attention_dropout": 0.0}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        out.update(sliding_window=cfg.sliding_window)
    else:  # Qwen2/3: max_window_layers=0 makes every layer slide when the window is on
        out.update(use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window, max_window_layers=0)
    return out


def _gemma_hf_config(cfg: DecoderConfig, arch: str) -> dict[str, Any]:
    """The Gemma 2/3 keys of config.json (v4 names, which v5 converts on load)."""
    qpas = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
    out = {"hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_dim,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": cfg.block_size,
           "rms_norm_eps": cfg.norm_eps, "attention_bias": False, "attention_dropout": 0.0,
           # transformers types it int: write 256, not 256.0, when it is whole
           "query_pre_attn_scalar": int(qpas) if float(qpas).is_integer() else qpas,
           "sliding_window": cfg.sliding_window,
           "layer_types": ["full_attention" if cfg.window(i) is None else "sliding_attention"
                           for i in range(cfg.n_layer)],
           "final_logit_softcapping": cfg.logit_softcap,
           "attn_logit_softcapping": cfg.attn_softcap,
           "rope_theta": cfg.rope_theta, "rope_scaling": hf_rope_scaling(cfg)}
    if arch == "Gemma3ForCausalLM":
        out["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
    return out


def hf_rope_scaling(cfg: DecoderConfig) -> dict[str, Any] | None:
    """config.json's ``rope_scaling`` for ``cfg`` (None for plain RoPE), as ``_rope`` reads it."""
    rs = cfg.rope_scaling
    if rs.type == "none":
        return None
    out: dict[str, Any] = {"rope_type": rs.type, "factor": rs.factor}
    if rs.type != "linear":
        out["original_max_position_embeddings"] = rs.original_block_size or cfg.block_size
    if rs.type == "llama3":
        out.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    elif rs.type == "yarn":
        out.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
        if rs.attention_factor is not None:
            out["attention_factor"] = rs.attention_factor
    return out


# --------------------------------------------------------------------------- tensor names


@dataclass(frozen=True)
class Link:
    """Where one of our tensors lives in a Hugging Face state dict."""

    ours: str
    theirs: str
    transpose: bool = False  # GPT-2's Conv1D stores (in, out), nn.Linear (out, in)
    rows: tuple[int, int] | None = None
    """Our rows within a fused tensor (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj)."""
    total: int = 0
    """Rows of the whole fused tensor."""


_LLAMA_NAMES = {"tok_emb": "model.embed_tokens", "blocks": "model.layers",
                "attn_norm": "input_layernorm", "attn": "self_attn",
                "mlp_norm": "post_attention_layernorm", "norm_f": "model.norm"}
_GPT2_NAMES = {"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe",
               "blocks": "transformer.h", "attn_norm": "ln_1", "mlp_norm": "ln_2",
               "q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "o_proj": "c_proj",
               "fc_in": "c_fc", "fc_out": "c_proj", "norm_f": "transformer.ln_f"}
_PHI3_NAMES = {**_LLAMA_NAMES, "q_proj": "qkv_proj", "k_proj": "qkv_proj",
               "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
# Gemma's sandwich: post_attention_layernorm is the attention output's norm, not the MLP's input.
_GEMMA_NAMES = {**_LLAMA_NAMES, "attn_post_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm",
                "mlp_post_norm": "post_feedforward_layernorm"}
# Order of our tensors inside a fused one: cat(q, k, v) and cat(gate, up) along dim 0.
_FUSED_ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}


def weight_links(model: Decoder, arch: str) -> list[Link]:
    """One link per tensor of ``model`` (a tied head is the embedding's; it has none)."""
    family = ARCHITECTURES[arch][1]
    names = {"gpt2": _GPT2_NAMES, "phi3": _PHI3_NAMES, "gemma": _GEMMA_NAMES}.get(family,
                                                                                _LLAMA_NAMES)
    state = model.state_dict()
    groups: dict[str, list[str]] = {}
    for key in state:
        if not (key == "lm_head.weight" and model.cfg.tie_embeddings):
            groups.setdefault(".".join(names.get(p, p) for p in key.split(".")), []).append(key)
    links = []
    for theirs, keys in groups.items():
        transpose = family == "gpt2" and keys[0].startswith("blocks.") and state[keys[0]].ndim == 2
        if len(keys) == 1:
            links.append(Link(keys[0], theirs, transpose))
            continue
        keys.sort(key=lambda k: _FUSED_ORDER[k.split(".")[-2]])
        total, start = sum(state[k].shape[0] for k in keys), 0
        for key in keys:
            stop = start + state[key].shape[0]
            links.append(Link(key, theirs, transpose, (start, stop), total))
            start = stop
    return links


def _their_shape(link: Link, ours: torch.Size) -> tuple[int, ...]:
    shape = list(ours)
    if link.rows is not None:
        shape[0] = link.total
    return tuple(reversed(shape)) if link.transpose else tuple(shape)


def _to_ours(link: Link, t: Tensor) -> Tensor:
    if link.transpose:
        t = t.T
    return t[link.rows[0]:link.rows[1]] if link.rows is not None else t


# --------------------------------------------------------------------------- reading a folder


def resolve_source(src: str) -> Path:
    """A local model folder as given, or a Hub name downloaded (online) into the HF cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{src}: is a file; pass the model folder that holds {CONFIG_FILE}")
    if not _HUB_NAME.fullmatch(src):
        raise UserError(f"{src}: no such folder; pass a local Hugging Face model folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{src}: no such folder; to download it from the Hugging Face Hub, "
                        "pip install huggingface_hub") from None
    try:
        patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
        return Path(snapshot_download(src, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, network: all the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{src}: no such folder, and the Hugging Face Hub download failed "
                        f"({reason}); check the name and the network, or pass a local folder"
                        ) from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line UserError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; a Hugging Face model folder needs it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return data


class SafetensorsFolder:
    """Tensors of a folder's model.safetensors (or its shards), read one at a time (mmap)."""

    def __init__(self, folder: Path) -> None:
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: has no 'weight_map' object")
            files = {k: folder / v for k, v in weight_map.items()}
        elif (folder / WEIGHTS_FILE).is_file():
            files = dict.fromkeys(self._open(folder / WEIGHTS_FILE).keys(), folder / WEIGHTS_FILE)
        else:
            pickles = sorted(p.name for p in folder.glob("*.bin"))
            hint = (f"it has only pickle weights ({pickles[0]}), which lmforge never loads; "
                    "re-save them with save_pretrained(dir, safe_serialization=True)"
                    if pickles else f"it has no {WEIGHTS_FILE} or {INDEX_FILE}")
            raise UserError(f"{folder}: {hint}")
        self.files = files
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _open(path: Path) -> Any:
        try:
            return safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as e:
            raise UserError(f"{path}: cannot read it as safetensors ({e})") from None

    def get(self, key: str) -> Tensor:
        """The tensor ``key``, from whichever file holds it."""
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path].get_tensor(key)


def _canonical(keys: list[str], gpt2: bool) -> dict[str, str]:
    """Canonical name -> name in the file. OpenAI's GPT-2 files lack the 'transformer.' prefix."""
    if not gpt2:
        return {k: k for k in keys}
    return {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": k
            for k in keys}


def load_hf_model(folder: Path, dtype: torch.dtype | None = None) -> tuple[Decoder, str]:
    """(our model holding a Hugging Face folder's weights, its architecture), in eval mode.

    ``dtype`` None keeps the precision of the file. Every tensor is overwritten by the file, so
    the model is materialized without the (slow, pointless) random init.
    """
    where = folder / CONFIG_FILE
    cfg, arch = decoder_config_from_hf(read_json(where), str(where))
    weights = SafetensorsFolder(folder)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.to_empty(device="cpu")  # also computes the rotary tables (Decoder._apply)
    if dtype is None and weights.files:
        dtype = weights.get(next(iter(weights.files))).dtype
    model.to(dtype or torch.float32)
    load_weights(model, arch, weights, folder)
    return model.eval(), arch


def load_weights(model: Decoder, arch: str, weights: SafetensorsFolder, folder: Path) -> None:
    """Copy a folder's tensors into ``model``; UserError naming the tensor on any mismatch."""
    names = _canonical(list(weights.files), ARCHITECTURES[arch][1] == "gpt2")
    state, used = model.state_dict(), set()
    hint = f"do {CONFIG_FILE} and the weights in {folder} belong together?"
    for link in weight_links(model, arch):
        if link.theirs not in names:
            raise UserError(f"{folder}: tensor {link.theirs} is missing; {hint}")
        t = weights.get(names[link.theirs])
        want = _their_shape(link, state[link.ours].shape)
        if tuple(t.shape) != want:
            raise UserError(f"{folder}: tensor {link.theirs} has shape {tuple(t.shape)} but "
                            f"{CONFIG_FILE} implies {want}; {hint}")
        with torch.no_grad():
            state[link.ours].copy_(_to_ours(link, t))
        used.add(link.theirs)
    # A tied model's file may still hold a copy of the head; anything else unread is suspect.
    extra = [k for k in names if k not in used and not k.endswith(_IGNORED_SUFFIXES)
             and not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if extra:
        raise UserError(f"{folder}: tensor {extra[0]} is not used by a {arch} with this "
                        f"{CONFIG_FILE}; {hint}")


def special_token_ids(folder: Path, hf: dict[str, Any], name: str, tokenizer: Any) -> list[int]:
    """Every ``bos``/``eos`` id: generation_config.json (what HF generate uses), config.json,
    then tokenizer_config.json's token looked up in ``tokenizer``; [] when none names one.

    Llama 3 lists several EOS ids (<|end_of_text|>, <|eom_id|>, <|eot_id|>): any one ends a text.
    """
    gen, side = folder / GENERATION_FILE, folder / "tokenizer_config.json"
    for source in ([read_json(gen)] if gen.is_file() else []) + [hf]:
        value = source.get(f"{name}_token_id")
        values = value if isinstance(value, list) else [value]
        found = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if found:
            return list(dict.fromkeys(found))  # unique, first kept first
    token = read_json(side).get(f"{name}_token") if side.is_file() else None
    token = token.get("content") if isinstance(token, dict) else token
    i = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return [] if i is None else [i]


def special_token_id(folder: Path, hf: dict[str, Any], name: str, tokenizer: Any) -> int | None:
    """The first of ``special_token_ids`` (the one id older run folders keep), or None."""
    return next(iter(special_token_ids(folder, hf, name, tokenizer)), None)


def copy_tokenizer(folder: Path, out: Path) -> None:
    """tokenizer.json (+ side files) into ``out``; GPT-2 style vocab.json/merges.txt converted."""
    if (folder / TOKENIZER_FILE).is_file():
        shutil.copyfile(folder / TOKENIZER_FILE, out / TOKENIZER_FILE)
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        _bpe_from_vocab(folder).save(str(out / TOKENIZER_FILE))
    else:
        raise UserError(
            f"{folder}: has no {TOKENIZER_FILE} (or vocab.json + merges.txt); write one with "
            f"transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
        )
    for name in TOKENIZER_SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)


def _bpe_from_vocab(folder: Path) -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme) from vocab.json + merges.txt."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UserError(f"{folder}: vocab.json/merges.txt are not a BPE vocabulary ({e})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    side = folder / "tokenizer_config.json"
    config = read_json(side) if side.is_file() else {}
    specials = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str) and tok.token_to_id(content) is not None:
            specials.append(AddedToken(content, special=True, normalized=False))
    tok.add_special_tokens(specials)  # so "<|endoftext|>" in text encodes to its one id
    return tok


# --------------------------------------------------------------------------- export


def hf_state_dict(model: Decoder, arch: str) -> dict[str, Tensor]:
    """Our weights under Hugging Face names and layouts (contiguous CPU tensors)."""
    groups: dict[str, list[Link]] = {}
    for link in weight_links(model, arch):
        groups.setdefault(link.theirs, []).append(link)
    state, out = model.state_dict(), {}
    for theirs, links in groups.items():
        links.sort(key=lambda link: link.rows or (0, 0))
        parts = [state[link.ours] for link in links]
        t = parts[0] if len(parts) == 1 else torch.cat(parts)  # e.g. c_attn = cat(q, k, v)
        out[theirs] = (t.T if links[0].transpose else t).detach().cpu().contiguous()
    return out


def save_weights(tensors: dict[str, Tensor], out: Path,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """``tensors`` as model.safetensors, or as shards + model.safetensors.index.json when
    they exceed ``max_shard_bytes``, as transformers' save_pretrained names them; file names.

    A tensor larger than the limit gets a shard of its own (transformers does the same).
    """
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    names = [WEIGHTS_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        chmod_like_open(out / name)  # safetensors writes 0600: unreadable to anyone else
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards, strict=True)
                                for k in shard}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        names.append(INDEX_FILE)
    return names


def write_hf_folder(model: Decoder, run_dir: Path, out: Path, *, bos_id: int | None,
                    eos_id: int | None, dtype: torch.dtype,
                    eos_ids: list[int] | None = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES, prefer: str | None = None,
                    pad_id: int | None = None) -> str:
    """Write config.json, weights, generation and tokenizer files to ``out``; the architecture.

    ``eos_ids`` (every stop id, ``eos_id`` first) is written as a list when it has several;
    weights beyond ``max_shard_bytes`` are split into shards with an index; ``prefer`` is the
    architecture the run came from (see ``export_architecture``), ``pad_id`` its padding id.
    """
    stops = list(dict.fromkeys([*([] if eos_id is None else [eos_id]), *(eos_ids or [])]))
    eos_value: int | list[int] | None = stops if len(stops) > 1 else eos_id
    config = hf_config(model.cfg, bos_id, eos_value, prefer, pad_id)
    arch = config["architectures"][0]
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = {k: t.to(dtype) for k, t in hf_state_dict(model, arch).items()}
    save_weights(tensors, out, max_shard_bytes)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_value}
    (out / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    _export_tokenizer_files(run_dir, out, model.cfg.block_size, eos_id)
    return arch


def _write_tokenizer_config(out: Path, max_length: int, eos_id: int | None) -> None:
    """A minimal tokenizer_config.json so AutoTokenizer loads tokenizer.json as a fast tokenizer."""
    from tokenizers import Tokenizer

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "model_max_length": max_length,
                              "clean_up_tokenization_spaces": False}
    if eos_id is not None:
        config["eos_token"] = Tokenizer.from_file(str(out / TOKENIZER_FILE)).id_to_token(eos_id)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                               encoding="utf-8")


def _check_ids(vocab_size: int, length: int) -> Tensor:
    """Fixed pseudo-random token ids (2, length) for comparing two implementations."""
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


def load_exported(auto_class: str, folder: Path) -> Any:
    """``transformers.<auto_class>.from_pretrained(folder)`` in fp32, without progress bars.

    UserError when transformers is missing, or when it reports missing/unexpected/mismatched
    keys: a check would then compare nothing, and an output it cannot load is no export.
    """
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise UserError("the hf export checks its output with transformers; "
                        "pip install transformers") from None
    hf_logging.disable_progress_bar()  # a bar per load is noise in a one-line report
    try:
        theirs, info = getattr(transformers, auto_class).from_pretrained(
            str(folder), dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.enable_progress_bar()
    for kind, keys in info.items():
        if keys:
            raise UserError(f"{folder}: transformers reports {kind} {sorted(map(str, keys))[:3]}; "
                            "the export does not load cleanly (please report this)")
    return theirs


def load_back_check(model: Decoder, folder: Path, dtype: torch.dtype) -> float:
    """Load ``folder`` with transformers and return max |Δlogits| against ``model``, in fp32.

    ``model`` is rounded in place to the written ``dtype`` (and kept in fp32), so both sides
    hold the same numbers. UserError when transformers reports missing/unexpected/mismatched
    keys: the check then compares nothing, and an output it cannot load is no export.
    """
    theirs = load_exported("AutoModelForCausalLM", folder)
    model.to(dtype).float()
    idx = _check_ids(model.cfg.vocab_size, min(model.cfg.block_size, 64))
    with torch.no_grad():
        diff = (model.eval()(idx) - theirs.eval()(idx).logits).abs().max().item()
    return diff


# --------------------------------------------------------------------------- BERT (encoder)

# architecture -> what our run holds: a masked-LM head, a classifier, or the body alone.
# The state-dict keys are identical to ours (models/encoder.py), so tensors map by name.
BERT_ARCHITECTURES = {"BertForMaskedLM": "mlm", "BertForSequenceClassification": "classify",
                      "BertModel": "none"}
# Non-persistent index buffers older BERT files still carry; nothing learned.
_BERT_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# Tied to word_embeddings.weight / cls.predictions.bias: transformers writes neither.
_BERT_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
EncoderModel = EncoderForMaskedLM | EncoderForClassification | Encoder


def bert_architecture(hf: dict[str, Any]) -> str | None:
    """The BERT architecture a config.json names, or None (not a BERT folder)."""
    archs = hf.get("architectures") or []
    return archs[0] if len(archs) == 1 and archs[0] in BERT_ARCHITECTURES else None


def encoder_config_from_hf(hf: dict[str, Any], where: str) -> EncoderConfig:
    """A BERT config.json dict read from ``where`` -> EncoderConfig, or a one-line UserError."""
    for key, ok in (("model_type", "bert"), ("position_embedding_type", "absolute"),
                    ("hidden_act", "gelu"), ("is_decoder", False), ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise UserError(f"{where}: {key}={hf[key]!r} is not supported; lmforge's BERT needs "
                            f"{key}={ok!r}")
    labels = hf.get("id2label") or {}
    try:
        return EncoderConfig(
            vocab_size=_need(hf, "vocab_size", where),
            block_size=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            n_layer=_need(hf, "num_hidden_layers", where),
            n_head=_need(hf, "num_attention_heads", where), n_embd=_need(hf, "hidden_size", where),
            intermediate_size=hf.get("intermediate_size", 3072),
            norm_eps=hf.get("layer_norm_eps", 1e-12), dropout=0.0,
            init_std=hf.get("initializer_range", 0.02),
            num_labels=hf.get("num_labels", len(labels) or 2),
        )
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None


def load_hf_encoder(folder: Path, dtype: torch.dtype | None = None) -> tuple[EncoderModel, str]:
    """(our model holding a BERT folder's weights, its architecture), in eval mode.

    BertForMaskedLM -> EncoderForMaskedLM, BertForSequenceClassification ->
    EncoderForClassification, BertModel -> Encoder (the body with its pooler).
    """
    where = folder / CONFIG_FILE
    hf = read_json(where)
    arch = bert_architecture(hf)
    if arch is None:
        raise UserError(f"{where}: architecture {hf.get('architectures')} is not a BERT; "
                        f"lmforge imports {', '.join(BERT_ARCHITECTURES)}")
    cfg = encoder_config_from_hf(hf, str(where))
    head = BERT_ARCHITECTURES[arch]
    with torch.device("meta"):  # every tensor is overwritten by the file: skip the init
        model: EncoderModel = (EncoderForMaskedLM(cfg) if head == "mlm" else
                               EncoderForClassification(cfg) if head == "classify"
                               else Encoder(cfg))
    model.to_empty(device="cpu")  # EncoderForMaskedLM re-ties its decoder in _apply
    weights = SafetensorsFolder(folder)
    if dtype is None and weights.files:
        dtype = weights.get(next(iter(weights.files))).dtype
    model.to(dtype or torch.float32)
    _load_bert_weights(model, weights, folder, strip_bert=head == "none")
    return model.eval(), arch


def _load_bert_weights(model: EncoderModel, weights: SafetensorsFolder, folder: Path,
                       strip_bert: bool) -> None:
    """Copy tensors by (identical) name; a BertModel file may carry a 'bert.' prefix."""
    names = {(k.removeprefix("bert.") if strip_bert else k): k for k in weights.files}
    state, used = model.state_dict(), set()
    hint = f"do {CONFIG_FILE} and the weights in {folder} belong together?"
    for key, t in state.items():
        if key in _BERT_TIED:
            continue
        if key not in names:
            raise UserError(f"{folder}: tensor {key} is missing; {hint}")
        src = weights.get(names[key])
        if src.shape != t.shape:
            raise UserError(f"{folder}: tensor {key} has shape {tuple(src.shape)} but "
                            f"{CONFIG_FILE} implies {tuple(t.shape)}; {hint}")
        with torch.no_grad():
            t.copy_(src)
        used.add(key)
    extra = [k for k in names if k not in used and k not in _BERT_TIED
             and not k.endswith(_BERT_IGNORED_SUFFIXES)]
    if extra:
        raise UserError(f"{folder}: tensor {extra[0]} is not used by this BERT; {hint}")


def bert_hf_config(model: EncoderForMaskedLM | EncoderForClassification, pad_id: int | None,
                   labels: list[str] | None) -> dict[str, Any]:
    """The config.json dict of the BERT architecture that computes what ``model`` does."""
    cfg = model.cfg
    classify = isinstance(model, EncoderForClassification)
    out: dict[str, Any] = {
        "architectures": ["BertForSequenceClassification" if classify else "BertForMaskedLM"],
        "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.block_size, "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": 0 if pad_id is None else pad_id,
        "position_embedding_type": "absolute", "tie_word_embeddings": True,
    }
    if classify:
        names = labels if labels and len(labels) == cfg.num_labels else [
            f"LABEL_{i}" for i in range(cfg.num_labels)]
        out.update(id2label={str(i): n for i, n in enumerate(names)},
                   label2id={n: i for i, n in enumerate(names)})
    return out


def write_hf_encoder_folder(model: EncoderForMaskedLM | EncoderForClassification, run_dir: Path,
                            out: Path, *, pad_id: int | None, labels: list[str] | None,
                            dtype: torch.dtype) -> str:
    """config.json, model.safetensors and the tokenizer files of a BERT folder; the architecture."""
    config = bert_hf_config(model, pad_id, labels)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = {k: t.detach().to(dtype).cpu().contiguous()
               for k, t in model.state_dict().items() if k not in _BERT_TIED}
    save_weights(tensors, out)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _export_tokenizer_files(run_dir, out, model.cfg.block_size, None)
    return config["architectures"][0]


def _export_tokenizer_files(run_dir: Path, out: Path, block_size: int,
                            eos_id: int | None) -> None:
    """tokenizer.json and its side files (config, template) from the run; a config if none."""
    shutil.copyfile(run_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    for name in TOKENIZER_SIDE_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    if not (out / "tokenizer_config.json").is_file():
        _write_tokenizer_config(out, block_size, eos_id)


def bert_check_inputs(cfg: EncoderConfig, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention_mask, token_type_ids), each (2, length): the second row ends in padding
    and both rows switch to segment B halfway, so the check covers masks and token types."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, max(1, length - length // 3):] = 0
    types = torch.zeros(2, length, dtype=torch.long)
    if cfg.type_vocab_size > 1:
        types[:, length // 2:] = 1
    return idx, mask, types


def bert_load_back_check(model: EncoderForMaskedLM | EncoderForClassification, folder: Path,
                         dtype: torch.dtype) -> float:
    """Load ``folder`` with transformers (AutoModelForMaskedLM / ...SequenceClassification);
    max |Δlogits| against ``model`` in fp32 on padded, two-segment inputs.

    ``model`` is rounded in place to the written ``dtype`` (kept in fp32), as ``load_back_check``.
    """
    classify = isinstance(model, EncoderForClassification)
    auto = "AutoModelForSequenceClassification" if classify else "AutoModelForMaskedLM"
    theirs = load_exported(auto, folder)
    model.to(dtype).float()
    idx, mask, types = bert_check_inputs(model.cfg, min(model.cfg.block_size, 64))
    with torch.no_grad():
        ours = model.eval()(idx, mask, types)
        ref = theirs.eval()(input_ids=idx, attention_mask=mask, token_type_ids=types).logits
    return (ours - ref).abs().max().item()
