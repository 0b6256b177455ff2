"""Training-step throughput: lmforge's Decoder vs transformers' LlamaForCausalLM, fp32 on CPU.

Both models are built from the same Llama-style config (the parameter counts are asserted
equal), trained with the same AdamW setup (lmforge's ``build_optimizer``: betas 0.9/0.95,
decay on matrices only), the same fp32 cross-entropy, gradient clipping and
``zero_grad(set_to_none=True)`` — the step of lmforge's loop, on the same random batches.
After warm-up steps, timed blocks of steps alternate between the two (and which goes first
alternates per round) so drifting machine load hits both alike; the median block is reported.

    python benchmarks/train_step.py             # the table
    python benchmarks/train_step.py --profile   # where the time goes (torch.profiler)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import Section, median
from torch import Tensor, nn

from lmforge.config import OptimConfig
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.models.registry import preset
from lmforge.train.optim import build_optimizer

Step = Callable[[Tensor, Tensor], None]
# (preset, micro-batch, sequence length, torch threads). One thread is the sturdy measure on
# a shared machine: with more threads than free cores, every OpenMP barrier waits for a
# descheduled thread and rounds vary 4x; the multi-thread row shows scaling when it is quiet.
CASES: tuple[tuple[str, int, int, int], ...] = (
    ("llama-1m", 16, 256, 1), ("llama-6m", 8, 256, 1), ("llama-6m", 8, 256, 2))


def hf_llama(cfg: DecoderConfig) -> nn.Module:
    """transformers' LlamaForCausalLM with the same shape as ``cfg`` (sdpa attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert cfg.norm == "rmsnorm" and cfg.pos == "rope" and cfg.mlp == "swiglu" and not cfg.bias
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout,
        initializer_range=cfg.init_std, use_cache=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def build_models(cfg: DecoderConfig, seed: int = 0) -> dict[str, tuple[nn.Module, Callable]]:
    """Both models, each with the function that maps token ids to logits."""
    torch.manual_seed(seed)
    ours = Decoder(cfg)
    theirs = hf_llama(cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs, f"parameter counts differ: {n_ours} vs {n_theirs}"
    return {
        "lmforge": (ours, ours),
        "transformers": (theirs, lambda x: theirs(input_ids=x, use_cache=False).logits),
    }


def make_step(model: nn.Module, logits_of: Callable[[Tensor], Tensor]) -> Step:
    """One optimizer step exactly as lmforge's loop does it (grad_accum 1)."""
    opt = build_optimizer(model, OptimConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step(x: Tensor, y: Tensor) -> None:
        logits = logits_of(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def batches(cfg: DecoderConfig, batch: int, seq_len: int, n: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` fixed random (x, y) batches, shared by both libraries."""
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (n, batch, seq_len + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def measure(case: tuple[str, int, int, int], rounds: int, steps: int, warmup: int) -> dict:
    """Median tokens/s (wall clock and per CPU-second) of both libraries, interleaved."""
    name, batch, seq_len, threads = case
    torch.set_num_threads(threads)
    cfg = preset(name)
    models = build_models(cfg)
    n_params = sum(p.numel() for p in models["lmforge"][0].parameters())
    steps_of = {lib: make_step(model, fwd) for lib, (model, fwd) in models.items()}
    data = batches(cfg, batch, seq_len, steps)
    for step in steps_of.values():
        for x, y in data[:warmup]:
            step(x, y)
    wall: dict[str, list[float]] = {lib: [] for lib in steps_of}
    cpu: dict[str, list[float]] = {lib: [] for lib in steps_of}
    order = list(steps_of)
    tokens = len(data) * batch * seq_len
    for r in range(rounds):
        for lib in order if r % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            for x, y in data:
                steps_of[lib](x, y)
            wall[lib].append(tokens / (time.perf_counter() - t0))
            cpu[lib].append(tokens / (time.process_time() - c0))
    return {"case": name, "batch": batch, "seq_len": seq_len, "threads": threads,
            "params": n_params, "flops_per_token": models["lmforge"][0].flops_per_token(seq_len),
            "wall": {lib: median(v) for lib, v in wall.items()},
            "cpu": {lib: median(v) for lib, v in cpu.items()},
            "rounds": {lib: [round(s) for s in v] for lib, v in wall.items()}}


def matmul_seconds(n: int, repeats: int = 5) -> float:
    """Best wall time of an n x n fp32 matmul on the current torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def run(rounds: int = 11, steps: int = 2, warmup: int = 2) -> Section:
    """The RESULTS.md section."""
    section = Section(
        title="Training step, fp32 on CPU: lmforge vs transformers",
        method=(f"Same Llama-style config and parameter count, same AdamW setup and loss, same "
                f"random batches; {warmup} warm-up steps each, then {rounds} interleaved rounds of "
                f"{steps} timed steps per library (the order flips every round); median round. "
                "The last column divides by CPU time instead of wall time: on a shared machine "
                "other processes steal wall time from whichever library happens to be running, "
                "so for the 1-thread rows the CPU-second ratio is the one to trust."),
        columns=["config", "params", "batch x seq", "threads", "lmforge tokens/s",
                 "transformers tokens/s", "ratio lmforge / transformers",
                 "lmforge GFLOP/s (6N+12LTd)", "ratio per CPU-second"],
    )
    cores = os.cpu_count() or 1
    for case in CASES:
        load = os.getloadavg()[0]
        r = measure(case, rounds, steps, warmup)
        load = max(load, os.getloadavg()[0])
        if r["threads"] > 1 and load > cores - r["threads"] + 1:
            section.notes.append(f"`{r['case']}` with {r['threads']} threads ran at a load "
                                 f"average of {load:.1f} on {cores} cores: its threads were "
                                 "descheduled at barriers, so this row measures the machine's "
                                 "load more than the code.")
        ours, theirs = r["wall"]["lmforge"], r["wall"]["transformers"]
        section.rows.append([
            f"`{r['case']}`", f"{r['params']:,}", f"{r['batch']} x {r['seq_len']}",
            str(r["threads"]), f"{ours:,.0f}", f"{theirs:,.0f}", f"**{ours / theirs:.2f}**",
            f"{ours * r['flops_per_token'] / 1e9:.1f}",
            f"{r['cpu']['lmforge'] / r['cpu']['transformers']:.2f}"])
        if r["threads"] == 1:
            peak = 2.0 * 1024**3 / matmul_seconds(1024)
            section.notes.append(f"`{r['case']}`, 1 thread: {ours * r['flops_per_token'] / peak:.0%}"
                                 f" of this CPU's fp32 matmul peak ({peak / 1e9:.0f} GFLOP/s "
                                 "on one thread, best 1024^3 product): a measured MFU to give "
                                 "`lmforge plan --mfu` for CPU runs.")
        section.notes.append(f"`{r['case']}`, {r['threads']} thread(s), tokens/s per round: "
                             f"lmforge {r['rounds']['lmforge']}, transformers "
                             f"{r['rounds']['transformers']}")
    return section


def profile(case: tuple[str, int, int, int], steps: int = 4, top: int = 18) -> None:
    """Print the ops that take the time in each library's step (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    name, batch, seq_len, threads = case
    torch.set_num_threads(threads)
    cfg = preset(name)
    data = batches(cfg, batch, seq_len, steps)
    for lib, (model, fwd) in build_models(cfg).items():
        step = make_step(model, fwd)
        step(*data[0])
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for x, y in data:
                step(x, y)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / steps
        print(f"\n=== {lib} {name} {batch}x{seq_len}: {total:.1f} ms of op time per step ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    """Command line: the table, or --profile."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="profile instead of timing")
    ap.add_argument("--case", default="llama-6m", help="preset to profile")
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    if args.profile:
        profile(next(c for c in CASES if c[0] == args.case))
        return
    print(run(rounds=args.rounds).markdown())


if __name__ == "__main__":
    main()
