"""Language-model evaluation: mean cross-entropy, perplexity and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def lm_loss(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats/token) over ``batches``, and the token count.

    Sums per-token losses rather than averaging batch means, so a short last batch is weighted
    by its true size.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, T, V)
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((y != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate")
    return total / count, count


def text_windows(ids: Tensor, block_size: int) -> list[tuple[Tensor, Tensor]]:
    """Batches (x, y) of one row that cover a token stream (T,) in disjoint windows of
    ``block_size`` predictions, each conditioned on its own window only; the first token is
    not predicted."""
    window = block_size + 1
    chunks = [ids[k: k + window] for k in range(0, len(ids) - 1, window - 1)]
    return [(c[:-1][None], c[1:][None]) for c in chunks if len(c) > 1]


def lm_metrics(loss: float, bytes_per_token: float | None) -> dict[str, float]:
    """Perplexity = exp(loss); bits per byte = loss / ln 2 / (bytes per token).

    Bits per byte does not depend on the tokenizer, so it compares models with different
    vocabularies (a loss in nats/token does not).
    """
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        out["val_bpb"] = loss / math.log(2) / bytes_per_token
    return out


def make_lm_evaluator(
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]], bytes_per_token: float | None
) -> Callable[[nn.Module], dict[str, float]]:
    """The ``evaluate`` callable the training loop receives: a fresh pass over fixed val batches."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        loss, _ = lm_loss(model, batches())
        return lm_metrics(loss, bytes_per_token)

    return evaluate
