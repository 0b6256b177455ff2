"""Named model presets of the three families, looked up by exact name.

A preset is a ``DecoderConfig`` (decoder-only), an ``EncoderConfig`` (encoder-only, BERT) or a
``Seq2SeqConfig`` (encoder-decoder); fields it does not set keep the config's defaults.
``vocab_size`` is only a default: the pretrain recipe replaces it with its tokenizer's size.
Parameter counts below are at the preset's own vocab_size (encoders: with the masked-LM head).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Literal

from lmforge.config import ConfigError
from lmforge.models.decoder import DecoderConfig
from lmforge.models.encoder import EncoderConfig
from lmforge.models.seq2seq import Seq2SeqConfig

Family = Literal["decoder", "encoder", "seq2seq"]
ModelConfig = DecoderConfig | EncoderConfig | Seq2SeqConfig


def _llama_1m() -> DecoderConfig:
    # 1,311,872 params (524,288 of them the tied 4096x128 embedding); GQA with 2 KV heads.
    return DecoderConfig(
        vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=128
    )


def _llama_6m() -> DecoderConfig:
    # 5,868,800 params (1,048,576 embedding).
    return DecoderConfig(vocab_size=4096, block_size=256, n_layer=6, n_head=8, n_embd=256)


def _llama_15m() -> DecoderConfig:
    # 15,735,168 params (1,572,864 embedding).
    return DecoderConfig(vocab_size=4096, block_size=512, n_layer=8, n_head=6, n_embd=384)


def _gpt2_124m() -> DecoderConfig:
    # GPT-2 small (Radford et al. 2019): 124,439,808 params with the tied 50257x768 embedding.
    return DecoderConfig(
        vocab_size=50257,
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        norm="layernorm",
        pos="learned",
        mlp="gelu",
        bias=True,
        tie_embeddings=True,
    )


# Encoders: the compact BERT shapes of Turc et al. 2019 (tiny/mini/small) at vocab 4096 and
# 256 positions, and BERT-base itself.


def _bert_tiny() -> EncoderConfig:
    # 2 layers x 128: 974,976 params with the masked-LM head (524,288 the tied embedding).
    return EncoderConfig(vocab_size=4096, block_size=256, n_layer=2, n_head=2, n_embd=128)


def _bert_mini() -> EncoderConfig:
    # 4 layers x 256: 4,344,576 params with the masked-LM head (1,048,576 embedding).
    return EncoderConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256)


def _bert_small() -> EncoderConfig:
    # 4 layers x 512: 15,107,584 params with the masked-LM head.
    return EncoderConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=8, n_embd=512)


def _bert_base() -> EncoderConfig:
    # BERT-base (Devlin et al. 2018): 109,514,298 params as HF BertForMaskedLM
    # (bert-base-uncased vocabulary 30522, 512 positions).
    return EncoderConfig(vocab_size=30522, block_size=512, n_layer=12, n_head=12, n_embd=768)


# Encoder-decoders: the Transformer of Vaswani et al. 2017, post-norm, shared embeddings.


def _transformer_tiny() -> Seq2SeqConfig:
    # 2 + 2 layers x 128: 1,449,984 params (524,288 the shared embedding).
    return Seq2SeqConfig(vocab_size=4096, block_size=128, n_encoder_layer=2, n_decoder_layer=2,
                         n_head=4, n_embd=128)


def _transformer_small() -> Seq2SeqConfig:
    # 3 + 3 layers x 256: 6,578,176 params.
    return Seq2SeqConfig(vocab_size=4096, block_size=256, n_encoder_layer=3, n_decoder_layer=3,
                         n_head=4, n_embd=256)


def _transformer_base() -> Seq2SeqConfig:
    # The paper's base model: 6 + 6 layers, d_model 512, 8 heads, d_ff 2048, a shared
    # 37,000-token BPE vocabulary (WMT14 en-de), P_drop 0.1: 63,082,496 params (the paper's
    # table 3 says 65M).
    return Seq2SeqConfig(vocab_size=37000, block_size=512, n_encoder_layer=6, n_decoder_layer=6,
                         n_head=8, n_embd=512)


def _families() -> dict[Family, dict[str, Callable[[], ModelConfig]]]:
    # Built per call (not a module-level dict) so nothing mutable is shared between callers.
    return {
        "decoder": {
            "llama-1m": _llama_1m,
            "llama-6m": _llama_6m,
            "llama-15m": _llama_15m,
            "gpt2-124m": _gpt2_124m,
        },
        "encoder": {
            "bert-tiny": _bert_tiny,
            "bert-mini": _bert_mini,
            "bert-small": _bert_small,
            "bert-base": _bert_base,
        },
        "seq2seq": {
            "transformer-tiny": _transformer_tiny,
            "transformer-small": _transformer_small,
            "transformer-base": _transformer_base,
        },
    }


def preset_names(family: Family = "decoder") -> list[str]:
    """Every preset name of ``family`` (decoder-only by default), in a stable order."""
    return list(_families()[family])


def all_preset_names() -> list[str]:
    """Every preset name of every family: decoders, then encoders, then encoder-decoders."""
    return [name for presets in _families().values() for name in presets]


def preset_family(name: str) -> Family:
    """The family a preset belongs to (exact name; ConfigError if unknown)."""
    for family, presets in _families().items():
        if name in presets:
            return family
    raise _unknown(name, all_preset_names())


def preset(name: str, family: Family | None = None) -> ModelConfig:
    """A fresh config for preset ``name`` (exact match only).

    With ``family``, a preset of another family is a ConfigError naming the right ones.
    """
    found = preset_family(name)
    if family is not None and found != family:
        raise ConfigError(
            f"preset: {name!r} is a {found} preset but a {family} model is needed here; "
            f"use one of {', '.join(preset_names(family))}"
        )
    return _families()[found][name]()


def _unknown(name: str, names: list[str]) -> ConfigError:
    near = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return ConfigError(f"model preset: unknown name {name!r}{hint}; valid names: {', '.join(names)}")
