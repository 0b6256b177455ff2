"""NF4 storage for QLoRA: close to the fp32 weights, 7x smaller, frozen."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.quant import (
    NF4_LEVELS,
    NF4Linear,
    nf4_dequantize,
    nf4_quantize,
    quantize_nf4,
    storage_bytes,
)


def test_levels_round_trip_exactly() -> None:
    w = torch.tensor(NF4_LEVELS * 8).reshape(2, 64) * 3.0
    packed, absmax = nf4_quantize(w)
    assert packed.dtype == torch.uint8 and packed.numel() == 64
    assert torch.equal(nf4_dequantize(packed, absmax, w.shape), w)


def test_nf4_linear_is_close_and_has_no_trainable_weight() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    q = NF4Linear(linear)
    x = torch.randn(4, 128)
    rel = (q(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.12, rel  # 4 bits: ~10% relative error on random weights
    assert all(not p.requires_grad for p in q.parameters())


def test_quantize_model_skips_tied_head_and_saves_memory() -> None:
    model = Decoder(DecoderConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64))
    model.init_weights(torch.Generator().manual_seed(0))
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and n != "lm_head")
    before = storage_bytes(model)
    names = quantize_nf4(model)
    assert "lm_head" not in names and len(names) == 14
    saved = before - storage_bytes(model)
    assert saved > 0.85 * linear_bytes  # 0.5625 of 4 bytes kept per weight
    assert model(torch.randint(0, 64, (1, 8))).shape == (1, 8, 64)
