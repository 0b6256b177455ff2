"""Who am I in a torchrun job: rank, world size, device. Passed explicitly, never global."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes files; the other ranks only compute."""
        return self.rank == 0

    launched: bool = False
    """True when started by torchrun (a process group exists, even with one process)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK, if any.

    NCCL on CUDA, gloo on CPU. Without those variables this is a single process and no
    process group is created.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev,
                    launched=launched)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the identity for one process)."""
    out = value.detach().clone()
    if info.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= info.world_size
    return out


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy)."""
    out = value.detach().clone()
    if info.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group cleanly."""
    if info.launched and dist.is_initialized():
        dist.destroy_process_group()


def on_main(info: DistInfo, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only; a UserError it raises is raised on every rank, so the other
    ranks stop with the same one line instead of waiting forever at the next collective."""
    from lmforge.config import UserError

    error = ""
    if info.is_main:
        try:
            fn()
        except UserError as e:
            error = str(e) or type(e).__name__
    if info.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)
