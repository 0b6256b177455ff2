"""List training runs with their status and final metrics, or show one run's curves."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmforge.checkpoint import latest_checkpoint, read_meta
from lmforge.config import UserError
from lmforge.utils.logging import read_metrics
from lmforge.utils.plot import plot_loss_curve

EXAMPLES = """
lmforge runs                          # every run under runs/
lmforge runs --show shakespeare       # one run: its evaluations, and loss.png redrawn
"""

ACTIVE_SECONDS = 120  # metrics written this recently: the run is (probably) still going


@dataclass
class Config:
    """Options of `lmforge runs`."""

    runs_dir: str = "runs"
    """Folder that holds the runs."""
    show: str = ""
    """Name of one run to show in detail (its evaluations and a freshly drawn loss.png)."""


def run_status(run_dir: Path) -> dict[str, Any]:
    """Status and headline numbers of one run folder, from the files it wrote."""
    summary_path = run_dir / "summary.json"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    ckpt = latest_checkpoint(run_dir)
    step = int(read_meta(ckpt).get("step", 0)) if ckpt else 0
    evals = [r for r in metrics if r.get("kind") == "eval"]
    info: dict[str, Any] = {"run": run_dir.name, "step": step,
                            "val_loss": evals[-1].get("val_loss") if evals else None}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        info.update(status="finished", step=summary.get("steps", step),
                    val_loss=summary.get("val_loss"), seconds=summary.get("seconds"))
        return info
    mtime = (run_dir / "metrics.jsonl").stat().st_mtime if metrics else 0
    active = time.time() - mtime < ACTIVE_SECONDS
    # --resume needs the optimizer state; an import (or an older fine-tune) saved weights only.
    resumable = ckpt is not None and read_meta(ckpt).get("optimizer") is not None
    info["status"] = ("running" if active else "stopped (resumable)" if resumable
                      else "weights only" if ckpt else "no checkpoint")
    return info


def main(cfg: Config) -> int:
    """Print the table of runs, or the detail of one."""
    root = Path(cfg.runs_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no runs folder here; train one with `lmforge pretrain`")
    console = Console()
    if cfg.show:
        return _show(console, root / cfg.show)
    runs = sorted(p for p in root.iterdir() if (p / "config.yaml").is_file())
    table = Table(title=f"runs in {root}")
    for col in ("run", "status", "step", "val loss", "time"):
        table.add_column(col, justify="right" if col in ("step", "val loss", "time") else "left")
    for run_dir in runs:
        s = run_status(run_dir)
        loss = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "-"
        secs = f"{s['seconds']:.0f} s" if s.get("seconds") is not None else "-"
        table.add_row(s["run"], s["status"], str(s["step"]), loss, secs)
    console.print(table if runs else f"no runs in {root}")
    return 0


def _show(console: Console, run_dir: Path) -> int:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml); see `lmforge runs`")
    s = run_status(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    table = Table(title=f"{run_dir.name}: {s['status']}, step {s['step']}")
    for col in ("step", "tokens", "val loss", "perplexity", "bits/byte"):
        table.add_column(col, justify="right")
    for r in (r for r in metrics if r.get("kind") == "eval"):
        table.add_row(str(r["step"]), f"{r['tokens']:,}", f"{r.get('val_loss', 0):.4f}",
                      f"{r.get('val_ppl', 0):.2f}", f"{r.get('val_bpb', 0):.4f}")
    console.print(table)
    if metrics:
        plot_loss_curve(metrics, run_dir / "loss.png", title=run_dir.name)
        console.print(f"curves: {run_dir / 'loss.png'}  (tensorboard --logdir {run_dir.parent})")
    return 0
