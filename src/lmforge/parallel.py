"""Efficiency and distribution, applied to a built model from outside.

The model files know nothing of any of this. A recipe applies these functions in this order
(the torchtitan order, and the only one that composes):

0. ``apply_tp``      tensor parallelism (decoder only): each block's attention heads and MLP
   hidden units split over the ranks of a "tp" mesh dimension — first, because it replaces
   the linear layers' weights by DTensors that everything after sees;
1. ``apply_ac``      activation checkpointing per block (recompute in backward, save memory);
2. ``apply_compile`` ``torch.compile`` per block — after AC so the checkpointed region is what
   gets compiled, and per block so recompiles stay small (every block has the same graph);
3. ``apply_fsdp`` or ``apply_ddp`` — last, because both wrap or shard the parameters the
   previous steps already see. With TP, FSDP shards over the other ("dp") mesh dimension.

Checkpoint keys never change: AC and compile are applied in place (``Module.compile`` keeps
names, unlike ``torch.compile(model)`` which adds ``_orig_mod.``), FSDP2 keeps names, and DDP's
``module.`` prefix is removed by ``checkpoint.unwrap_model`` when saving.

Sharding strategies in DeepSpeed ZeRO terms:

- ``fsdp`` with ``reshard_after_forward=True``: parameters, gradients and optimizer states are
  all sharded — ZeRO stage 3;
- ``fsdp`` with ``reshard_after_forward=False``: parameters stay gathered between forward and
  backward (no second all-gather), gradients and optimizer states sharded — like ZeRO stage 2;
- ``cpu_offload=True``: parameters, gradients and optimizer states live in CPU memory and the
  optimizer steps on the CPU — ZeRO-Offload / ZeRO-Infinity (CPU) for models larger than GPU
  memory;
- ``ddp``: everything replicated, gradients all-reduced — ZeRO stage 0.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Precision = Literal["fp32", "bf16", "fp16"]


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the members of the model's ModuleLists (a decoder's
    ``blocks``, an encoder's ``layer``, an encoder-decoder's two ``layers``), outermost only."""
    blocks: list[nn.Module] = []
    outer: list[str] = []  # names of the ModuleLists taken: nested ones are inside a block
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{o}.") for o in outer):
            outer.append(name)
            blocks.extend(module)
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no ModuleList of blocks to wrap")
    return blocks


def apply_ac(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them.

    Non-reentrant checkpointing (the PyTorch recommendation): works with kwargs, with
    ``torch.compile`` and with FSDP2. Costs about one extra forward per step.
    """
    for block in _blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (``Module.compile``: state-dict names are unchanged)."""
    for block in _blocks(model):
        block.compile()


def apply_ddp(model: nn.Module, device: str) -> nn.Module:
    """Replicate the model on every rank; gradients are all-reduced in backward."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def make_mesh(device: str, world_size: int, tp: int) -> DeviceMesh:
    """A 2-D ("dp", "tp") device mesh: ranks r..r+tp-1 form one tensor-parallel group.

    Neighbouring ranks share a TP group because TP talks at every layer and should stay on the
    fastest links (within a node); data parallelism talks once per step.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if tp < 1 or world_size % tp:
        raise ConfigError(f"dist.tp: {tp} does not divide the {world_size} processes; choose a "
                          f"divisor of --nproc_per_node x nodes")
    kind = torch.device(device).type
    return init_device_mesh(kind, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def check_tp(cfg: object, tp: int) -> None:
    """ConfigError unless ``cfg`` is a decoder config whose query and KV heads split ``tp`` ways."""
    for name in ("n_head", "kv_heads"):
        heads = getattr(cfg, name, None)
        if not isinstance(heads, int):
            raise ConfigError("dist.tp: tensor parallelism is for decoder models (lmforge "
                              "pretrain with the default --objective clm)")
        if heads % tp:
            raise ConfigError(f"dist.tp: {tp} does not divide the model's {name} ({heads}); "
                              f"choose a tp that divides both n_head and n_kv_head")


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallelism for each decoder block, in place.

    q/k/v and the MLP's first layer(s) are column-parallel (each rank computes a slice of the
    heads / hidden units from the replicated input); the attention output and the MLP's last
    layer are row-parallel (each rank multiplies its slice, one all-reduce gives the replicated
    sum). Two all-reduces per block forward, two in backward. Embeddings, norms and the head
    stay replicated. Attention reads its local head count from the projections' output.
    """
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    check_tp(getattr(model, "cfg", None), tp_mesh.size())
    for block in _blocks(model):
        plan: dict = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                      "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel()}
        if hasattr(block.mlp, "gate_proj"):
            plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                         "mlp.down_proj": RowwiseParallel()})
        else:
            plan.update({"mlp.fc_in": ColwiseParallel(), "mlp.fc_out": RowwiseParallel()})
        parallelize_module(block, tp_mesh, plan)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for any mix of plain and DTensor parameters; returns the total norm.

    Under TP, and under FSDP x TP, parameters live on different meshes (or on none), and
    torch's own function cannot stack their norms; the norm of each group is made a plain
    (full) tensor first, then they are combined (2-norm).
    """
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    if len(groups) <= 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms))
    for grads in groups.values():
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return total


def apply_fsdp(model: nn.Module, precision: Precision, reshard_after_forward: bool = True,
               cpu_offload: bool = False, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard parameters, gradients and optimizer states over ranks with FSDP2 (``fully_shard``).

    Each block is its own unit so only one block's full parameters exist at a time; the root
    call covers embeddings, final norm and head. Under bf16/fp16 the parameters are gathered in
    that dtype while gradients are reduced in fp32 (FSDP2's MixedPrecisionPolicy). ``mesh``
    is the 1-D data-parallel mesh (the "dp" dimension under TP); None = every rank.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else None
    kwargs: dict = {"reshard_after_forward": reshard_after_forward, "mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in _blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip gradient synchronization on all but the last micro-step of an accumulation.

    DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync(False)`` (gradients then stay
    unsharded and are reduce-scattered once, on the last micro-step).
    """
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def autocast(precision: Precision, device: str) -> contextlib.AbstractContextManager:
    """The autocast region for the forward pass (fp32 = no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(precision: Precision, device: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling so small gradients do not flush to zero; bf16 and fp32 do not."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
