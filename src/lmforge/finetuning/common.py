"""What chat and classification fine-tuning share: the length of a run, its folder, resume,
the training setup and the end of a run."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lmforge.checkpoint import TrainState, latest_checkpoint
from lmforge.config import (
    UserError,
    load_yaml,
    to_dict,
)
from lmforge.finetuning.options import Config
from lmforge.models.lora import adapter_state_dict
from lmforge.run import (
    ADAPTER_FILE,
    ADAPTER_INFO,
)
from lmforge.train.finetune import (
    replay,
    restore,
    save_final,
)
from lmforge.train.schedule import resolved
from lmforge.train.setup import (
    Setup,
    gather_full,
    resolve_strategy,
    setup_training,
)
from lmforge.utils.dist import DistInfo, barrier, on_main
from lmforge.utils.io import atomic_write_bytes, atomic_write_json
from lmforge.utils.logging import truncate_metrics
from lmforge.utils.trackers import check_trackers


def save_adapter(run_dir: Path, model: nn.Module, info: dict[str, Any]) -> None:
    """adapter.safetensors (the LoRA tensors only) and adapter.json (base run and settings)."""
    atomic_write_bytes(run_dir / ADAPTER_FILE, safetensors_bytes(adapter_state_dict(model)))
    atomic_write_json(run_dir / ADAPTER_INFO, info)


def with_length(cfg: Config, examples: int, ranks: int) -> Config:
    """cfg with --train.epochs / --optim.warmup_ratio resolved over ``examples`` train rows."""
    per_epoch = examples / (cfg.train.batch_size * cfg.train.grad_accum * ranks)
    train_cfg, optim_cfg = resolved(cfg.train, cfg.optim, per_epoch)
    return replace(cfg, train=train_cfg, optim=optim_cfg)


def _prepare_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists():
        if not overwrite:
            raise UserError(f"{run_dir} exists; pass --resume to continue it, --overwrite to "
                            "replace it, or pick another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


# --------------------------------------------------------------------------- run folder, resume

# Options a resumed run may change: where and how it reports, not what it computes (a new
# --train.max_steps, as in pretrain, continues on the schedule of the new length).
RESUME_FREE = ("resume", "overwrite", "train.threads", "train.max_steps", "train.log_every",
               "train.eval_every", "train.save_every", "train.keep_last", "train.trackers")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def start_run_dir(cfg: Config, run_dir: Path, info: DistInfo) -> None:
    """Rank 0 creates a new run's folder (never clobbering one by accident), or checks that the
    run --resume continues was started with the same options; a refusal stops every rank."""
    on_main(info, lambda: _start_run_dir(cfg, run_dir))


def _start_run_dir(cfg: Config, run_dir: Path) -> None:
    check_trackers(cfg.train.trackers)
    if not cfg.resume:
        _prepare_dir(run_dir, cfg.overwrite)
        return
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume: {run_dir} is not an existing run; drop --resume to start it")
    saved = _flat(load_yaml(run_dir / "config.yaml").get("finetune") or {})
    for key, value in _flat(to_dict(cfg)).items():
        if key not in RESUME_FREE and saved.get(key, value) != value:
            raise UserError(f"--resume: {key} is {value!r} but {run_dir} was started with "
                            f"{saved[key]!r}; resume with the options it was started with")


def resume_from(cfg: Config, setup: Setup, run_dir: Path, batches: Iterator[Any], digest: str,
                console: Console) -> tuple[TrainState, dict[str, Any]]:
    """Weights, optimizer, RNG and data position from the run's latest checkpoint; (state,
    the checkpoint's info). A run stopped before its first save starts over."""
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is None:
        return TrainState(), {}
    state, info = restore(setup, ckpt, digest)
    replay(batches, state.step, cfg.train.grad_accum)
    if setup.info.is_main:  # those steps will be logged again
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
    console.print(f"resumed {run_dir} from {ckpt.name} (step {state.step})")
    return state, info


def interrupted(run_dir: Path) -> UserError:
    """The one-line error of a Ctrl-C: where the last checkpoint is, and how to go on."""
    last = latest_checkpoint(run_dir)
    where = f"the last checkpoint is {last.name}" if last else "no checkpoint was saved yet"
    return UserError(f"interrupted; {where}; continue with the same command and --resume")


def setup_run(cfg: Config, info: DistInfo, build: Callable[[], nn.Module],
              adapt_fn: Callable[[nn.Module], Any], weights: Any,
              tp_model: object | None) -> Setup:
    """The training setup of a fine-tune: its strategy, seed, base weights and adaptation."""
    strategy = resolve_strategy(cfg.dist, info, "finetune", tp_model)
    return setup_training(build, info=info, strategy=strategy, train_cfg=cfg.train,
                          dist_cfg=cfg.dist, optim_cfg=cfg.optim,
                          generator=torch.Generator().manual_seed(cfg.train.seed),
                          weights=weights, adapt=adapt_fn)


def finish_run(cfg: Config, setup: Setup, state: TrainState, build: Callable[[], nn.Module],
               run_dir: Path, info: dict[str, Any]) -> nn.Module | None:
    """After training: the whole trained model on rank 0 (None elsewhere); a sharded run's
    last checkpoint becomes the merged single file every command loads."""
    trained = gather_full(setup, build)
    if trained is not None and setup.sharded:
        save_final(run_dir, state, trained, info, cfg.train.keep_last)
    barrier(setup.info)
    return trained


