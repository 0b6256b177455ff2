"""Run by test_fsdp_memory (directly, or under torchrun): set up and train a ~150M-parameter
decoder for 2 steps, check what each rank holds, and write this rank's peak RSS to a JSON file."""

from __future__ import annotations

import functools
import json
import resource
import sys

import torch
from rich.console import Console

from lmforge.checkpoint import TrainState
from lmforge.config import DistConfig, OptimConfig, TrainConfig
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.train.loop import LoopHooks, Runtime, train
from lmforge.train.losses import causal_lm_loss
from lmforge.train.setup import resolve_strategy, setup_training
from lmforge.utils.dist import init_distributed, shutdown
from lmforge.utils.logging import RunLogger

# 12 blocks of width 1024: about 12.6M parameters each, 151M in all, a small vocabulary and short
# sequences so that weights, gradients and AdamW states (16 bytes a parameter) dominate memory.
CFG = DecoderConfig(vocab_size=512, block_size=32, n_layer=12, n_head=8, n_kv_head=8,
                    n_embd=1024, intermediate_size=2816)


def _held(setup) -> dict[str, int]:
    """Elements this rank holds of parameters and optimizer states, and of whole ones."""
    from torch.distributed.tensor import DTensor

    local = whole = 0
    tensors = list(setup.module.parameters())
    tensors += [v for s in setup.optimizer.state.values() for v in s.values() if v.ndim > 0]
    for t in tensors:
        if isinstance(t, DTensor):
            local += t.to_local().numel()
            whole += t.to_local().numel() == t.numel()
        else:
            local += t.numel()
            whole += 1
    return {"local_elements": local, "whole_tensors": whole}


def main(out: str, strategy: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    dist_cfg = DistConfig(strategy=strategy)  # type: ignore[arg-type]
    tc = TrainConfig(max_steps=2, batch_size=1, log_every=1, trackers=[])
    oc = OptimConfig(warmup_steps=0)
    setup = setup_training(functools.partial(Decoder, CFG), info=info,
                           strategy=resolve_strategy(dist_cfg, info, "pretrain", CFG),
                           train_cfg=tc, dist_cfg=dist_cfg, optim_cfg=oc,
                           generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(info.rank)
    batches = ((x[:, :-1], x[:, 1:]) for x in iter(
        lambda: torch.randint(0, CFG.vocab_size, (1, 17), generator=gen), None))
    with RunLogger(None, tc.max_steps, Console(quiet=True), enabled=False) as log:
        train(setup.model, setup.optimizer, batches, causal_lm_loss(), tc, oc, TrainState(), log,
              LoopHooks(), Runtime(dist=info))
    held = _held(setup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    with open(f"{out}.{info.rank}.json", "w") as f:
        json.dump({"rank": info.rank, "peak_rss_mb": peak,
                   "params": sum(p.numel() for p in setup.module.parameters()), **held}, f)
    shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
