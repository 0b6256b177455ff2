"""Loss curves and sweep results as PNG (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.utils.io import atomic_write_bytes


def plot_loss_curve(records: list[dict[str, Any]], out: Path, title: str = "",
                    baseline: float | None = None) -> None:
    """Train loss (per log step) and val loss (per eval) against tokens seen."""

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
    _save_png(fig, out)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """Val loss against the first option, one line per value of the second (atomic PNG)."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(rows[0]["settings"])
    xs = list(dict.fromkeys(r["settings"][keys[0]] for r in rows))
    numeric = _numeric(xs)
    pos = {x: (x if numeric else i) for i, x in enumerate(xs)}
    series = dict.fromkeys(r["settings"][keys[1]] for r in rows) if len(keys) > 1 else {None: 0}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for s in series:
        pts = [(pos[r["settings"][keys[0]]], r["val_loss"]) for r in rows
               if (s is None or r["settings"][keys[1]] == s) and r["val_loss"] is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=None if s is None else f"{keys[1]}={s}")
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log")  # learning rates and sizes are swept in ratios
        ax.minorticks_off()
    ax.set_xticks([pos[x] for x in xs], [f"{x:g}" if numeric else str(x) for x in xs])
    diverged = sum(r["error"] is not None for r in rows)
    ax.set_title(title + (f" ({diverged} diverged)" if diverged else ""))
    ax.set_xlabel(keys[0])
    ax.set_ylabel("val loss (nats/token)")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend()
    _save_png(fig, out)


def _save_png(fig: Any, out: Path) -> None:
    """Write a finished figure as PNG atomically and free it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
