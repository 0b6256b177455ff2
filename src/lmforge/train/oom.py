"""Out-of-memory help: where the memory goes, and settings that would fit.

Called by a recipe when CUDA runs out of memory. The breakdown and the alternatives come from the
planner (``lmforge.plan``), so `lmforge plan` and this message always agree.
"""

from __future__ import annotations

import dataclasses

from lmforge.models.decoder import DecoderConfig
from lmforge.plan import TrainSettings, train_memory

GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _fits(cfg: DecoderConfig, s: TrainSettings, budget: float) -> bool:
    return train_memory(cfg, s)["peak"] <= budget


def _alternatives(cfg: DecoderConfig, s: TrainSettings, budget: float) -> list[str]:
    """Settings that fit ``budget`` bytes, cheapest change first, each at the same global batch."""
    out: list[str] = []
    batch, accum = s.batch_size, s.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        if _fits(cfg, dataclasses.replace(s, batch_size=batch, grad_accum=accum), budget):
            out.append(f"--train.batch_size {batch} --train.grad_accum {accum} (same tokens/step)")
            break
    if not s.activation_checkpointing and _fits(
            cfg, dataclasses.replace(s, activation_checkpointing=True), budget):
        out.append("--train.activation_checkpointing true (about 1 extra forward per step)")
    for method in ("lora", "qlora"):
        if s.method == "full" and _fits(cfg, dataclasses.replace(s, method=method), budget):
            out.append(f"fine-tune with {method.upper()} instead of full training")
            break
    return out


def oom_report(cfg: DecoderConfig, s: TrainSettings, device_bytes: float) -> list[str]:
    """Lines explaining an out-of-memory error for this model and these settings."""
    mem = train_memory(cfg, s)
    lines = [
        f"out of memory: the device has {_gib(device_bytes)}; this run needs about "
        f"{_gib(mem['peak'])} at its peak:",
        f"  weights {_gib(mem['weights'])}, gradients {_gib(mem['gradients'])}, "
        f"optimizer states {_gib(mem['optimizer'])}, activations {_gib(mem['activations'])} "
        f"(micro-batch {s.batch_size} x {s.seq_len or cfg.block_size} tokens)",
    ]
    # leave ~10% for the CUDA context, allocator fragmentation and kernel workspaces
    alternatives = _alternatives(cfg, s, 0.9 * device_bytes)
    if alternatives:
        lines.append("settings that would fit:")
        lines += [f"  {a}" for a in alternatives]
    else:
        lines.append("no single setting change fits: use a smaller --preset, or FSDP over "
                     "more GPUs (--dist.strategy fsdp, --dist.cpu_offload true)")
    return lines
