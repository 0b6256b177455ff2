"""Every preset builds, its count is predicted exactly, and lookup is by exact name only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.models.decoder import Decoder, DecoderConfig, count_params
from lmforge.models.registry import preset, preset_names

EXPECTED = {
    "llama-1m": 1_311_872,
    "llama-6m": 5_868_800,
    "llama-15m": 15_735_168,
    "gpt2-124m": 124_439_808,  # GPT-2 small, as published by HF
}


def test_names_are_the_documented_set() -> None:
    assert preset_names() == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_preset_builds_with_predicted_count(name: str) -> None:
    cfg = preset(name)
    assert isinstance(cfg, DecoderConfig)
    with torch.device("meta"):  # no memory, no init cost, even for gpt2-124m
        model = Decoder(cfg)
    assert model.num_params() == count_params(cfg) == EXPECTED[name]


def test_gpt2_124m_shape() -> None:
    cfg = preset("gpt2-124m")
    shape = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.block_size)
    assert shape == (12, 768, 12, 50257, 1024)
    family = (cfg.norm, cfg.pos, cfg.mlp, cfg.bias, cfg.tie_embeddings)
    assert family == ("layernorm", "learned", "gelu", True, True)
    assert count_params(cfg) == 124_439_808


def test_smallest_preset_runs_forward() -> None:
    model = Decoder(preset("llama-1m")).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 5, dtype=torch.long))
    assert out.shape == (1, 5, 4096)


def test_each_call_returns_a_fresh_copy() -> None:
    a = preset("llama-6m")
    a.n_layer = 99
    assert preset("llama-6m").n_layer == 6


def test_vocab_can_be_replaced() -> None:
    cfg = dataclasses.replace(preset("llama-6m"), vocab_size=8000)
    assert count_params(cfg) - EXPECTED["llama-6m"] == (8000 - 4096) * 256


@pytest.mark.parametrize("bad", ["llama", "LLAMA-6M", "llama-6m ", "gpt2", "6m", ""])
def test_unknown_or_partial_name_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="valid names: llama-1m, llama-6m") as info:
        preset(bad)
    assert "\n" not in str(info.value)


def test_close_name_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'llama-15m'"):
        preset("llama-15M")
