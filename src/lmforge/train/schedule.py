"""Learning-rate schedule: linear warmup, then cosine decay to a floor (pure functions)."""

from __future__ import annotations

import math


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
