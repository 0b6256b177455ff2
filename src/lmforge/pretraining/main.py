"""The run of ``lmforge pretrain`` (its options and behaviour: ``recipes/pretrain.py``'s help
text): checks, the training setup, resume, the one loop, checkpoints and the final report."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from lmforge.checkpoint import (
    TrainState,
    latest_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from lmforge.config import (
    UserError,
    load_yaml,
    to_dict,
)
from lmforge.data.loader import TokenDataset
from lmforge.data.pairs import (
    pairs_folder,
    read_pairs,
)
from lmforge.plan import TrainSettings
from lmforge.pretraining.objectives import Batches, Task, clm_task, mlm_task, seq2seq_task
from lmforge.pretraining.options import Config, saved_config
from lmforge.train.loop import LoopHooks
from lmforge.train.oom import oom_report
from lmforge.train.schedule import resolved
from lmforge.train.session import run_training
from lmforge.train.setup import (
    Setup,
    data_ranks,
    gather_full,
    load_state,
    resolve_strategy,
    setup_training,
)
from lmforge.utils.dist import DistInfo, init_distributed, on_main, shutdown
from lmforge.utils.io import atomic_write_json, atomic_write_text
from lmforge.utils.logging import read_metrics, truncate_metrics
from lmforge.utils.plot import plot_loss_curve
from lmforge.utils.seed import seed_everything
from lmforge.utils.trackers import check_trackers

# --------------------------------------------------------------------------- set-up


def _prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to clobber a run by accident; check a resumed run has the same model."""
    if cfg.resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume: {run_dir} is not an existing run; drop --resume to start it")
        saved_all = load_yaml(run_dir / "config.yaml")
        if saved_all.get("objective", "clm") != cfg.objective:
            raise UserError(f"--resume: the run was trained with --objective "
                            f"{saved_all.get('objective', 'clm')}, not {cfg.objective}; resume "
                            f"with the run's config (--config {run_dir}/config.yaml --resume)")
        saved = saved_all.get(cfg.section, {})
        for key, value in to_dict(cfg.model_cfg).items():
            if saved.get(key) != value:
                raise UserError(f"--resume: {cfg.section}.{key} is {value!r} but the run was "
                                f"trained with {saved.get(key)!r}; resume with the run's config "
                                f"(--config {run_dir}/config.yaml --resume)")
        return
    if run_dir.exists():
        if not cfg.overwrite:
            raise UserError(f"run '{cfg.run}' already exists in {run_dir}; pass --resume to "
                            "continue it, --overwrite to start over, or choose another --run")
        shutil.rmtree(run_dir)


def _with_length(cfg: Config, data_ranks: DistInfo) -> Config:
    """cfg with train.epochs / optim.warmup_ratio resolved into max_steps / warmup_steps."""
    tc, per_epoch = cfg.train, 0.0
    if tc.epochs is not None and cfg.objective == "seq2seq":  # pairs, not split by rank
        per_epoch = len(read_pairs(pairs_folder(cfg.data)[0])) / (tc.batch_size * tc.grad_accum)
    elif tc.epochs is not None:  # a row reads seq_len tokens ([CLS] window [SEP] for mlm)
        row = (tc.seq_len or cfg.model_cfg.block_size) - (2 if cfg.objective == "mlm" else 0)
        per_epoch = TokenDataset.open(cfg.data).num_tokens("train") / (
            tc.batch_size * tc.grad_accum * row * data_ranks.world_size)
    train_cfg, optim_cfg = resolved(tc, cfg.optim, per_epoch)
    return dataclasses.replace(cfg, train=train_cfg, optim=optim_cfg)


def _build_task(cfg: Config, info: DistInfo) -> tuple[Config, Task]:
    if info.distributed and cfg.objective == "seq2seq":
        raise UserError("--objective seq2seq does not split its pairs by rank yet; "
                        "train it in one process (without torchrun)")
    builder = {"clm": clm_task, "mlm": mlm_task, "seq2seq": seq2seq_task}[cfg.objective]
    return builder(cfg, info)


# --------------------------------------------------------------------------- main


def _resume(cfg: Config, setup: Setup, batches: Batches, run_dir: Path,
            console: Console, info: DistInfo) -> TrainState:
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is None:
        return TrainState()
    state, extra, _ = load_state(setup, ckpt)
    batches.load_state_dict({k.removeprefix("loader."): v for k, v in extra.items()
                             if k.startswith("loader.")})
    if info.is_main:  # the steps after the checkpoint will be logged again
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
    console.print(f"resumed {run_dir} from {ckpt.name} (step {state.step})")
    return state


def _save(cfg: Config, task: Task, setup: Setup, run_dir: Path, st: TrainState,
          metrics: dict[str, float]) -> None:
    """The loop's save hook: a checkpoint (sharded under FSDP / TP) and the loss plot."""
    extra = {f"loader.{k}": v for k, v in task.batches.state_dict().items()}
    meta = {"metrics": metrics, "preset": cfg.preset, "objective": cfg.objective}
    best = metrics.get("val_loss") is not None and metrics["val_loss"] == st.best_val_loss
    if setup.sharded:  # collective: each rank writes its own shard
        save_sharded_checkpoint(run_dir, st, setup.module, setup.optimizer, extra, meta,
                                cfg.train.keep_last, is_best=best)
    elif setup.info.is_main:
        save_checkpoint(run_dir, st, setup.module, setup.optimizer, extra, meta,
                        cfg.train.keep_last, is_best=best)
    if setup.info.is_main:
        plot_loss_curve(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png",
                        title=f"{cfg.run} ({cfg.preset}, {cfg.objective})",
                        baseline=task.baseline)


def main(cfg: Config) -> int:
    """Train, evaluate, save and report; see the module docstring."""
    info = init_distributed(cfg.dist.device)
    try:
        return _main(cfg, info)
    finally:
        shutdown(info)


def _main(cfg: Config, info: DistInfo) -> int:
    console = Console(quiet=not info.is_main)
    strategy = resolve_strategy(cfg.dist, info, "pretrain",
                                cfg.model if cfg.objective == "clm" else None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    gen = seed_everything(cfg.train.seed)
    cfg = _with_length(cfg, data_ranks(info, cfg.dist.tp))  # --train.epochs -> max_steps
    # reads and checks the data; batches are split over data-parallel ranks
    cfg, task = _build_task(cfg, data_ranks(info, cfg.dist.tp))
    # collective; may still refuse (a checkpoint, the optimizer): before touching the disk
    setup = setup_training(task.build, info=info, strategy=strategy, train_cfg=cfg.train,
                           dist_cfg=cfg.dist, optim_cfg=cfg.optim, generator=gen,
                           weights=task.weights)
    run_dir = Path(cfg.runs_dir) / cfg.run
    def start() -> None:  # every check above passed: only now touch the disk
        check_trackers(cfg.train.trackers)
        _prepare_run_dir(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)

    on_main(info, start)  # a refusal on rank 0 stops every rank with the same line
    state = _resume(cfg, setup, task.batches, run_dir, console, info)
    if info.is_main:
        atomic_write_text(run_dir / "config.yaml",
                          yaml.safe_dump(saved_config(cfg), sort_keys=False))
        atomic_write_text(run_dir / "tokenizer.json", task.tokenizer.to_str())
    console.print(f"[bold]{cfg.run}[/]: {task.describe}"
                  + (f"; {strategy} over {info.world_size} processes" if info.distributed else ""))
    t0 = time.time()
    start_tokens = state.tokens
    try:
        hooks = LoopHooks(task.evaluate, functools.partial(_save, cfg, task, setup, run_dir))
        state = run_training(setup, task.batches, task.loss_fn, cfg.train, cfg.optim, state, hooks,
                             run_dir=run_dir, name=cfg.run, console=console,
                             config=saved_config(cfg), tp=cfg.dist.tp,
                             flops_per_token=task.flops_per_token)
    except torch.OutOfMemoryError:
        _explain_oom(cfg, info, console)
        raise UserError("CUDA out of memory; see the breakdown and settings above") from None
    except KeyboardInterrupt:
        last = latest_checkpoint(run_dir)
        where = f"the last checkpoint is {last.name}" if last else "no checkpoint was saved yet"
        raise UserError(f"interrupted; {where}; continue with the same command and --resume") from None
    elapsed = time.time() - t0
    trained = gather_full(setup, task.build)  # collective; the whole model on rank 0 only
    if trained is not None:
        _summarize(cfg, task, trained, state, state.tokens - start_tokens, elapsed, run_dir,
                   console)
    return 0


def _summarize(cfg: Config, task: Task, trained: nn.Module, state: TrainState,
               new_tokens: int, elapsed: float, run_dir: Path, console: Console) -> None:
    """The final report (samples, tables) and summary.json; rank 0, on the whole model."""
    # tokens = labelled (predicted) tokens: every token for clm, the masked ones for mlm,
    # target tokens + EOS for seq2seq.
    summary: dict[str, Any] = {
        "run": cfg.run, "objective": cfg.objective, "preset": cfg.preset,
        "params": task.params, "steps": state.step,
        "tokens": state.tokens, "seconds": round(elapsed, 1),
        "tokens_per_s": round(new_tokens / max(elapsed, 1e-9), 1)}
    summary.update(task.report(console, summary, trained))
    if task.baseline is not None:
        summary["unigram_baseline_loss"] = task.baseline
    atomic_write_json(run_dir / "summary.json", summary)
    keys = ("val_loss", "val_accuracy", "val_exact_match", "unigram_baseline_loss")
    console.print(json.dumps({k: summary[k] for k in keys if k in summary}))


def _explain_oom(cfg: Config, info: DistInfo, console: Console) -> None:
    """Print where the memory went and settings that would fit (decoder runs)."""
    if cfg.objective != "clm" or not info.device.startswith("cuda"):
        return
    settings = TrainSettings(batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                             grad_accum=cfg.train.grad_accum,
                             precision=cfg.train.precision,
                             activation_checkpointing=cfg.train.activation_checkpointing,
                             gpus=info.world_size, tp=cfg.dist.tp,
                             strategy="fsdp" if cfg.dist.strategy == "fsdp" or info.world_size > cfg.dist.tp > 1
                             else "ddp")
    total = torch.cuda.get_device_properties(info.device).total_memory
    for line in oom_report(cfg.model, settings, total):
        console.print(line, markup=False)
