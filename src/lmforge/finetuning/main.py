"""The entry point of ``lmforge finetune`` (its options and behaviour: ``recipes/finetune.py``'s
help text): joins the torchrun job, seeds, runs the task, ends a Ctrl-C in one line."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from lmforge.finetuning.chat import chat_main
from lmforge.finetuning.classify import classify_main
from lmforge.finetuning.common import interrupted
from lmforge.finetuning.options import Config
from lmforge.finetuning.preference import preference_main
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
        task = {"classify": classify_main, "chat": chat_main}.get(cfg.task, preference_main)
        return task(cfg, console, info)
    except KeyboardInterrupt:
        raise interrupted(Path(cfg.runs_dir) / cfg.out) from None
    finally:
        shutdown(info)


