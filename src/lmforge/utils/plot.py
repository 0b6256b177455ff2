"""Loss curves as PNG (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.utils.io import atomic_write_bytes


def plot_loss_curve(records: list[dict[str, Any]], out: Path, title: str = "",
                    baseline: float | None = None) -> None:
    """Train loss (per log step) and val loss (per eval) against tokens seen."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in records if r.get("kind") == "train"
             and r.get("loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("kind") == "eval"
           and r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.8, ms=4)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
