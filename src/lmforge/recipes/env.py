"""Show Python, torch, CUDA, GPUs, attention backends and optional extras: what to check first."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

EXAMPLES = """
lmforge env
lmforge env --json
"""

# (import name, distribution, what it enables, how to install it)
EXTRAS: tuple[tuple[str, str, str, str], ...] = (
    ("tokenizers", "tokenizers", "tokenizer training", "pip install tokenizers"),
    ("safetensors", "safetensors", "checkpoints", "pip install safetensors"),
    ("pyarrow", "pyarrow", "Parquet input", "pip install pyarrow"),
    ("datasets", "datasets", "Hugging Face dataset names (online)", "pip install 'lmforge[hf]'"),
    ("datasketch", "datasketch", "data prepare --near_dup", "pip install 'lmforge[dedup]'"),
    ("transformers", "transformers", "Hugging Face import/export", "pip install transformers"),
    ("gguf", "gguf", "GGUF import/export", "pip install gguf"),
    ("onnxruntime", "onnxruntime", "ONNX export check", "pip install onnx onnxruntime"),
    ("fastapi", "fastapi", "lmforge serve", "pip install fastapi uvicorn"),
    ("tensorboard", "tensorboard", "TensorBoard logs", "pip install tensorboard"),
    ("wandb", "wandb", "Weights & Biases tracking", "pip install wandb"),
    ("torchao", "torchao", "--quant int8/int4 inference", "pip install 'lmforge[quant]'"),
)


@dataclass
class Config:
    """Options of `lmforge env`."""

    json: bool = False
    """Print the report as JSON instead of tables."""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _attention_backends() -> dict[str, bool]:
    """Which scaled_dot_product_attention backends run here, tried on a tiny input."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    out: dict[str, bool] = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("memory_efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            out[name] = True
        except RuntimeError:
            out[name] = False
    return out


def collect() -> dict[str, Any]:
    """Everything `lmforge env` reports, as a JSON-able dict."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}",
                         "bf16": torch.cuda.is_bf16_supported()})
    extras = []
    for module, dist, purpose, install in EXTRAS:
        found = importlib.util.find_spec(module) is not None
        extras.append({"package": dist, "version": _version(dist) if found else None,
                       "for": purpose, "install": None if found else install})
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "lmforge": _version("lmforge"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "mps_available": bool(getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "attention_backends": _attention_backends(),
        "extras": extras,
    }


def main(cfg: Config) -> int:
    """Print the environment report."""
    info = collect()
    if cfg.json:
        print(json.dumps(info, indent=2))
        return 0
    console = Console()
    t = Table(title="lmforge env", show_header=False)
    for key in ("python", "platform", "lmforge", "torch", "cuda", "cuda_available",
                "mps_available", "cpu_threads", "cpu_count"):
        t.add_row(key, str(info[key]))
    backends = info["attention_backends"]
    t.add_row("attention", "  ".join(f"{k}: {'yes' if v else 'no'}" for k, v in backends.items()))
    console.print(t)
    if info["gpus"]:
        g = Table(title="GPUs")
        for col in ("index", "name", "memory_gib", "capability", "bf16"):
            g.add_column(col)
        for gpu in info["gpus"]:
            g.add_row(*(str(gpu[c]) for c in ("index", "name", "memory_gib", "capability", "bf16")))
        console.print(g)
    else:
        console.print("GPUs: none (training runs on the CPU)")
    e = Table(title="optional extras")
    for col in ("package", "version", "for", "to install"):
        e.add_column(col)
    for x in info["extras"]:
        e.add_row(x["package"], x["version"] or "[red]missing", x["for"], x["install"] or "")
    console.print(e)
    return 0
