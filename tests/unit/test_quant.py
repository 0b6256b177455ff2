"""Quantized inference: layers close to fp32, and perplexity of a trained model within 2%."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import UserError
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.tokenizer import encode_batch, train_bpe, vocab_size_of
from lmforge.infer.generate import generate
from lmforge.infer.quant import METHODS, Int4Linear, Int8Linear, quantize
from lmforge.models.decoder import Decoder, DecoderConfig

SEQ = 64


@pytest.mark.parametrize(("cls", "tolerance"), [(Int8Linear, 0.01), (Int4Linear, 0.15)])
def test_quantized_linear_is_close_to_fp32(cls: type[nn.Module], tolerance: float) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True)
    x = torch.randn(3, 5, 128)  # leading dims are kept
    exact, approx = linear(x), cls(linear)(x)
    assert approx.shape == exact.shape
    relative = (approx - exact).norm() / exact.norm()
    assert relative < tolerance
    assert relative > 1e-6  # it really is quantized


def test_int8_weights_are_int8_and_round_trip() -> None:
    linear = nn.Linear(16, 4, bias=False)
    q = Int8Linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    dequantized = q.weight_int8.float() * q.scale[:, None]
    assert (dequantized - linear.weight).abs().max() <= q.scale.max() / 2 + 1e-7


@pytest.fixture(scope="module")
def trained() -> tuple[Decoder, torch.Tensor]:
    """A tiny Llama trained for a few seconds on pydoc text, and held-out token windows."""
    texts = [t for _, t in sorted(pydoc_topics_text().items())[:80]]
    tok = train_bpe(texts, 512)
    ids = torch.tensor([i for row in encode_batch(tok, texts) for i in row])
    train, val = ids[:-20 * SEQ], ids[-20 * SEQ - 1 :]
    cfg = DecoderConfig(vocab_size=vocab_size_of(tok), block_size=SEQ, n_layer=2, n_head=4,
                        n_kv_head=2, n_embd=64)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        starts = torch.randint(0, len(train) - SEQ - 1, (8,), generator=gen)
        x = torch.stack([train[s : s + SEQ + 1] for s in starts])  # (8, SEQ+1)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), val


@torch.no_grad()
def perplexity(model: nn.Module, val: torch.Tensor) -> float:
    n = (len(val) - 1) // SEQ
    x, y = val[: n * SEQ].view(n, SEQ), val[1 : n * SEQ + 1].view(n, SEQ)
    return math.exp(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())


@pytest.mark.parametrize("method", METHODS)
def test_perplexity_within_two_percent(trained: tuple[Decoder, torch.Tensor],
                                       method: str) -> None:
    model, val = trained
    base = perplexity(model, val)
    assert base < 200  # it learned something: a uniform guess is ~512
    quantized = quantize(copy.deepcopy(model), method)
    assert not any(type(m) is nn.Linear for m in quantized.modules())  # every layer replaced
    assert quantized.tok_emb.weight.dtype == torch.float32  # the tied embedding is kept
    ratio = perplexity(quantized, val) / base
    assert abs(ratio - 1) < 0.02, ratio
    out = list(generate(quantized, [1, 2, 3], 5, temperature=0.0))  # decoding works too
    assert len(out) == 5


def test_unknown_method_is_a_user_error() -> None:
    model = Decoder(DecoderConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(UserError, match="int8"):
        quantize(model, "int3")
