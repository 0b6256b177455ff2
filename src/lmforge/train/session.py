"""One training session around the loop, the same for every mode: the runtime (ranks, gradient
scaler, MFU), experiment trackers, metrics.jsonl with a progress bar, and the profiler."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from lmforge.checkpoint import TrainState
from lmforge.config import OptimConfig, TrainConfig
from lmforge.train.loop import Batch, LoopHooks, Runtime, train
from lmforge.train.losses import LossFn
from lmforge.train.profile import profile_report, profiler
from lmforge.train.setup import Setup
from lmforge.utils.logging import RunLogger
from lmforge.utils.trackers import make_trackers


def run_training(setup: Setup, batches: Iterator[Batch], loss_fn: LossFn, train_cfg: TrainConfig,
                 optim_cfg: OptimConfig, state: TrainState, hooks: LoopHooks, *, run_dir: Path,
                 name: str, console: Console, config: dict[str, Any], tp: int = 1,
                 flops_per_token: float | None = None) -> TrainState:
    """Train ``setup`` from ``state`` to ``train_cfg.max_steps``; rank 0 logs and tracks."""
    info = setup.info
    rt = Runtime(dist=info, tp=tp, scaler=setup.scaler, flops_per_token=flops_per_token,
                 peak_flops=train_cfg.peak_tflops * 1e12 if train_cfg.peak_tflops else None)
    trackers = make_trackers(train_cfg.trackers, run_dir, name, config) if info.is_main else []
    rt.profiler = profiler(run_dir) if train_cfg.profile and info.is_main else None
    with RunLogger(run_dir / "metrics.jsonl", train_cfg.max_steps, console,
                   start_step=state.step, enabled=info.is_main, trackers=trackers) as log, \
            rt.profiler or contextlib.nullcontext():
        state = train(setup.model, setup.optimizer, batches, loss_fn, train_cfg, optim_cfg,
                      state, log, hooks, rt)
    if rt.profiler is not None:
        profile_report(run_dir, console)
    return state
