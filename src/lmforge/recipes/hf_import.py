"""Import a Hugging Face causal LM (Llama, Qwen2, Mistral, GPT-2) as an lmforge run folder.

SRC is a local model folder (config.json, safetensors weights, tokenizer files) or, when
online, a Hub name. The run folder gets config.yaml (the model as a DecoderConfig, the source
and its BOS/EOS ids), tokenizer.json and a step-0 checkpoint, so `lmforge generate --run` and
`lmforge export` work on it. Only safetensors weights are read: a pickle is never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from rich.console import Console

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import ConfigError, UserError, to_dict
from lmforge.data.tokenizer import load_tokenizer, vocab_size_of
from lmforge.interop.hf import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    copy_tokenizer,
    load_hf_model,
    read_json,
    resolve_source,
    special_token_id,
)
from lmforge.utils.io import atomic_dir

POSITIONAL = ("src",)

EXAMPLES = """
lmforge import ./SmolLM2-135M --out runs/smollm2          # a local Hugging Face folder
lmforge import HuggingFaceTB/SmolLM2-135M --out runs/smollm2   # a Hub name, when online
lmforge generate --run runs/smollm2 --prompt "The capital of France is" --greedy
"""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    """Options of `lmforge import`."""

    src: str = ""
    """Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or a Hub name (online)."""
    out: str = ""
    """Run folder to create, e.g. runs/llama."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision of the saved weights; auto keeps the file's (generate computes in fp32 either way)."""
    overwrite: bool = False
    """Replace --out if it exists."""

    def __post_init__(self) -> None:
        if not self.src:
            raise ConfigError("src: missing; name the model: lmforge import SRC --out runs/NAME")
        if not self.out:
            raise ConfigError("out: missing; say where the run goes, e.g. --out runs/NAME")


def main(cfg: Config) -> int:
    """Read the folder, convert config, weights and tokenizer, write the run atomically."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it, or another --out")
    folder = resolve_source(cfg.src)
    model, arch = load_hf_model(folder, DTYPES.get(cfg.dtype))
    hf = read_json(folder / CONFIG_FILE)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        copy_tokenizer(folder, tmp)
        tok = load_tokenizer(tmp / TOKENIZER_FILE)
        if vocab_size_of(tok) > model.cfg.vocab_size:
            raise UserError(f"{folder}: the tokenizer has ids up to {vocab_size_of(tok) - 1} "
                            f"but vocab_size is {model.cfg.vocab_size}; wrong tokenizer files?")
        bos_id, eos_id = (special_token_id(folder, hf, name, tok) for name in ("bos", "eos"))
        record = {"source": cfg.src, "architecture": arch, "bos_id": bos_id, "eos_id": eos_id,
                  "model": to_dict(model.cfg)}
        (tmp / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
        save_checkpoint(tmp, TrainState(), model, None,
                        info={"source": cfg.src, "architecture": arch, "folder": str(folder)})
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    Console(highlight=False).print(
        f"imported {arch} from {cfg.src}: {model.num_params():,} parameters ({dtype}), "
        f"{model.cfg.n_layer} layers, width {model.cfg.n_embd}, context {model.cfg.block_size}, "
        f"eos id {eos_id}\n-> {out}    try: lmforge generate --run {out} --greedy",
        markup=False, soft_wrap=True,
    )
    return 0
