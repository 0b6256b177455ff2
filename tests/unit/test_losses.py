"""train/losses.py: the chunked head + cross-entropy equals the plain one, values and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.losses import causal_lm_loss, linear_cross_entropy, summed_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_equals_cross_entropy_on_full_logits(smoothing: float) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(600, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (600,), generator=g)
    y[::7] = -100  # ignored rows, in several chunks
    got = linear_cross_entropy(h, w, y, chunk=128, label_smoothing=smoothing)
    dh, dw = torch.autograd.grad(got * 0.5, (h, w))
    want = nn.functional.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum",
                                       label_smoothing=smoothing)
    eh, ew = torch.autograd.grad(want * 0.5, (h, w))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    # the log-softmax runs in fp32 whatever the input dtype: fp32 rounding is the yardstick
    torch.testing.assert_close(dh, eh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, ew, rtol=1e-5, atol=1e-6)


def test_decoder_loss_takes_the_chunked_path_and_matches_full_logits() -> None:
    cfg = DecoderConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    x = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, 1)
    y[0, :15] = -100
    total, count = causal_lm_loss()(model, x, y)
    total.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = summed_cross_entropy(model(x), y)
    want.backward()
    assert int(count) == int((y != -100).sum())
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
