"""What fine-tuning adds to the training setup: the method's adaptation of the base (full,
LoRA, QLoRA), checkpoints that a plain decoder loads (merged weights) while still resuming
exactly, and the resume itself. ``lmforge.finetuning`` (behind ``lmforge finetune``) uses them.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.checkpoint import (
    TrainState,
    is_sharded,
    load_checkpoint,
    load_sharded_checkpoint,
    read_meta,
    save_checkpoint,
    save_sharded_checkpoint,
)
from lmforge.config import UserError
from lmforge.models.lora import LoraConfig, LoRALinear, apply_lora, merge_lora
from lmforge.models.quant import dequantize_nf4, is_nf4, quantize_nf4
from lmforge.train.setup import Setup

Method = Literal["full", "lora", "qlora"]
TRAINABLE = "trainable."  # checkpoint extras: the trained tensors of a (Q)LoRA model, by name


def adapt(model: nn.Module, method: Method, lora: LoraConfig,
          base_dtype: Literal["fp32", "bf16"] = "fp32") -> list[str]:
    """Make the right parameters trainable for the method; return the adapted layer names.

    Runs on the meta model (``setup_training(adapt=...)``): QLoRA's NF4 layers get their codes
    from the base checkpoint one weight at a time, so the full-precision base never exists whole.
    ``base_dtype`` bf16 stores the frozen linear weights in bf16 (half the memory).
    """
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    if method == "qlora":
        # the frozen block matrices are stored in 4 bits; adapters, embeddings, norms stay fp32
        quantize_nf4(model, lora.double_quant, lora.quant_backend)
    names = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
    if base_dtype == "bf16":
        frozen_linears_to(model, torch.bfloat16)
    return names


def frozen_linears_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen nn.Linear in ``dtype``; it computes in that dtype and hands back
    its input's dtype, so the trained parts (adapters, norms, embeddings) stay as they are."""
    # a head tied to the embedding stays: the embedding's output must keep its dtype
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if (isinstance(module, nn.Linear) and not module.weight.requires_grad
                and id(module.weight) not in embedded):
            module.to(dtype)
            module.register_forward_pre_hook(_cast_input)
            module.register_forward_hook(_cast_output)


def _cast_input(module: nn.Module, args: tuple) -> tuple:
    module._input_dtype = args[0].dtype  # type: ignore[assignment]
    return (args[0].to(module.weight.dtype), *args[1:])


def _cast_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.to(module._input_dtype)  # type: ignore[arg-type]


def plain_copy(model: nn.Module) -> nn.Module:
    """The weights a run folder holds: a merged, dequantized copy of a (Q)LoRA model, else it."""
    if not any(isinstance(m, LoRALinear) or is_nf4(m) for m in model.modules()):
        return model
    return dequantize_nf4(merge_lora(copy.deepcopy(model)))


def data_digest(*paths: str | None) -> str:
    """sha256 over the data files: a resumed run must read the very same rows."""
    h = hashlib.sha256()
    for path in paths:
        if path:
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def save_resumable(run_dir: Path, state: TrainState, setup: Setup, info: dict[str, Any],
                   keep_last: int) -> None:
    """Collective under FSDP. Sharded: every rank writes its slices (the adapted model's own
    names). Otherwise rank 0 writes the plain (merged) weights plus the optimizer, and for
    (Q)LoRA the trained tensors themselves, since merged weights cannot be split back."""
    if setup.sharded:
        save_sharded_checkpoint(run_dir, state, setup.module, setup.optimizer, None, info,
                                keep_last, is_best=False)
        return
    if not setup.info.is_main:
        return
    model = setup.module
    plain = plain_copy(model)
    extra = {} if plain is model else {TRAINABLE + n: p.detach()
                                       for n, p in model.named_parameters() if p.requires_grad}
    save_checkpoint(run_dir, state, plain, setup.optimizer, extra=extra, info=info,
                    keep_last=keep_last, is_best=False)


def save_final(run_dir: Path, state: TrainState, trained: nn.Module, info: dict[str, Any],
               keep_last: int) -> None:
    """Rank 0, after a sharded run: the last step again as the merged single-file checkpoint
    every command loads (no optimizer state: the run is complete)."""
    save_checkpoint(run_dir, state, plain_copy(trained), None, info=info, keep_last=keep_last,
                    is_best=False)


def restore(setup: Setup, ckpt: Path, digest: str) -> tuple[TrainState, dict[str, Any]]:
    """Weights, optimizer and RNG from a checkpoint ``save_resumable`` wrote; (state, info)."""
    if setup.sharded:
        if not is_sharded(read_meta(ckpt)):
            raise UserError(f"--resume: {ckpt} is the merged checkpoint of a finished run; "
                            "there is nothing left to resume")
        state, _, info = load_sharded_checkpoint(ckpt, setup.module, setup.optimizer)
    else:
        model = setup.module
        plain = plain_copy(model)
        state, extra, info = load_checkpoint(ckpt, plain, setup.optimizer)
        if plain is not model:
            _restore_trained(ckpt, model, extra)
    if info.get("data_sha256", digest) != digest:
        raise UserError(f"--resume: the data files changed since {ckpt.parent.parent} was "
                        "started; resume with the same files or start over with --overwrite")
    return state, info


@torch.no_grad()
def _restore_trained(ckpt: Path, model: nn.Module, extra: dict[str, torch.Tensor]) -> None:
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lost = [n for n in trained if TRAINABLE + n not in extra]
    if lost:
        raise UserError(f"{ckpt}: holds no {lost[0]} (saved by an older lmforge?), so the "
                        "adapters cannot resume; start over with --overwrite")
    for n, p in trained.items():
        p.copy_(extra[TRAINABLE + n])


def replay(batches: Iterator[Any], steps: int, grad_accum: int) -> None:
    """Put a seeded batch stream where a stopped run left it: the streams are cheap to rebuild,
    and the loop draws grad_accum batches per step."""
    for _ in range(steps * grad_accum):
        next(batches)


def adapted_builder(build: Callable[[], nn.Module],
                    adapt_fn: Callable[[nn.Module], Any] | None) -> Callable[[], nn.Module]:
    """``build`` followed by the same adaptation (for gathering an adapted model whole)."""

    def built() -> nn.Module:
        model = build()
        if adapt_fn is not None:
            adapt_fn(model)
        return model

    return built
