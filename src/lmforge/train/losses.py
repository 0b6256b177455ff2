"""Training objectives: each loss function returns (sum, count), never a mean.

The loop divides the summed loss by the number of labelled tokens of the whole optimizer step —
over every micro-batch and every data-parallel rank — so a micro-batch with 3 labelled tokens
weighs 3/300 of one with 300, and gradient accumulation or more ranks do not change the result
(torchtitan's global valid-token normalization; the Hugging Face Trainer's 2024 fix). Labels
equal to ``IGNORE`` (-100) carry no loss: prompt tokens, padding, unmasked MLM positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.models.decoder import Decoder

IGNORE = -100
LossFn = Callable[[nn.Module, Any, Tensor], tuple[Tensor, Tensor]]
"""(model, inputs, labels) -> (summed loss over labelled positions, their count)."""


def label_count(y: Tensor) -> Tensor:
    """Labelled positions of a batch's labels (tokens for LMs, rows for classification)."""
    return (y != IGNORE).sum()


def summed_cross_entropy(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy summed over labelled positions; logits (..., V), labels (...)."""
    # fp32 logits: a bf16 log-softmax over a large vocabulary loses the small probabilities
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), y.flatten(),
                                       ignore_index=IGNORE, label_smoothing=label_smoothing,
                                       reduction="sum")


def _forward(model: nn.Module, x: Any) -> Tensor:
    """The model on a batch input: one tensor, or a tuple of positional arguments."""
    return model(*x) if isinstance(x, tuple) else model(x)


def token_loss(label_smoothing: float = 0.0) -> LossFn:
    """Next-token / masked-token / target-token cross-entropy for models returning (B, T, V)
    (decoder, masked LM, encoder-decoder: their batches already hold the shifted labels), and
    class cross-entropy for classifiers returning (B, num_labels) with labels (B,)."""

    def loss_fn(model: nn.Module, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        return summed_cross_entropy(_forward(model, x), y, label_smoothing), label_count(y)

    return loss_fn


def packed_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """``causal_lm_loss`` over packed rows: x is (ids, segments), examples kept apart.

    The model gets the segments (``Decoder.forward``): block-diagonal attention and positions
    restarting per example, so a packed example's loss equals its loss alone.
    """
    return _decoder_loss(label_smoothing, packed=True)


def causal_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """Next-token cross-entropy of a decoder (x: ids (B, T), y: next ids, -100 = no loss).

    With a plain linear head the logits are never materialized whole: the head and the loss
    run in chunks of rows (``linear_cross_entropy``; 1.15-1.2x the llama-1m CPU step,
    benchmarks/). Other heads (LoRA, sharded) take the full-logits path.
    """
    return _decoder_loss(label_smoothing, packed=False)


def _decoder_loss(label_smoothing: float, packed: bool) -> LossFn:
    def loss_fn(model: nn.Module, x: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        ids, kwargs = (x[0], {"segments": x[1]}) if packed else (x, {})
        head = _plain_head(model)
        if head is None:
            logits = model(ids, **kwargs)  # (B, T, V)
            return summed_cross_entropy(logits, y, label_smoothing), label_count(y)
        h = model(ids, hidden=True, **kwargs)  # (B, T, C)
        total = linear_cross_entropy(h.flatten(0, 1), head.weight, y.flatten(),
                                     label_smoothing=label_smoothing)
        return total, label_count(y)

    return loss_fn


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The decoder's output layer when it is an ordinary bias-free nn.Linear on plain tensors."""
    inner = getattr(model, "module", model)  # DDP
    head = getattr(inner, "lm_head", None) if isinstance(inner, Decoder) else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    from torch.distributed.tensor import DTensor

    return None if isinstance(head.weight, DTensor) else head


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ w.T`` against ``y``, computed one chunk of rows at a time.

    The (N, V) logits never exist whole: each chunk's log-probabilities become its gradient in
    place (softmax minus the smoothed one-hot) and are multiplied out at once into dh and dw,
    so forward does the backward work and backward only scales. A chunk of 256 rows x 4096
    vocabulary (4 MiB) stays in cache.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, y: Tensor, chunk: int,
                label_smoothing: float) -> Tensor:
        grads = any(ctx.needs_input_grad[:2])
        valid_all = y != IGNORE  # (N,)
        dh = torch.empty_like(h) if grads else None  # (N, C)
        dw = torch.zeros_like(w) if grads else None  # (V, C)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        eps, vocab = label_smoothing, w.shape[0]
        for s in range(0, h.shape[0], chunk):
            hc, valid = h[s:s + chunk], valid_all[s:s + chunk]  # (n, C), (n,)
            tgt = y[s:s + chunk].masked_fill(~valid, 0)[:, None]  # (n, 1)
            logp = torch.log_softmax((hc @ w.t()).float(), dim=-1)  # (n, V)
            nll = -logp.gather(1, tgt).squeeze(1)  # (n,)
            if eps:
                nll = (1 - eps) * nll - eps / vocab * logp.sum(-1)
            total += (nll * valid).sum()
            if dh is None or dw is None:
                continue
            grad = logp.exp_()  # softmax, in place of the log-probabilities
            grad.scatter_add_(1, tgt, torch.full_like(tgt, eps - 1, dtype=grad.dtype))
            if eps:
                grad.sub_(eps / vocab)
            grad.mul_(valid[:, None])  # ignored rows: 0
            grad = grad.to(hc.dtype)
            dh[s:s + chunk] = grad @ w.to(hc.dtype)
            dw.addmm_(grad.t().to(dw.dtype), hc.to(dw.dtype))
        ctx.save_for_backward(dh, dw)
        return total

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:
        dh, dw = ctx.saved_tensors
        return dh * g, dw * g, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, y: Tensor, chunk: int = 256,
                         label_smoothing: float = 0.0) -> Tensor:
    """``cross_entropy(h @ weight.T, y, reduction="sum")`` over targets != -100, without ever
    holding the whole (N, V) logits; h (N, C), weight (V, C), y (N,)."""
    return _LinearCrossEntropy.apply(h, weight, y, chunk, label_smoothing)


def mean_loss(loss_fn: LossFn, model: nn.Module, x: Any, y: Tensor) -> Tensor:
    """The per-token mean of one batch, for tests and one-off evaluations."""
    total, count = loss_fn(model, x, y)
    return total / count.clamp(min=1)
