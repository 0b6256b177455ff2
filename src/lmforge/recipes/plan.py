"""Plan a run before training it: parameters, FLOPs, compute-optimal size, memory and time.

Pure arithmetic over the model config (a preset plus --model.* overrides, as in pretrain) and
the run settings: parameter counts (exactly those of the built model), FLOPs per token
(6N + 12·L·T·d), total compute and the Chinchilla-optimal tokens and model size, training
memory (weights, gradients, optimizer states, activations, with or without activation
checkpointing, for full / LoRA / QLoRA), inference memory (weights in fp32/bf16/int8/int4,
KV cache) and the estimated time on named GPUs at a stated MFU. Nothing is trained.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from lmforge.config import ConfigError, merge, to_dict
from lmforge.models.decoder import DecoderConfig
from lmforge.models.registry import preset
from lmforge.plan import METHODS, Device, InferSettings, TrainSettings, devices, make_plan

EXAMPLES = """
lmforge plan --preset gpt2-124m --train.tokens 2.5e9 --train.batch_size 16 --gpu h100-sxm
lmforge plan --preset llama-15m --train.method qlora --train.lora_rank 16 --train.precision bf16
lmforge plan --preset llama-6m --model.n_layer 12 --train.activation_checkpointing --json
lmforge plan --preset gpt2-124m --infer.context 1024 --infer.batch_size 8 --budget 1e19
"""

DEFAULTS_NOTE = {"model": "from --preset"}


@dataclass
class Config:
    """Options of `lmforge plan`."""

    preset: str = "llama-1m"
    """Named decoder preset (llama-1m, llama-6m, llama-15m, gpt2-124m); --model.* options
    override single fields of it, as in pretrain."""
    model: DecoderConfig = field(default_factory=DecoderConfig)
    """Model architecture (filled from --preset); set --model.vocab_size to your tokenizer's."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """The training run to plan."""
    infer: InferSettings = field(default_factory=InferSettings)
    """The inference workload to plan."""
    gpu: str | None = None
    """Show the time on this device only: a100, h100-sxm, h200, rtx-4090, l4 or cpu; null = all."""
    mfu: float = 0.4
    """Model FLOPs utilization assumed for the time (0.3-0.5 is typical of a tuned GPU run)."""
    cpu_tflops: float | None = None
    """Peak TFLOP/s of 'cpu'; null = measure an fp32 matmul here (about a second)."""
    budget: float | None = None
    """FLOPs budget for the compute-optimal model size; null = this run's 6*N*D."""
    json: bool = False
    """Print the plan as JSON instead of tables."""

    def __post_init__(self) -> None:
        if self.cpu_tflops is not None and self.cpu_tflops <= 0:
            raise ConfigError(f"cpu_tflops: must be > 0, got {self.cpu_tflops}")


def resolve(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the model section from the decoder preset, underneath what the user set."""
    name = data.get("preset", Config.preset)
    if not isinstance(name, str):
        raise ConfigError("preset: must be the name of a decoder preset, e.g. llama-1m")
    base = to_dict(preset(name, "decoder"))
    return {**data, "model": merge(base, data.get("model") or {})}


def measure_cpu_tflops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul throughput of this CPU over a few n x n products, in TFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


def _hardware(cfg: Config) -> list[Device]:
    """The devices to show, measuring the CPU only when it is shown and not given."""
    wanted = [cfg.gpu] if cfg.gpu else None
    known = devices(1.0)
    if wanted and wanted[0] not in known:
        raise ConfigError(f"gpu: unknown device {cfg.gpu!r}; choose one of {', '.join(known)}")
    names = wanted or list(known)
    cpu_tflops = cfg.cpu_tflops
    if "cpu" in names and cpu_tflops is None:
        cpu_tflops = measure_cpu_tflops()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    table = devices(cpu_tflops or 1.0, ram)
    return [table[name] for name in names]


def main(cfg: Config) -> int:
    """Compute the plan; print it as tables or JSON."""
    plan = make_plan(cfg.model, cfg.train, cfg.infer, _hardware(cfg), cfg.mfu, cfg.budget)
    plan["preset"] = cfg.preset
    if cfg.json:
        print(json.dumps(plan, indent=2))
        return 0
    console = Console()
    for table in (_params_table(plan), _compute_table(plan), _train_memory_table(plan),
                  _infer_table(plan), _time_table(plan)):
        console.print(table)
    return 0


# --------------------------------------------------------------------------- formatting


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float) -> str:
    """1311872 -> '1,311,872 (1.31M)'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n:,.0f} ({n / size:.3g}{unit})"
    return f"{n:,.0f}"


def fmt_seconds(s: float) -> str:
    """Seconds in the largest sensible unit."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"


def _table(title: str, *columns: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column(columns[0])
    for c in columns[1:]:
        t.add_column(c, justify="right")
    return t


def _params_table(plan: dict[str, Any]) -> Table:
    p, m = plan["params"], plan["model"]
    t = _table(f"{plan['preset']}: {m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} "
               f"heads ({m['n_kv_head'] or m['n_head']} KV), vocab {m['vocab_size']}",
               "parameters", "count")
    t.add_row("total (= the built model)", fmt_count(p["total"]))
    t.add_row("embedding (token + learned position tables)", fmt_count(p["embedding"]))
    t.add_row("non-embedding", fmt_count(p["non_embedding"]))
    t.add_row("N for FLOPs (non-embedding + output head)", fmt_count(p["flop_params"]))
    return t


def _compute_table(plan: dict[str, Any]) -> Table:
    r, f, c, m = plan["run"], plan["flops"], plan["chinchilla"], plan["model"]
    t = _table("compute", "", "value")
    t.add_row("tokens per step (batch x grad_accum x seq_len)", f"{r['tokens_per_step']:,}")
    t.add_row("steps / tokens D", f"{r['steps']:,} / {fmt_count(r['tokens'])}")
    t.add_row(f"FLOPs per token 6N + 12·L·T·d (T={r['seq_len']}, d={m['n_embd']})",
              f"{f['per_token']:.4g}")
    t.add_row("total compute C (with attention) / 6·N·D", f"{f['total']:.3g} / "
              f"{f['total_6nd']:.3g}")
    t.add_row("hardware FLOPs (method, recomputation)", f"{f['hardware_total']:.3g}")
    t.add_row("Chinchilla-optimal tokens 20·N", f"{fmt_count(c['tokens'])} "
              f"(this run: {c['tokens_per_param']:.3g} tokens/param)")
    t.add_row(f"compute-optimal for C={c['budget_flops']:.3g}: N = sqrt(C/120), D = 20·N",
              f"N {fmt_count(c['n_opt'])}, D {fmt_count(c['d_opt'])}")
    return t


def _train_memory_table(plan: dict[str, Any]) -> Table:
    s, by = plan["train_settings"], plan["train_memory_by_method"]
    heads = [f"{m}{' r=' + str(s['lora_rank']) if m != 'full' else ''}"
             f"{' *' if m == s['method'] else ''}" for m in METHODS]
    ac = "with" if s["activation_checkpointing"] else "without"
    where = ("" if s["gpus"] == 1 else
             f" per device of {s['gpus']} ({s['strategy']}" + (f", tp {s['tp']}" if s["tp"] > 1
                                                              else "") + ")")
    t = _table(f"training memory{where}: {s['precision']}, {s['optimizer']}, micro-batch "
               f"{s['batch_size']} x {plan['run']['seq_len']}, {s['attention']} attention, "
               f"{ac} activation checkpointing (* = --train.method)", "", *heads)
    t.add_row("trainable parameters", *(fmt_count(by[m]["trainable_params"]) for m in METHODS))
    for key in ("weights", "gradients", "optimizer"):
        t.add_row(key, *(fmt_bytes(by[m][key]) for m in METHODS))
    parts = [("layers", "activations: blocks"), ("head", "activations: head"),
             ("loss", "activations: fp32 loss")]
    if s["activation_checkpointing"]:  # the larger of these two counts in the peak
        parts.append(("recompute", "activations: a recomputed block"))
    for key, label in parts:
        t.add_row(label, *(fmt_bytes(by[m]["activation_parts"][key]) for m in METHODS))
    t.add_row("[bold]peak estimate[/]", *(f"[bold]{fmt_bytes(by[m]['peak'])}[/]"
                                          for m in METHODS))
    t.add_row("sum of all (upper bound)", *(fmt_bytes(by[m]["sum"]) for m in METHODS))
    q = by["qlora"]["nf4"]
    dq = "with" if q["double_quant"] else "without"
    t.add_row(f"qlora base: NF4 {dq} double quantization", "", "",
              f"{q['bits_per_weight']:.3f} bits/weight")
    t.add_row("qlora / lora frozen base: embeddings, head, norms, biases", "", "fp32",
              f"{q['other_dtype']}")
    return t


def _infer_table(plan: dict[str, Any]) -> Table:
    i = plan["infer"]
    t = _table(f"inference memory: context {i['context']}, batch {i['batch_size']}",
               "weights", "weights", "KV cache", "prefill logits", "total")
    for row in i["memory"]:
        t.add_row(row["weights_format"], fmt_bytes(row["weights"]), fmt_bytes(row["kv_cache"]),
                  fmt_bytes(row["prefill_logits"]), fmt_bytes(row["total"]))
    return t


def _time_table(plan: dict[str, Any]) -> Table:
    s = plan["train_settings"]
    on = "" if s["gpus"] == 1 else f" on {s['gpus']} devices"
    t = _table(f"training time: {plan['flops']['hardware_total']:.3g} FLOPs at the stated MFU{on}",
               "device", f"peak {s['precision']} TFLOP/s", "MFU", "time", "memory", "peak fits")
    for row in plan["time"]:
        fits = "?" if row["fits"] is None else ("yes" if row["fits"] else "[red]no[/]")
        mem = "?" if row["memory_gib"] is None else f"{row['memory_gib']:.0f} GiB"
        t.add_row(row["label"], f"{row['peak_tflops']:.3g}", f"{row['mfu']:.2f}",
                  fmt_seconds(row["seconds"]), mem, fits)
    return t
