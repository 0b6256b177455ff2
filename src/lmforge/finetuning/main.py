"""Fine-tune a decoder run on chat data: full, LoRA or QLoRA, through the one training loop.

Reads prompt/completion, `messages` or ShareGPT `conversations` JSONL, renders every row with
the base run's chat template (else ChatML) and trains on the assistant tokens and each reply's
end-of-turn token only. The checks of `lmforge data check` run first: a file that would train
no reply token or no end-of-turn token is refused before anything is written. The new run
folder loads like any other (`lmforge generate`, `chat`, `eval`): its checkpoint holds the
merged weights; LoRA/QLoRA runs also keep adapter.safetensors + adapter.json (`lmforge merge`).

--task classify fine-tunes an encoder instead (an encoder run, or a Hugging Face BERT folder
such as all-MiniLM-L6-v2's), with a new classification head on {text, label} rows, and reports
val (and test) accuracy and macro-F1 before and after.

--resume continues an interrupted run from its latest checkpoint (weights, optimizer, RNG and
data position), so it ends bit-identical to a run that was never stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from lmforge.finetuning.chat import chat_main
from lmforge.finetuning.classify import classify_main
from lmforge.finetuning.common import interrupted
from lmforge.finetuning.options import Config
from lmforge.utils.dist import init_distributed, shutdown
from lmforge.utils.seed import seed_everything


def main(cfg: Config) -> int:
    """Fine-tune for the task; a Ctrl-C ends in one line that says how to resume."""
    info = init_distributed(cfg.dist.device)
    console = Console(quiet=not info.is_main)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    try:
        task = classify_main if cfg.task == "classify" else chat_main
        return task(cfg, console, info)
    except KeyboardInterrupt:
        raise interrupted(Path(cfg.runs_dir) / cfg.out) from None
    finally:
        shutdown(info)


