"""NF4 storage for QLoRA: close to the fp32 weights, 7x smaller, frozen; bitsandbytes' and
the plain-PyTorch fallback build, load and dequantize alike."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.quant import (
    NF4_LEVELS,
    BnbNF4Linear,
    NF4Linear,
    bitsandbytes_available,
    dequantize_nf4,
    nf4_backend,
    nf4_dequantize,
    nf4_matrix_bytes,
    nf4_quantize,
    nf4_summary,
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
    x = torch.randn(4, 128)  # double quantization adds little error to the 4-bit codes
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
    assert saved > 0.85 * linear_bytes  # 0.516 of 4 bytes kept per weight
    assert model(torch.randint(0, 64, (1, 8))).shape == (1, 8, 64)


BACKENDS = ["torch", pytest.param("bitsandbytes", marks=pytest.mark.skipif(
    not bitsandbytes_available(), reason="bitsandbytes is not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_built_on_meta_then_loaded_equals_built_from_the_weight(backend: str,
                                                                double_quant: bool) -> None:
    """The training setup's path (meta build, to_empty, load_weight) gives the same layer as
    quantizing a real one; bytes are nf4_matrix_bytes; dequantize_nf4 gives a plain Linear."""
    torch.manual_seed(0)
    linear = nn.Linear(320, 96)
    layer = BnbNF4Linear if backend == "bitsandbytes" else NF4Linear
    direct = layer(linear, double_quant)
    with torch.device("meta"):
        lazy = layer(nn.Linear(320, 96), double_quant)
    lazy.to_empty(device="cpu")
    lazy.load_weight(linear.weight)
    lazy.bias.data.copy_(linear.bias)
    x = torch.randn(3, 320)
    assert torch.equal(lazy(x), direct(x))
    assert storage_bytes(direct) == nf4_matrix_bytes(320 * 96, double_quant) + 4 * 96
    rel = (direct(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.12, rel
    model = nn.Sequential(copy.deepcopy(direct))
    dequantize_nf4(model)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, direct.dequantize())
    with pytest.raises(ValueError, match="shape"):
        lazy.load_weight(torch.zeros(96, 64))


@pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes is not installed")
def test_both_backends_store_the_same_codes_and_close_weights() -> None:
    """Same NF4 levels and blocks: identical 4-bit codes; the 8-bit block maxima differ only by
    their 8-bit maps (bitsandbytes' dynamic map vs symmetric int8)."""
    torch.manual_seed(1)
    linear = nn.Linear(256, 128, bias=False)
    ours, theirs = NF4Linear(linear, False), BnbNF4Linear(linear, False)
    assert torch.equal(ours.codes, theirs.codes.flatten())
    assert torch.equal(ours.dequantize(), theirs.dequantize())
    ours, theirs = NF4Linear(linear, True), BnbNF4Linear(linear, True)
    diff = (ours.dequantize() - theirs.dequantize()).abs().max()
    assert diff < 0.02 * linear.weight.abs().max(), diff


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.config import UserError
    from lmforge.models import quant

    assert nf4_backend("torch") == "torch"
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    assert nf4_backend("auto") == "torch"
    with pytest.raises(UserError, match="lmforge\\[qlora\\]"):
        nf4_backend("bitsandbytes")
    model = nn.Sequential(nn.Linear(64, 64))
    quantize_nf4(model)
    assert type(model[0]) is NF4Linear and nf4_summary(model)["backend"] == "torch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_recomputes_the_weight_instead_of_keeping_it(backend: str) -> None:
    """Nothing weight-sized is saved for backward (else QLoRA holds the fp32 base again), and
    the input gradient equals that of a plain layer with the dequantized weight."""
    torch.manual_seed(0)
    layer = (BnbNF4Linear if backend == "bitsandbytes" else NF4Linear)(nn.Linear(128, 64))
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    x = torch.randn(3, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert torch.Size((64, 128)) not in saved and torch.Size((128, 64)) not in saved
    y.pow(2).sum().backward()
    plain = nn.Linear(128, 64)
    plain.weight.data, plain.bias.data = layer.dequantize(), layer.bias.detach().clone()
    x2 = x.detach().clone().requires_grad_()
    plain(x2).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
