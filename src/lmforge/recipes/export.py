"""Export a run's model to another format: a Hugging Face folder that transformers loads.

`--format hf` writes model.safetensors, config.json (LlamaForCausalLM, Qwen2ForCausalLM,
MistralForCausalLM or GPT2LMHeadModel, whichever computes exactly what the run's model does),
generation_config.json and the tokenizer files. It then loads the folder back with transformers,
runs the same tokens through both models in fp32 and prints the max |Δlogits|; beyond
--tolerance it is an error and nothing is left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console

from lmforge.config import ConfigError, UserError, load_yaml
from lmforge.interop.hf import load_back_check, write_hf_folder
from lmforge.recipes.common import LoadedModel, load_model
from lmforge.utils.io import atomic_dir

EXAMPLES = """
lmforge export --run runs/shakespeare --format hf --out exports/shakespeare-hf
lmforge export --run runs/smollm2 --out exports/smollm2 --dtype bfloat16
"""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    """Options of `lmforge export`."""

    run: str = "runs/shakespeare"
    """A run folder (uses its latest checkpoint) or one checkpoint folder."""
    format: Literal["hf"] = "hf"
    """Output format: hf = a Hugging Face transformers model folder."""
    out: str = ""
    """Folder to create, e.g. exports/NAME."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the written weights; the load-back check computes in fp32 either way."""
    tolerance: float = 1e-4
    """Largest max |Δlogits| (fp32) the load-back check accepts."""
    overwrite: bool = False
    """Replace --out if it exists."""

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out: missing; say where the export goes, e.g. --out exports/NAME")
        if not self.tolerance > 0:
            raise ConfigError(f"tolerance: must be > 0, got {self.tolerance}")


def export_hf(loaded: LoadedModel, out: Path, cfg: Config, console: Console) -> None:
    """Write a Hugging Face folder into ``out`` and check it against transformers."""
    bos_id = load_yaml(loaded.run_dir / "config.yaml").get("bos_id")
    dtype = DTYPES[cfg.dtype]
    arch = write_hf_folder(loaded.model, loaded.run_dir, out, bos_id=bos_id,
                           eos_id=loaded.eos_id, dtype=dtype)
    diff = load_back_check(loaded.model, out, dtype)
    console.print(f"load-back check ({arch} in transformers, fp32): max |Δlogits| = {diff:.2e}",
                  markup=False, soft_wrap=True)
    if not diff <= cfg.tolerance:  # also catches NaN
        raise UserError(f"{cfg.out}: transformers' logits differ from lmforge's by {diff:.2e} "
                        f"(> --tolerance {cfg.tolerance:g}); nothing was written")


def _exporters() -> dict[str, Callable[[LoadedModel, Path, Config, Console], None]]:
    # One function per --format; a new format is one more entry (and one more Literal value).
    return {"hf": export_hf}


def main(cfg: Config) -> int:
    """Load the run, write the export under a temporary name, check it, rename it into place."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or another --out")
    console = Console(highlight=False)
    loaded = load_model(cfg.run)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        _exporters()[cfg.format](loaded, tmp, cfg, console)
    console.print(f"exported {loaded.checkpoint} as {cfg.format} -> {out}", markup=False,
                  soft_wrap=True)
    return 0
