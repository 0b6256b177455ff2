"""Training-step throughput: lmforge's Decoder vs transformers' LlamaForCausalLM, fp32 on CPU.

Both models are built from the same Llama-style config (the parameter counts are asserted
equal), trained with the same AdamW setup (lmforge's ``build_optimizer``: betas 0.9/0.95,
decay on matrices only), the same fp32 cross-entropy, gradient clipping and
``zero_grad(set_to_none=True)`` — the step of lmforge's loop, on the same random batches.
After warm-up steps, timed blocks of steps alternate between all settings (the order rotates
per round) so drifting machine load hits them alike; the median block is reported.

Settings (levers), each on a fresh model from the same seed:
- ``eager``: as above;
- ``chunked loss`` (lmforge only): lmforge's training loss (``train.losses.causal_lm_loss``,
  head + cross-entropy in chunks on the final hidden states) instead of ``cross_entropy`` on
  full logits;
- ``compile``: ``torch.compile`` per block — lmforge's ``parallel.apply_compile``, and the same
  ``Module.compile()`` on each of transformers' decoder layers, so the peer gets the same lever.

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
from lmforge.parallel import apply_compile
from lmforge.train.losses import causal_lm_loss, mean_loss
from lmforge.train.optim import build_optimizer

Step = Callable[[Tensor, Tensor], None]
LossOf = Callable[[Tensor, Tensor], Tensor]
# (preset, micro-batch, sequence length, torch threads). One thread is the sturdy measure on
# a shared machine: with more threads than free cores, every OpenMP barrier waits for a
# descheduled thread and rounds vary 4x; the multi-thread row shows scaling when it is quiet.
CASES: tuple[tuple[str, int, int, int], ...] = (
    ("llama-1m", 16, 256, 1), ("llama-6m", 8, 256, 1), ("llama-6m", 8, 256, 2))
# (library, setting) pairs timed per case; the multi-thread case, which mostly measures the
# machine's load, keeps only eager.
SETTINGS: tuple[tuple[str, str], ...] = (
    ("lmforge", "eager"), ("lmforge", "chunked loss"), ("lmforge", "compile + chunked loss"),
    ("transformers", "eager"), ("transformers", "compile"))
# Table rows: (lmforge setting, transformers setting) compared.
PAIRS: tuple[tuple[str, str], ...] = (
    ("eager", "eager"), ("chunked loss", "eager"), ("compile + chunked loss", "eager"),
    ("compile + chunked loss", "compile"))


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


def plain_loss(logits_of: Callable[[Tensor], Tensor]) -> LossOf:
    """The loop's loss: fp32 cross-entropy on the full (B, T, V) logits."""
    return lambda x, y: F.cross_entropy(logits_of(x).flatten(0, 1).float(), y.flatten())


def chunked_loss(model: Decoder) -> LossOf:
    """lmforge's own training loss (``train.losses.causal_lm_loss``): the head and the
    cross-entropy in chunks of rows on the final hidden states, never the (B, T, V) logits."""
    loss_fn = causal_lm_loss()
    return lambda x, y: mean_loss(loss_fn, model, x, y)


def build_step(cfg: DecoderConfig, lib: str, setting: str, check: tuple[Tensor, Tensor],
               seed: int = 0) -> tuple[nn.Module, Step]:
    """A fresh model of ``lib`` (same seed, same weights) and its step under ``setting``."""
    torch.manual_seed(seed)
    if lib == "lmforge":
        model = Decoder(cfg)
        loss_of = plain_loss(model)
        if "chunked loss" in setting:
            with torch.no_grad():
                ref = loss_of(*check)
                loss_of = chunked_loss(model)
                got = loss_of(*check)
            assert torch.allclose(got, ref, rtol=1e-4), f"chunked loss {got} != {ref}"
        if "compile" in setting:
            apply_compile(model)
    else:
        model = hf_llama(cfg)
        if "compile" in setting:
            for layer in model.model.layers:
                layer.compile()
        loss_of = plain_loss(lambda x: model(input_ids=x, use_cache=False).logits)
    return model, make_step(model, loss_of)


def check_same_size(cfg: DecoderConfig) -> int:
    """The parameter count, asserted equal for both libraries."""
    n_ours = sum(p.numel() for p in Decoder(cfg).parameters())
    n_theirs = sum(p.numel() for p in hf_llama(cfg).parameters())
    assert n_ours == n_theirs, f"parameter counts differ: {n_ours} vs {n_theirs}"
    return n_ours


def make_step(model: nn.Module, loss_of: LossOf) -> Step:
    """One optimizer step exactly as lmforge's loop does it (grad_accum 1)."""
    opt = build_optimizer(model, OptimConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step(x: Tensor, y: Tensor) -> None:
        loss = loss_of(x, y)
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
    """Median tokens/s (wall clock and per CPU-second) of every setting, interleaved.

    ``first`` is the wall time of each setting's first step: with compile, mostly compiling.
    """
    name, batch, seq_len, threads = case
    torch.set_num_threads(threads)
    cfg = preset(name)
    n_params = check_same_size(cfg)
    data = batches(cfg, batch, seq_len, steps)
    chosen = SETTINGS if threads == 1 else (("lmforge", "eager"), ("transformers", "eager"))
    steps_of: dict[tuple[str, str], Step] = {}
    first: dict[tuple[str, str], float] = {}
    for key in chosen:
        _, steps_of[key] = build_step(cfg, *key, check=data[0])
        t0 = time.perf_counter()
        for i in range(warmup):
            steps_of[key](*data[i % len(data)])
            first.setdefault(key, time.perf_counter() - t0)
    wall: dict[tuple[str, str], list[float]] = {key: [] for key in steps_of}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in steps_of}
    order = list(steps_of)
    tokens = len(data) * batch * seq_len
    for r in range(rounds):
        k = r % len(order)
        for key in order[k:] + order[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            for x, y in data:
                steps_of[key](x, y)
            wall[key].append(tokens / (time.perf_counter() - t0))
            cpu[key].append(tokens / (time.process_time() - c0))
    return {"case": name, "batch": batch, "seq_len": seq_len, "threads": threads,
            "params": n_params, "flops_per_token": Decoder(cfg).flops_per_token(seq_len),
            "wall": {key: median(v) for key, v in wall.items()},
            "cpu": {key: median(v) for key, v in cpu.items()}, "first": first,
            "rounds": {key: [round(s) for s in v] for key, v in wall.items()}}


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
                f"random batches; {warmup} warm-up steps each (compiling, where compiled), then "
                f"{rounds} interleaved rounds of {steps} timed steps per setting (the order "
                "rotates every round); median round. Settings: `eager`; `chunked loss` = "
                "lmforge's chunked linear + cross-entropy on the hidden states "
                "(`lmforge.train.losses.causal_lm_loss`, what `lmforge pretrain` trains with), never the (B, T, V) "
                "logits whole; `compile` = `torch.compile` per block (lmforge's "
                "`apply_compile`; `Module.compile()` on each transformers decoder layer). The "
                "ratio-per-CPU-second column divides by CPU time instead of wall time: on a "
                "shared machine other processes steal wall time from whichever setting happens "
                "to be running, so for the 1-thread rows it is the one to trust. `vs lmforge "
                "eager` is per CPU-second too; `compile s` is the first step's wall time (one-off)."),
        columns=["config", "batch x seq", "threads", "lmforge", "transformers",
                 "lmforge tokens/s", "transformers tokens/s", "ratio lmforge / transformers",
                 "ratio per CPU-second", "vs lmforge eager", "lmforge GFLOP/s (6N+12LTd)",
                 "compile s (lmforge / transformers)"],
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
        _add_rows(section, r)
        if r["threads"] == 1:
            peak = 2.0 * 1024**3 / matmul_seconds(1024)
            best = max(v for (lib, _), v in r["wall"].items() if lib == "lmforge")
            eager = r["wall"][("lmforge", "eager")]
            section.notes.append(
                f"`{r['case']}`, 1 thread: lmforge eager {eager * r['flops_per_token'] / peak:.0%}"
                f", best setting {best * r['flops_per_token'] / peak:.0%} of this CPU's fp32 "
                f"matmul peak ({peak / 1e9:.0f} GFLOP/s on one thread, best 1024^3 product): a "
                "measured MFU to give `lmforge plan --mfu` for CPU runs.")
        section.notes.append(f"`{r['case']}`, {r['threads']} thread(s), tokens/s per round: " +
                             "; ".join(f"{lib} {setting} {v}"
                                       for (lib, setting), v in r["rounds"].items()))
    return section


def _add_rows(section: Section, r: dict) -> None:
    """One table row per (lmforge setting, transformers setting) pair that was measured."""
    for ours_set, theirs_set in PAIRS:
        ours_key, theirs_key = ("lmforge", ours_set), ("transformers", theirs_set)
        if ours_key not in r["wall"] or theirs_key not in r["wall"]:
            continue
        ours, theirs = r["wall"][ours_key], r["wall"][theirs_key]
        cpu_ours, eager = r["cpu"][ours_key], r["cpu"][("lmforge", "eager")]
        section.rows.append([
            f"`{r['case']}`", f"{r['batch']} x {r['seq_len']}", str(r["threads"]), ours_set,
            theirs_set, f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / theirs:.2f}",
            f"**{cpu_ours / r['cpu'][theirs_key]:.2f}**", f"{cpu_ours / eager:.2f}",
            f"{ours * r['flops_per_token'] / 1e9:.1f}",
            f"{r['first'][ours_key]:.0f} / {r['first'][theirs_key]:.0f}"])


def profile(case: tuple[str, int, int, int], settings: tuple[tuple[str, str], ...],
            steps: int = 4, top: int = 18) -> None:
    """Print the ops that take the time in each setting's step (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    name, batch, seq_len, threads = case
    torch.set_num_threads(threads)
    cfg = preset(name)
    data = batches(cfg, batch, seq_len, steps)
    for lib, setting in settings:
        _, step = build_step(cfg, lib, setting, check=data[0])
        step(*data[0])
        step(*data[1 % len(data)])
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for x, y in data:
                step(x, y)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / steps
        print(f"\n=== {lib} {setting} {name} {batch}x{seq_len}: {total:.1f} ms of op time "
              "per step ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
    """Command line: the table, or --profile."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="profile instead of timing")
    ap.add_argument("--case", default="llama-6m", help="preset to profile")
    ap.add_argument("--setting", action="append", default=None,
                    help="library:setting to profile, repeatable (default: both eager)")
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    if args.profile:
        chosen = [tuple(s.split(":", 1)) for s in args.setting or
                  ["lmforge:eager", "transformers:eager"]]
        profile(next(c for c in CASES if c[0] == args.case), tuple(chosen))  # type: ignore[arg-type]
        return
    print(run(rounds=args.rounds).markdown())


if __name__ == "__main__":
    main()
