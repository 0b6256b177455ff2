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

from torch import Tensor, nn

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
    """``token_loss`` over packed rows: x is (ids, segments), examples kept apart.

    The model gets the segments (``Decoder.forward``): block-diagonal attention and positions
    restarting per example, so a packed example's loss equals its loss alone.
    """

    def loss_fn(model: nn.Module, x: tuple[Tensor, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        ids, segments = x
        logits = model(ids, segments=segments)  # (B, T, V)
        return summed_cross_entropy(logits, y, label_smoothing), label_count(y)

    return loss_fn


def causal_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """Next-token cross-entropy of a decoder (x: ids (B, T), y: next ids, -100 = no loss)."""
    return token_loss(label_smoothing)


def mean_loss(loss_fn: LossFn, model: nn.Module, x: Any, y: Tensor) -> Tensor:
    """The per-token mean of one batch, for tests and one-off evaluations."""
    total, count = loss_fn(model, x, y)
    return total / count.clamp(min=1)
