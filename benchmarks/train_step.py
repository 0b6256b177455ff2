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
  ``Module.compile()`` on each of transformers' decoder layers, so the peer gets the same lever;
- the floor (``floor_step``, 1-thread cases): the step's matrix products alone, then with SDPA,
  on lmforge's shapes — the ceiling of any implementation calling those kernels.

MFU is reported against this CPU's fp32 matmul peak, sampled once per round (best sample).

    python benchmarks/train_step.py             # the table
    python benchmarks/train_step.py --profile   # where the time goes (torch.profiler)
    python benchmarks/train_step.py --levers --case llama-1m   # levers on the compiled step
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
from lmforge.train.losses import causal_lm_loss, linear_cross_entropy, mean_loss
from lmforge.train.optim import build_optimizer

Step = Callable[[Tensor, Tensor], None]
# Not settings of a model but the floor of its step (``floor_step``), timed in the same rounds.
FLOOR_MM, FLOOR_ALL = "floor: matmuls only", "floor: matmuls + SDPA"
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
    ("transformers", "eager"), ("transformers", "compile"),
    ("lmforge", FLOOR_MM), ("lmforge", FLOOR_ALL))
# Table rows: (lmforge setting, transformers setting) compared.
PAIRS: tuple[tuple[str, str], ...] = (
    ("eager", "eager"), ("chunked loss", "eager"), ("compile + chunked loss", "eager"),
    ("compile + chunked loss", "compile"), (FLOOR_MM, "eager"), (FLOOR_ALL, "eager"))


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


def floor_step(cfg: DecoderConfig, batch: int, seq_len: int, attention: bool,
               chunk: int = 256) -> Step:
    """The step's matrix products alone, on lmforge's shapes: every block linear's forward and
    its two backward products, the tied head's three per chunk of ``chunk`` rows (as the
    chunked loss runs them), and with ``attention`` SDPA's forward and backward per layer.

    No implementation that calls these kernels can step faster, so transformers' step time over
    this one is the most any such implementation can reach against it (the ceiling).
    """
    torch.manual_seed(0)
    model, m = Decoder(cfg), batch * seq_len
    weights = [mod.weight.detach() for mod in model.blocks.modules() if isinstance(mod, nn.Linear)]
    acts = {w.shape: (torch.randn(m, w.shape[1]), torch.randn(m, w.shape[0])) for w in weights}
    head = model.lm_head.weight.detach()  # (V, C)
    h, g = torch.randn(m, cfg.n_embd), torch.randn(chunk, cfg.vocab_size)
    dw = torch.zeros_like(head)
    H, G, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    # (B, T, heads, D) viewed as (B, heads, T, D), the layout the model hands SDPA
    q, k, v = (torch.randn(batch, seq_len, n, D).transpose(1, 2).requires_grad_()
               for n in (H, G, G))
    dy = torch.randn(batch, H, seq_len, D)

    def step(x: Tensor, y: Tensor) -> None:
        for w in weights:
            a, da = acts[w.shape]  # (M, in), (M, out)
            F.linear(a, w)  # forward (M, out)
            da @ w  # grad of the input (M, in)
            da.t() @ a  # grad of the weight (out, in)
        for s in range(0, m, chunk):
            hc = h[s:s + chunk]  # (chunk, C)
            hc @ head.t()  # logits (chunk, V)
            g @ head  # grad of the hidden states (chunk, C)
            dw.addmm_(g.t(), hc)  # grad of the head
        for _ in range(cfg.n_layer if attention else 0):
            F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=G != H).backward(dy)
            q.grad = k.grad = v.grad = None

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
        if key[1] in (FLOOR_MM, FLOOR_ALL):
            steps_of[key] = floor_step(cfg, batch, seq_len, attention=key[1] == FLOOR_ALL)
        else:
            _, steps_of[key] = build_step(cfg, *key, check=data[0])
        t0 = time.perf_counter()
        for i in range(warmup):
            steps_of[key](*data[i % len(data)])
            first.setdefault(key, time.perf_counter() - t0)
    wall: dict[tuple[str, str], list[float]] = {key: [] for key in steps_of}
    cpu: dict[tuple[str, str], list[float]] = {key: [] for key in steps_of}
    order = list(steps_of)
    tokens = len(data) * batch * seq_len
    peaks: list[float] = []  # sampled every round, so one loaded moment cannot set it
    for r in range(rounds):
        peaks.append(matmul_flops_per_cpu_second())
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
            "peak": max(peaks), "peaks": peaks,
            "rounds": {key: [round(s) for s in v] for key, v in wall.items()}}


def matmul_flops_per_cpu_second(n: int = 1024, repeats: int = 3) -> float:
    """This CPU's fp32 matmul rate on the current torch threads: the best of ``repeats``
    n x n products, per CPU-second of this process (what other processes cannot steal)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - c0)
    return 2.0 * n**3 / best


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
                "eager` is per CPU-second too; `compile s` is the first step's wall time (one-off). "
                f"`{FLOOR_MM}` / `{FLOOR_ALL}` (1-thread cases) time only the step's matrix "
                "products on lmforge's shapes (each block linear forward and its two backward "
                "products, the tied head's three per 256-row chunk), then also SDPA's forward "
                "and backward per layer (`floor_step`), in the same rounds: their ratio to "
                "transformers is the ceiling of any implementation calling those kernels."),
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
            peak, flops = r["peak"], r["flops_per_token"]
            section.notes.append(
                f"`{r['case']}`, 1 thread, MFU per CPU-second against this CPU's fp32 matmul "
                f"peak ({peak / 1e9:.1f} GFLOP/s: the best 1024^3 product of "
                f"{len(r['peaks'])} samples, one per round; each round's best: "
                f"{', '.join(f'{p / 1e9:.0f}' for p in r['peaks'])}): " + "; ".join(
                    f"{setting} {v * flops / peak:.0%}"
                    for (lib, setting), v in r["cpu"].items() if lib == "lmforge") + ".")
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


# Levers tried on lmforge's best step (compile per block + chunked loss), 1 thread: each is
# timed against that baseline in the same interleaved rounds (``levers``).
LEVERS: tuple[str, ...] = (
    "baseline (chunk 256)", "loss chunk 128", "loss chunk 512", "loss chunk 1024",
    "compile dynamic=False", "compile the whole model",
    "softmax attention written out (inductor fuses it)")


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                      dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """SDPA's math written out (scores, causal mask, softmax, values), for inductor to fuse
    instead of calling SDPA's CPU flash kernel; q (B, H, T, D), k and v (B, G, T, D)."""
    H, G, T = q.shape[1], k.shape[1], q.shape[2]
    if G != H:
        k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:  # (B, H, T, T)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, H, T, D)


def lever_step(cfg: DecoderConfig, lever: str) -> Step:
    """lmforge's compiled step with the chunked loss, changed by one lever of ``LEVERS``."""
    torch.manual_seed(0)
    model = Decoder(cfg)
    chunk = int(lever.split()[-1]) if lever.startswith("loss chunk") else 256
    if lever == "compile the whole model":
        model.compile()
    elif lever == "compile dynamic=False":
        for block in model.blocks:
            block.compile(dynamic=False)
    else:
        apply_compile(model)
    if lever.startswith("softmax attention"):
        for block in model.blocks:
            block.attn.attend = softmax_attention

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        h = model(x, hidden=True).flatten(0, 1)  # (B*T, C)
        return linear_cross_entropy(h, model.lm_head.weight, y.flatten(), chunk) / y.numel()

    return make_step(model, loss_of)


def levers(case: tuple[str, int, int, int], rounds: int, steps: int = 2,
           warmup: int = 2) -> Section:
    """Each lever's tokens per CPU-second against the baseline, interleaved rounds."""
    name, batch, seq_len, threads = case
    torch.set_num_threads(threads)
    cfg = preset(name)
    data = batches(cfg, batch, seq_len, steps)
    steps_of = {lever: lever_step(cfg, lever) for lever in LEVERS}
    first: dict[str, float] = {}
    for lever, step in steps_of.items():
        t0 = time.perf_counter()
        for i in range(warmup):
            step(*data[i % len(data)])
        first[lever] = time.perf_counter() - t0
    cpu: dict[str, list[float]] = {lever: [] for lever in LEVERS}
    tokens = len(data) * batch * seq_len
    for r in range(rounds):
        k = r % len(LEVERS)
        for lever in LEVERS[k:] + LEVERS[:k]:
            c0 = time.process_time()
            for x, y in data:
                steps_of[lever](x, y)
            cpu[lever].append(tokens / (time.process_time() - c0))
    base = median(cpu[LEVERS[0]])
    section = Section(
        title=f"Training-step levers, `{name}` {batch} x {seq_len}, {threads} thread(s)",
        method=(f"lmforge's step with `compile` per block and the chunked loss, each lever "
                f"changing one thing; {warmup} warm-up steps (compiling), then {rounds} "
                f"interleaved rounds of {steps} steps (order rotating); median tokens per "
                "CPU-second; `python benchmarks/train_step.py --levers --case "
                f"{name} --rounds {rounds}`."),
        columns=["lever", "tokens per CPU-second", "vs baseline", "vs baseline, median of "
                 "per-round ratios", "warm-up s (compile)", "per round"])
    for lever in LEVERS:
        # the load moves whole rounds up and down: a ratio within each round cancels most of it
        per_round = median([a / b for a, b in zip(cpu[lever], cpu[LEVERS[0]], strict=True)])
        section.rows.append([lever, f"{median(cpu[lever]):,.0f}",
                             f"{median(cpu[lever]) / base:.2f}", f"**{per_round:.2f}**",
                             f"{first[lever]:.0f}", ", ".join(f"{v:.0f}" for v in cpu[lever])])
    return section


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
    ap.add_argument("--case", default="llama-6m", help="preset to profile or to time the levers on")
    ap.add_argument("--setting", action="append", default=None,
                    help="library:setting to profile, repeatable (default: both eager)")
    ap.add_argument("--levers", action="store_true",
                    help="time the levers on lmforge's compiled step instead")
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    case = next(c for c in CASES if c[0] == args.case)
    if args.levers:
        print(levers(case, args.rounds).markdown())
        return
    if args.profile:
        chosen = [tuple(s.split(":", 1)) for s in args.setting or
                  ["lmforge:eager", "transformers:eager"]]
        profile(case, tuple(chosen))  # type: ignore[arg-type]
        return
    print(run(rounds=args.rounds).markdown())


if __name__ == "__main__":
    main()
