"""--task dpo | ipo | orpo | simpo: a decoder on {prompt, chosen, rejected} pairs.

The same run as chat fine-tuning (``chat.train_decoder``: setup, loop, checkpoints, run folder)
with another batch and loss: each batch holds B chosen rows then their B rejected rows, and the
loss (``train.losses.preference_loss``) is a mean over pairs. DPO and IPO need the frozen base's
log-probs of every reply: with LoRA/QLoRA the policy computes them itself with its adapters
switched off (no second model in memory); with --method full they are computed once, by the
base before its first step, and carried in the batches (as TRL's ``precompute_ref_log_probs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from lmforge.config import UserError
from lmforge.data.preference import (
    Pair,
    PreferenceReport,
    check_preference,
    collate,
    eval_pair_batches,
    preference_batches,
    with_reference,
)
from lmforge.finetuning.chat import DecoderBase, DecoderTask, decoder_base, train_decoder
from lmforge.finetuning.options import Config
from lmforge.parallel import Precision, autocast
from lmforge.train.loop import EvalFn
from lmforge.train.losses import LossFn, preference_loss, sequence_logps, uses_reference
from lmforge.train.setup import Setup, data_ranks
from lmforge.utils.dist import DistInfo


def checked_pairs(cfg: Config, path: str, base: DecoderBase) -> PreferenceReport:
    """The data check of `lmforge data check`; a bad row is a UserError before anything is written."""
    report = check_preference(path, base.tok, base.template, base.eot, base.max_len)
    if report.errors:
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise UserError(f"{report.errors[0]}{more}; see `lmforge data check {path}`")
    if len(report.pairs) < 2:
        raise UserError(f"{path}: {len(report.pairs)} preference pair(s); need at least 2")
    return report


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) pairs after a seeded shuffle."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(len(pairs) * val_fraction)
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


@torch.no_grad()
def mean_over(loss_fn: LossFn, model: nn.Module, batches: list[Any]) -> dict[str, float]:
    """The loss and its metrics averaged over held-out batches (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for x, y in batches:
        total, n, metrics = loss_fn(model, x, y)
        for k, v in {"loss": total, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += int(n)
    model.train(was_training)
    return {f"val_{k}": v / max(count, 1) for k, v in sums.items()}


def reference_logps(model: nn.Module, precision: Precision,
                    device: str) -> Callable[[list[Pair]], Tensor]:
    """The base's summed reply log-probs of a list of pairs (chosen rows, then rejected), at
    the training precision so the policy starts exactly at the reference."""

    @torch.no_grad()
    def logps(pairs: list[Pair]) -> Tensor:
        (ids, labels, _), _ = collate(pairs, 0)
        model.eval()
        with autocast(precision, device):
            out = sequence_logps(model(ids.to(device)), labels.to(device))[0]
        model.train()
        return out.float().cpu()

    return logps


def preference_main(cfg: Config, console: Console, dist: DistInfo) -> int:
    """Check the pairs, then fine-tune on them through ``train_decoder``."""
    base = decoder_base(cfg)
    report = checked_pairs(cfg, cfg.data, base)
    if cfg.val_data:  # a file of its own, else --val_fraction of --data
        train_pairs, val_pairs = report.pairs, checked_pairs(cfg, cfg.val_data, base).pairs
    else:
        train_pairs, val_pairs = split_pairs(report.pairs, cfg.val_fraction, cfg.train.seed)
    loss_fn = preference_loss(cfg.task, cfg.pref)  # type: ignore[arg-type]
    precompute = uses_reference(cfg.task) and cfg.method == "full"  # type: ignore[arg-type]
    ranks = data_ranks(dist, 1)

    def attach(setup: Setup) -> tuple[Any, EvalFn | None]:
        nonlocal train_pairs, val_pairs
        if precompute:  # one pass of the base over every pair, before any step
            logps = reference_logps(setup.model, cfg.train.precision, dist.device)
            train_pairs = with_reference(train_pairs, logps, cfg.train.batch_size)
            val_pairs = with_reference(val_pairs, logps, cfg.train.batch_size)
        batches = preference_batches(train_pairs, cfg.train.batch_size, base.max_len,
                                     base.pad_id, cfg.train.seed, cfg.group_by_length,
                                     ranks.rank, ranks.world_size)
        val = eval_pair_batches(val_pairs, cfg.train.batch_size, base.pad_id)
        return batches, ((lambda m: mean_over(loss_fn, m, val)) if val else None)

    summary = report.summary()
    where = ("reference: the frozen base's log-probs, computed once before training"
             if precompute else "reference: the model with its adapters off"
             if uses_reference(cfg.task) else "no reference model")  # type: ignore[arg-type]
    task = DecoderTask(len(train_pairs), len(val_pairs), summary,
                       f"{summary['reply_tokens_mean']:.1f} reply tokens on average; {where}",
                       loss_fn, attach, _report)
    return train_decoder(cfg, console, dist, base, task)


def _report(before: dict[str, float], after: dict[str, float]) -> str:
    if not after:
        return "no held-out pairs (--val_fraction 0): nothing to report"
    names = {"val_reward_accuracy": "reward accuracy", "val_reward_margin": "reward margin",
             "val_choice_accuracy": "chosen more likely", "val_loss": "loss"}
    return "held-out pairs: " + ", ".join(
        f"{name} {before[k]:.4f} -> {after[k]:.4f}" for k, name in names.items())
