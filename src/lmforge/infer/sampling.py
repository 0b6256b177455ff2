"""Choosing the next token from logits: greedy, temperature, top-k, top-p. Pure functions."""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import ConfigError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ConfigError naming the bad option, if any."""
    if not temperature >= 0.0:  # also rejects NaN
        raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k: must be >= 1 or null (no top-k), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p: must be in (0, 1] or null (no nucleus), got {top_p}")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set all but the ``k`` largest logits of each row (B, V) to -inf; ties at the cut stay."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``p`` (Holtzman et al. 2019).

    A token is dropped when the mass of the tokens ranked above it already reaches ``p``;
    so the most likely token is always kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # (B, V): mass strictly before each token
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from logits (B, V).

    temperature 0 is greedy argmax. Otherwise, in HF's order: divide by temperature, keep the
    top-k, keep the top-p nucleus of what remains, then draw with ``generator``.
    """
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    # fp32 so that a bf16 model's softmax and cumsum do not lose the tail of the distribution.
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
