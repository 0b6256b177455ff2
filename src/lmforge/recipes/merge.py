"""Fold a LoRA/QLoRA adapter into its base model and write an ordinary run folder.

Reads adapter.json + adapter.safetensors from a `lmforge finetune --method lora|qlora` run,
rebuilds the base (from adapter.json, or --base), applies the adapter, checks that the merged
model's logits equal the adapted model's within 1e-5, and writes <runs_dir>/<out>/ with plain
weights, the tokenizer and the chat template (atomically: the folder appears complete or not
at all). A QLoRA base is dequantized: the merged weights are full precision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from lmforge.checkpoint import TrainState, save_checkpoint
from lmforge.config import ConfigError, UserError
from lmforge.infer.chat import load_chat_template
from lmforge.models.lora import apply_lora, load_adapter_state_dict, merge_lora
from lmforge.models.quant import dequantize_nf4, quantize_nf4
from lmforge.run import ADAPTER_FILE, ADAPTER_INFO, Placement, load_model, write_run_files
from lmforge.utils.io import atomic_dir, atomic_write_json

TOLERANCE = 1e-5
EXAMPLES = """
lmforge merge --adapter runs/chat-lora --out chat-merged
lmforge merge --adapter runs/chat-lora --base runs/shakespeare-copy --out chat-merged
lmforge merge --adapter runs/smollm2-lora --out smollm2-merged --device cuda
"""


@dataclass
class Config(Placement):
    """Options of `lmforge merge`."""

    dtype: Literal["fp32"] = "fp32"
    """Precision of the merge, its logits check and the merged weights: fp32 only, on any --device (merged weights keep full precision; a QLoRA base is dequantized)."""

    adapter: str = "runs/finetuned"
    """A run folder (or any folder) holding adapter.safetensors and adapter.json."""
    out: str = "merged"
    """Name of the merged run, written to <runs_dir>/<out>/."""
    base: str | None = None
    """The base run; null = the base_run recorded in adapter.json."""
    runs_dir: str = "runs"
    """Folder that holds all runs."""
    overwrite: bool = False
    """Replace an existing run of the same name."""

    def __post_init__(self) -> None:
        if not self.out or "/" in self.out or self.out.startswith("."):
            raise ConfigError(f"out: '{self.out}' is not a valid run name (no '/', not hidden)")


def _read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    info_path, weights = folder / ADAPTER_INFO, folder / ADAPTER_FILE
    if not info_path.is_file() or not weights.is_file():
        raise UserError(f"{folder}: needs {ADAPTER_INFO} and {ADAPTER_FILE}; is it a LoRA run of "
                        "`lmforge finetune --method lora`?")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info["lora"]["rank"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{info_path}: not an adapter description (JSON with 'lora')") from None
    return info, load_file(weights)


def main(cfg: Config) -> int:
    """Rebuild base + adapter, merge, check the logits, write the run."""
    folder = Path(cfg.adapter)
    info, tensors = _read_adapter(folder)
    base = cfg.base or info.get("base_run")
    if not base:
        raise UserError(f"{folder / ADAPTER_INFO}: names no base_run; pass --base RUN")
    run_dir = Path(cfg.runs_dir) / cfg.out
    if run_dir.exists() and not cfg.overwrite:
        raise UserError(f"{run_dir} exists; pass --overwrite to replace it or pick another --out")
    loaded = load_model(base, cfg.device, cfg.dtype)
    model = loaded.model
    lora = info["lora"]
    if info.get("method") == "qlora":
        # the adapter was trained on the NF4 base: merge onto that one, stored the same way
        # (adapters written before double quantization existed used the plain PyTorch NF4)
        quantize_nf4(model, bool(lora.get("double_quant", False)),
                     info.get("nf4_backend", "torch"))
    apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
    load_adapter_state_dict(model, tensors, str(folder / ADAPTER_FILE))
    model.eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, min(32, model.cfg.block_size)),
                      generator=torch.Generator().manual_seed(0)).to(model.tok_emb.weight.device)
    with torch.no_grad():
        unmerged = model(x)
        dequantize_nf4(merge_lora(model))
        diff = float((model(x) - unmerged).abs().max())
    assert diff <= TOLERANCE, f"merged logits differ from unmerged by {diff}"
    template = load_chat_template(folder, None)
    with atomic_dir(run_dir, overwrite=cfg.overwrite) as tmp:
        write_run_files(tmp, loaded, template, {"merged_from": str(folder.resolve())})
        save_checkpoint(tmp, TrainState(step=loaded.step), model, None,
                        info={"merged_from": str(folder.resolve()), "max_logit_diff": diff})
        atomic_write_json(tmp / "summary.json", {"run": cfg.out, "base_run": str(base),
                                                 "adapter": str(folder), "max_logit_diff": diff})
    print(f"merged {folder} into {base} -> {run_dir} (max |logit difference| {diff:.2e})")
    return 0
