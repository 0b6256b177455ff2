"""Learning-rate schedule: linear warmup, then cosine decay to a floor (pure functions)."""

from __future__ import annotations

import dataclasses
import math

from lmforge.config import ConfigError, OptimConfig, TrainConfig


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    Warmup is linear from ``peak / warmup`` at step 0 to ``peak`` at step ``warmup - 1`` — it never
    starts at exactly 0, which would waste the first step. Then cosine decay reaches
    ``peak * min_ratio`` at step ``total`` and stays there (a floor rather than zero keeps late
    steps useful; Chinchilla decays to 10%).
    """
    floor = peak * min_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return floor
    span = max(1, total - warmup)
    progress = (step - warmup) / span
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def _ceil(x: float) -> int:
    # 0.7 * 10 is 7.000000000000001 in floating point: round off that noise before rounding up.
    return math.ceil(round(x, 9))


def resolve_steps(train_cfg: TrainConfig, optim_cfg: OptimConfig,
                  steps_per_epoch: float) -> tuple[int, int]:
    """(max_steps, warmup_steps) of a run: from train.epochs / optim.warmup_ratio when set.

    ``steps_per_epoch`` is the train split over what one optimizer step consumes (it may be a
    fraction). Both counts round up, so a run never stops short of the epochs asked for, and
    a run has at least one step.
    """
    max_steps = train_cfg.max_steps
    if train_cfg.epochs is not None:
        if not steps_per_epoch > 0:
            raise ConfigError(f"train.epochs: the train split makes {steps_per_epoch} steps "
                              "per epoch; add data or give train.max_steps instead")
        max_steps = max(1, _ceil(train_cfg.epochs * steps_per_epoch))
    warmup = optim_cfg.warmup_steps
    if optim_cfg.warmup_ratio is not None:
        warmup = _ceil(optim_cfg.warmup_ratio * max_steps)
    return max_steps, warmup


def resolved(train_cfg: TrainConfig, optim_cfg: OptimConfig,
             steps_per_epoch: float) -> tuple[TrainConfig, OptimConfig]:
    """Copies of the sections with ``resolve_steps``'s counts and epochs / warmup_ratio null.

    The loop reads only max_steps and warmup_steps; the copies are also what the run saves, so
    its config.yaml reproduces the run (and sets only one option of each pair).
    """
    max_steps, warmup = resolve_steps(train_cfg, optim_cfg, steps_per_epoch)
    return (dataclasses.replace(train_cfg, max_steps=max_steps, epochs=None),
            dataclasses.replace(optim_cfg, warmup_steps=warmup, warmup_ratio=None))
