"""`lmforge eval`: evaluate a run (and a baseline), write eval_<name>.json, print a table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lmforge.api import Classifier
from lmforge.api import load as load_api
from lmforge.config import UserError
from lmforge.evaluation.metrics import (
    chat_metrics,
    class_eval,
    harness_eval,
    is_text,
    memorization_eval,
    text_metrics,
)
from lmforge.evaluation.options import Config
from lmforge.run import load_model, read_run_spec


def _output_name(path: Path, cfg: Config) -> str:
    if cfg.harness is not None:
        return "eval_harness.json"
    if cfg.memorization:
        # one file per kind of sample, so the train/val/from-start reports sit side by side
        split = "" if cfg.mem_split == "train" else f"_{cfg.mem_split}"
        return f"eval_memorization{split}{'_starts' if cfg.mem_from_start else ''}.json"
    return f"eval_{path.stem}.json"


def evaluate_run(run: str, path: Path, cfg: Config) -> dict[str, Any]:
    """Every metric of one run on ``path`` (or the harness, or memorization); written to
    <run>/eval_<name>.json."""
    from lmforge.utils.io import atomic_write_json

    spec = read_run_spec(run)
    t0 = time.time()
    if cfg.harness is not None or cfg.memorization:
        loaded = load_model(run, cfg.device, cfg.dtype, cfg.quant)
        metrics = (harness_eval(loaded, cfg) if cfg.harness is not None
                   else memorization_eval(loaded, cfg))
    elif spec.kind == "classifier":
        clf = load_api(run, device=cfg.device, dtype=cfg.dtype, quant=cfg.quant)
        assert isinstance(clf, Classifier)
        metrics = class_eval(clf, path, cfg)
    else:
        loaded = load_model(run, cfg.device, cfg.dtype, cfg.quant)
        metrics = (text_metrics(loaded, path, cfg) if is_text(path)
                   else chat_metrics(loaded, path, cfg))
    result = {"run": str(spec.run_dir), "checkpoint": spec.checkpoint.name,
              "data": str(path), "seconds": round(time.time() - t0, 1),
              **({"quant": cfg.quant} if cfg.quant != "none" else {}), **metrics}
    if cfg.harness is not None or cfg.memorization:
        del result["data"]
    atomic_write_json(spec.run_dir / _output_name(path, cfg), result)
    return result


def main(cfg: Config) -> int:
    """Evaluate the run (and the baseline), print a side-by-side table."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = Path(cfg.data)
    if cfg.harness is None and not cfg.memorization and not path.is_file():
        raise UserError(f"data: {path}: no such file")
    results = [evaluate_run(cfg.run, path, cfg)]
    if cfg.baseline:
        results.append(evaluate_run(cfg.baseline, path, cfg))
    title = _output_name(path, cfg).removeprefix("eval_").removesuffix(".json")
    table = Table(title=path.name if title == path.stem else title)
    table.add_column("metric")
    for r in results:
        table.add_column(Path(r["run"]).name, justify="right")
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and key != "seconds":
            table.add_row(key, *(f"{r[key]:.4f}" if isinstance(r[key], float) else str(r[key])
                                 for r in results))
    console = Console()
    console.print(table)
    for s in results[0].get("samples", [])[:3]:
        console.print(f"{s['prompt']!r} -> {s['prediction']!r} (reference {s['reference']!r})",
                      markup=False, highlight=False)
    for w in [w for w in results[0].get("windows", []) if w["exact"]][:3]:
        console.print(f"memorized: {w['prefix']!r} -> {w['generated']!r}", markup=False,
                      highlight=False)
    return 0
