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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.checkpoint import TrainState
from lmforge.config import OptimConfig, TrainConfig, UserError
from lmforge.train.schedule import lr_at
from lmforge.utils.logging import RunLogger

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
EvalFn = Callable[[nn.Module], dict[str, float]]
SaveFn = Callable[[TrainState, dict[str, float]], None]


@dataclass
class LoopHooks:
    """What the recipe hands the loop: how to evaluate and how to save. No callback framework."""

    evaluate: EvalFn | None = None
    save: SaveFn | None = None


def causal_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """Next-token cross-entropy; targets equal to -100 carry no loss (masked prompt tokens)."""

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)  # (B, T, V)
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
            label_smoothing=label_smoothing,
        )

    return loss_fn


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
) -> TrainState:
    """Run optimizer steps from ``state.step`` to ``cfg.max_steps``; return the final state."""
    params = [p for p in model.parameters() if p.requires_grad]
    t_last, tokens_last = time.perf_counter(), state.tokens
    while state.step < cfg.max_steps:
        # 1. learning rate for this step (a pure function of the step: exact on resume)
        lr = lr_at(state.step, optim_cfg.lr, optim_cfg.warmup_steps, cfg.max_steps,
                   optim_cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

        # 2. micro-steps: forward and backward, loss scaled so gradients average over them
        model.train()
        loss_sum = torch.zeros(())
        step_tokens = 0
        for _ in range(cfg.grad_accum):
            x, y = next(batches)
            loss = loss_fn(model, x, y)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            step_tokens += int((y != -100).sum())
        loss_value = float(loss_sum) / cfg.grad_accum
        if not math.isfinite(loss_value):
            raise UserError(
                f"training diverged at step {state.step}: loss is {loss_value}; "
                "lower --optim.lr or raise --optim.warmup_steps"
            )

        # 3. clip, step, zero
        max_norm = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += step_tokens

        # 4. log
        now = time.perf_counter()
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            tok_s = (state.tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, state.tokens
            log.log({"kind": "train", "step": state.step, "tokens": state.tokens,
                     "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tok_s": tok_s})
            log.progress(state.step, loss=loss_value, lr=lr, tok_s=round(tok_s))

        # 5. evaluate (the recipe decides what that means)
        last = state.step == cfg.max_steps
        metrics: dict[str, float] = {}  # empty unless evaluated at this very step
        if hooks.evaluate is not None and (state.step % cfg.eval_every == 0 or last):
            metrics = hooks.evaluate(model)
            log.log({"kind": "eval", "step": state.step, "tokens": state.tokens, **metrics})
            log.info(f"step {state.step:>6}  " + "  ".join(
                f"{k} {v:.4f}" for k, v in metrics.items()))
            val = metrics.get("val_loss")
            if val is not None and (state.best_val_loss is None or val < state.best_val_loss):
                state.best_val_loss = val

        # 6. save
        if hooks.save is not None and (state.step % cfg.save_every == 0 or last):
            hooks.save(state, metrics)
    return state
