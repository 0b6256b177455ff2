"""AdamW with weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: matrices (ndim >= 2) decay; norms and biases do not.

    Decaying gains and biases pulls them toward zero for no benefit (GPT-3, nanoGPT). Tied
    parameters appear once because ``named_parameters`` de-duplicates shared tensors.
    """
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, configured by ``cfg``.

    The fused implementation (one kernel for all parameters) is used for plain tensors: on
    llama-6m with one CPU thread it cut the optimizer step from 71 ms to 20 ms (foreach: 113 ms;
    benchmarks/, 2026-11-22). Sharded (FSDP2 DTensor) parameters keep the default path.
    """
    from torch.distributed.tensor import DTensor

    groups = param_groups(model, cfg.weight_decay)
    plain = all(not isinstance(p, DTensor) for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True if plain else None,
    )
