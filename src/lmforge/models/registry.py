"""Named decoder presets, looked up by exact name.

A preset is a ``DecoderConfig``; fields it does not set keep the config's defaults (the
Llama family). ``vocab_size`` is only a default: the pretrain recipe replaces it with its
tokenizer's size. Parameter counts below are at the preset's own vocab_size.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from lmforge.config import ConfigError
from lmforge.models.decoder import DecoderConfig


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


def _presets() -> dict[str, Callable[[], DecoderConfig]]:
    # Built per call (not a module-level dict) so nothing mutable is shared between callers.
    return {
        "llama-1m": _llama_1m,
        "llama-6m": _llama_6m,
        "llama-15m": _llama_15m,
        "gpt2-124m": _gpt2_124m,
    }


def preset_names() -> list[str]:
    """Every preset name, in a stable order."""
    return list(_presets())


def preset(name: str) -> DecoderConfig:
    """A fresh ``DecoderConfig`` for preset ``name`` (exact match only)."""
    presets = _presets()
    if name not in presets:
        near = difflib.get_close_matches(name, list(presets), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(
            f"model preset: unknown name {name!r}{hint}; valid names: {', '.join(presets)}"
        )
    return presets[name]()
