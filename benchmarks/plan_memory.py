"""The planner's predicted peak training memory against measured peaks, fp32 on CPU.

For each case a fresh subprocess trains a few real steps (lmforge's Decoder, AdamW, the fp32
cross-entropy of ``causal_lm_loss``, clipping, ``zero_grad(set_to_none=True)``) and reports:

- tensors: the peak of live tensor memory over one steady-state step (a step after the one
  that creates the optimizer states), from torch's ``MemTracker`` — exact, allocator-free;
- RSS: the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs just
  before the model is built) minus its resident memory at that moment — what the OS sees,
  allocator caching and fragmentation included.

The prediction is ``lmforge.plan.train_memory(...)["peak"]``. The activation-checkpointing case
wraps each block in ``torch.utils.checkpoint`` here (a benchmark-local stand-in until
``parallel.apply_ac`` lands).

    python benchmarks/plan_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from common import Section, fmt_mib

from lmforge.config import OptimConfig
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.registry import preset
from lmforge.plan import TrainSettings, train_memory
from lmforge.train.loop import causal_lm_loss
from lmforge.train.optim import build_optimizer

FIXED_MMAP = "`MALLOC_MMAP_THRESHOLD_=65536`"
GPT2_SMALLISH = DecoderConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256,
                              norm="layernorm", pos="learned", mlp="gelu", bias=True)


def cases() -> list[dict]:
    """(label, model config, micro-batch, seq len, activation checkpointing)."""
    return [
        {"label": "llama-6m", "cfg": preset("llama-6m"), "batch": 8, "seq": 256, "ac": False},
        {"label": "llama-15m", "cfg": preset("llama-15m"), "batch": 4, "seq": 512, "ac": False},
        {"label": "gpt2-style 4x256 (gelu, learned pos, biases)", "cfg": GPT2_SMALLISH,
         "batch": 8, "seq": 256, "ac": False},
        {"label": "llama-6m + activation checkpointing", "cfg": preset("llama-6m"), "batch": 8,
         "seq": 256, "ac": True},
    ]


def predicted(case: dict) -> dict:
    """The planner's numbers for a case (fp32, AdamW, as the CPU loop trains)."""
    s = TrainSettings(precision="fp32", batch_size=case["batch"], seq_len=case["seq"],
                      activation_checkpointing=case["ac"])
    return train_memory(case["cfg"], s)


# --------------------------------------------------------------------------- the worker


def _checkpoint_blocks(model: Decoder) -> None:
    """Recompute each block in backward (non-reentrant torch.utils.checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward
        block.forward = (lambda f: lambda x, rope, cache: checkpoint(
            f, x, rope, cache, use_reentrant=False))(inner)


def _stepper(case: dict) -> tuple:
    torch.manual_seed(0)
    model = Decoder(case["cfg"])
    if case["ac"]:
        _checkpoint_blocks(model)
    opt = build_optimizer(model, OptimConfig())
    loss_fn = causal_lm_loss()
    data = torch.randint(0, case["cfg"].vocab_size, (case["batch"], case["seq"] + 1))
    x, y = data[:, :-1], data[:, 1:]

    def step() -> None:
        loss_fn(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker(index: int, mode: str) -> dict:
    """Measure one case in this (fresh) process; ``mode`` is 'rss' or 'tensors'."""
    case = cases()[index]
    torch.ones(64, 64) @ torch.ones(64, 64)  # start torch's thread pool before the baseline
    if mode == "rss":
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kib("VmRSS")
        _, _, step = _stepper(case)
        for _ in range(3):
            step()
        return {"rss_delta": (_status_kib("VmHWM") - base) * 1024}
    from torch.distributed._tools.mem_tracker import MemTracker

    model, opt, step = _stepper(case)
    step()  # creates the optimizer states; MemTracker then follows one steady-state step
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    by_kind = next(iter(peak.values()))
    return {"tensors": by_kind["Total"],
            "by_kind": {str(getattr(k, "value", k)): v for k, v in by_kind.items()}}


def _in_subprocess(index: int, mode: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", str(index), "--mode", mode],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the table


def run() -> Section:
    """The RESULTS.md section."""
    section = Section(
        title="Planner: predicted vs measured peak training memory, fp32 on CPU",
        method=("`lmforge plan`'s peak estimate (weights + AdamW states + activations at the end "
                "of forward, or weights + grads + states at the optimizer step, whichever is "
                "larger) against (a) the peak of live tensors over a steady-state step "
                "(`MemTracker`) and (b) the peak RSS growth of a fresh process training 3 steps "
                "(VmHWM after resetting it through `/proc/self/clear_refs`)."),
        columns=["case", "batch x seq", "predicted peak", "measured: tensors",
                 "tensors / predicted", "measured: RSS growth", "RSS / predicted",
                 f"RSS / predicted, {FIXED_MMAP}"],
        notes=[f"{FIXED_MMAP} stops glibc from raising its mmap threshold after large frees, "
               "so freed tensors go back to the OS instead of staying in the heap."],
    )
    for i, case in enumerate(cases()):
        pred = predicted(case)
        tensors = _in_subprocess(i, "tensors")
        rss = _in_subprocess(i, "rss")
        fixed = _in_subprocess(i, "rss", {"MALLOC_MMAP_THRESHOLD_": "65536"})
        section.rows.append([
            case["label"], f"{case['batch']} x {case['seq']}", fmt_mib(pred["peak"]),
            fmt_mib(tensors["tensors"]), f"**{tensors['tensors'] / pred['peak']:.3f}**",
            fmt_mib(rss["rss_delta"]), f"**{rss['rss_delta'] / pred['peak']:.3f}**",
            f"{fixed['rss_delta'] / pred['peak']:.3f}"])
        kinds = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in tensors["by_kind"].items()
                          if v and k != "Total")
        section.notes.append(f"{case['label']}: predicted activations "
                             f"{fmt_mib(pred['activations'])} (loss "
                             f"{fmt_mib(pred['activation_parts']['loss'])}); measured at the "
                             f"peak, MiB: {kinds}")
    return section


def main() -> None:
    """Command line: print the section, or measure one case (internal --worker)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("rss", "tensors"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.mode)))
        return
    print(run().markdown())


if __name__ == "__main__":
    main()
