"""The ONE training loop.

Pretraining, fine-tuning, LoRA and classification all run through ``train``: they differ in
which parameters require grad, what batches arrive and which ``loss_fn`` is passed — never in a
copy of this loop. Everything that happens in a step is written out below, in order: learning
rate, micro-steps (forward, backward), clip, optimizer step, zero_grad, log, eval, save.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.checkpoint import TrainState
from lmforge.config import OptimConfig, TrainConfig, UserError
from lmforge.parallel import autocast, clip_grad_norm, grad_sync
from lmforge.train.losses import LossFn, label_count
from lmforge.train.schedule import lr_at
from lmforge.utils.dist import DistInfo, all_reduce_sum
from lmforge.utils.logging import RunLogger

Batch = tuple[Any, Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]
SaveFn = Callable[[TrainState, dict[str, float]], None]


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row: the run cannot go on as configured."""


@dataclass
class LoopHooks:
    """What the recipe hands the loop: how to evaluate and how to save. No callback framework."""

    evaluate: EvalFn | None = None
    save: SaveFn | None = None


@dataclass
class Runtime:
    """Where and how the loop runs: device, ranks, precision, and the numbers behind MFU."""

    dist: DistInfo = field(default_factory=DistInfo)
    tp: int = 1
    """Tensor-parallel degree: the tp ranks of a group train on the same tokens."""

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: the groups of tp ranks that read different batches."""
        return self.dist.world_size // self.tp

    scaler: torch.amp.GradScaler | None = None
    flops_per_token: float | None = None
    """Training FLOPs per token (6N + attention) of the model, for MFU."""
    peak_flops: float | None = None
    """Peak dense FLOP/s of one device at the training precision; None = MFU not reported."""
    profiler: torch.profiler.profile | None = None
    """Advanced once per optimizer step when profiling (its schedule picks the steps)."""


def _to(x: Any, device: str) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    loss_fn: LossFn,
    cfg: TrainConfig,
    optim_cfg: OptimConfig,
    state: TrainState,
    log: RunLogger,
    hooks: LoopHooks,
    rt: Runtime | None = None,
) -> TrainState:
    """Run optimizer steps from ``state.step`` to ``cfg.max_steps``; return the final state."""
    rt = rt or Runtime()
    device = rt.dist.device
    params = [p for p in model.parameters() if p.requires_grad]
    t_last, tokens_last = time.perf_counter(), state.tokens
    bad_streak, loss_avg, stale_evals = 0, None, 0
    while state.step < cfg.max_steps:
        # 1. learning rate for this step (a pure function of the step: exact on resume)
        lr = lr_at(state.step, optim_cfg.lr, optim_cfg.warmup_steps, cfg.max_steps,
                   optim_cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 2. micro-steps. The step's batches are drawn first, so the summed loss can be divided
        #    by the labelled tokens of the whole step on every rank (one small all-reduce): each
        #    token weighs the same however the step is split into micro-batches and ranks.
        #    Gradients are synchronized across ranks only on the last micro-step.
        model.train()
        micro_batches = [(_to(x, device), _to(y, device))
                         for x, y in (next(batches) for _ in range(cfg.grad_accum))]
        local = torch.stack([label_count(y) for _, y in micro_batches]).sum()
        count = all_reduce_sum(local, rt.dist) // rt.tp  # the tp ranks of a group share data
        # DDP and FSDP average gradients over the data-parallel ranks: multiply that back
        scale = rt.dp_size / count.clamp(min=1).double()
        loss_sum = torch.zeros((), device=device)
        extra_sums: dict[str, Tensor] = {}  # a loss's own metrics (DPO: rewards), summed
        for micro, (x, y) in enumerate(micro_batches):
            with grad_sync(model, micro == cfg.grad_accum - 1), autocast(cfg.precision, device):
                total, _, *extras = loss_fn(model, x, y)
            scaled = total * scale.to(total.dtype)
            (rt.scaler.scale(scaled) if rt.scaler else scaled).backward()
            loss_sum += total.detach().float()
            for k, v in (extras[0] if extras else {}).items():
                extra_sums[k] = extra_sums.get(k, 0) + v.detach().float()
        tokens_all = int(count)
        loss_value = float(all_reduce_sum(loss_sum, rt.dist)) / rt.tp / max(tokens_all, 1)
        extra: dict[str, float] = {}
        if extra_sums:  # means over the step's pairs/tokens, as the loss
            summed = all_reduce_sum(torch.stack(list(extra_sums.values())), rt.dist)
            extra = {k: float(v) / rt.tp / max(tokens_all, 1) for k, v in zip(extra_sums, summed)}

        # 3. clip, step, zero — or skip a step whose loss or gradients are not finite
        if rt.scaler:
            rt.scaler.unscale_(optimizer)
        max_norm = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else math.inf
        norm = clip_grad_norm(params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if rt.scaler:
            rt.scaler.step(optimizer)  # skips the update itself on inf/NaN gradients
            rt.scaler.update()
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens_all
        if rt.profiler is not None:
            rt.profiler.step()
        if not finite:
            bad_streak += 1
            log.log({"kind": "skip", "step": state.step, "loss": loss_value,
                     "grad_norm": grad_norm})
            log.info(f"step {state.step}: non-finite loss/gradient ({loss_value}, {grad_norm}); "
                     f"step skipped ({bad_streak} in a row)")
            if bad_streak >= cfg.max_bad_steps and not rt.scaler:
                raise TrainingDiverged(
                    f"training diverged: {bad_streak} steps in a row with a non-finite loss or "
                    f"gradient (last at step {state.step}); lower --optim.lr, raise "
                    "--optim.warmup_steps or use --train.precision fp32")
        else:
            bad_streak = 0
            if loss_avg is not None and cfg.spike_factor and loss_value > cfg.spike_factor * loss_avg:
                log.info(f"step {state.step}: loss spike {loss_value:.3f} "
                         f"(running average {loss_avg:.3f})")
            loss_avg = loss_value if loss_avg is None else 0.95 * loss_avg + 0.05 * loss_value

        # 4. log: loss, lr, gradient norm, throughput, MFU and peak memory
        now = time.perf_counter()
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            tok_s = (state.tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, state.tokens
            record = {"kind": "train", "step": state.step, "tokens": state.tokens,
                      "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tok_s": tok_s,
                      "peak_mem_mb": _peak_memory_mb(device), **extra}
            if rt.flops_per_token and rt.peak_flops:
                record["mfu"] = tok_s * rt.flops_per_token / (rt.peak_flops * rt.dist.world_size)
            log.log(record)
            log.progress(state.step, loss=loss_value, lr=lr, tok_s=round(tok_s))

        # 5. evaluate (the recipe decides what that means); early stop on patience
        last = state.step == cfg.max_steps
        metrics: dict[str, float] = {}  # empty unless evaluated at this very step
        if hooks.evaluate is not None and (state.step % cfg.eval_every == 0 or last):
            metrics = hooks.evaluate(model)
            log.log({"kind": "eval", "step": state.step, "tokens": state.tokens, **metrics})
            log.info(f"step {state.step:>6}  " + "  ".join(
                f"{k} {v:.4f}" for k, v in metrics.items()))
            val = metrics.get("val_loss")
            if val is not None and (state.best_val_loss is None or val < state.best_val_loss):
                state.best_val_loss, stale_evals = val, 0
            elif val is not None:
                stale_evals += 1
        stop = cfg.early_stop_patience is not None and stale_evals >= cfg.early_stop_patience

        # 6. save
        if hooks.save is not None and (state.step % cfg.save_every == 0 or last or stop):
            hooks.save(state, metrics)
        if stop:
            log.info(f"early stop at step {state.step}: val loss has not improved for "
                     f"{stale_evals} evaluations (best {state.best_val_loss:.4f})")
            break
    return state
