"""Experiment trackers behind one small interface: ``log(record)`` and ``close()``.

TensorBoard event files are written into the run folder by default; Weights & Biases and MLflow
are used when installed and asked for. This is the only module that imports them, lazily.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from lmforge.config import UserError


class Tracker(Protocol):
    """Receives every metrics record the run logs."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step", "time") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    """Event files in ``<run>/tensorboard``: ``tensorboard --logdir runs``."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("tracker 'tensorboard' needs the tensorboard package: "
                            "pip install tensorboard (or drop it from --trackers)") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Weights & Biases (``pip install wandb``; ``WANDB_MODE=offline`` works without network)."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("tracker 'wandb' needs: pip install wandb") from None
        self.run = wandb.init(project="lmforge", name=name, dir=str(run_dir), config=config,
                              resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """MLflow (``pip install mlflow``), tracking URI from ``MLFLOW_TRACKING_URI`` as usual."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:
            raise UserError("tracker 'mlflow' needs: pip install mlflow") from None
        self.mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    def log(self, record: dict[str, Any]) -> None:
        metrics = {k.replace("/", "_"): v for k, v in _scalars(record).items()}
        self.mlflow.log_metrics(metrics, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_MODULES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", "pip install wandb"),
            "mlflow": ("mlflow", "pip install mlflow")}


def check_trackers(names: list[str]) -> None:
    """Fail before a run touches the disk if a tracker is unknown or not installed."""
    import importlib.util

    for n in names:
        if n not in _MODULES:
            raise UserError(f"--train.trackers: unknown tracker '{n}'; use tensorboard, wandb "
                            "or mlflow")
        module, install = _MODULES[n]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--train.trackers: '{n}' is not installed ({install}), or drop it "
                            "from --train.trackers")


def make_trackers(names: list[str], run_dir: Path, name: str,
                  config: dict[str, Any]) -> list[Tracker]:
    """Build the trackers named in ``--trackers`` (tensorboard, wandb, mlflow)."""
    out: list[Tracker] = []
    for n in names:
        if n == "tensorboard":
            out.append(TensorBoardTracker(run_dir))
        elif n == "wandb":
            out.append(WandbTracker(run_dir, name, config))
        elif n == "mlflow":
            out.append(MLflowTracker(name, config))
        else:
            raise UserError(f"--trackers: unknown tracker '{n}'; use tensorboard, wandb or mlflow")
    return out
