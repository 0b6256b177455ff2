"""The one training setup: how every trainable mode gets its model, optimizer and strategy.

Pretraining (clm, mlm, seq2seq) and fine-tuning (chat, classify; full, LoRA) all come through
``setup_training``, in torchtitan's order:

1. build the model on the meta device (no memory, no init) and adapt it there (LoRA, freezing);
2. apply tensor parallelism, activation checkpointing, compile, then FSDP2 — to meta tensors,
   so under FSDP each rank only ever allocates its own shards;
3. materialize (``to_empty``) on the device and fill every parameter: from a checkpoint read
   one tensor at a time, else by the model's own init rule, module by module (``init_module``)
   with one generator — the same stream of values one process would draw, so a sharded run
   starts bit-identical to a single-process one while no rank holds more than one full tensor;
4. wrap in DDP (which needs real tensors) and build the optimizer over the trained parameters.

The full weights are gathered only when something needs them, on rank 0, to CPU
(``gather_full``): the end-of-run report, a merged fine-tune.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.checkpoint import (
    TrainState,
    checkpoint_optimizer,
    checkpoint_state,
    checkpoint_weights,
    is_sharded,
    load_checkpoint,
    load_sharded_checkpoint,
    read_meta,
    resolve_ref,
)
from lmforge.config import DistConfig, OptimConfig, TrainConfig, UserError
from lmforge.models.lora import LoRALinear, init_lora
from lmforge.parallel import (
    apply_ac,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    apply_tp,
    check_tp,
    grad_scaler,
    make_mesh,
)
from lmforge.train.optim import build_optimizer
from lmforge.utils.dist import DistInfo

Strategy = Literal["none", "ddp", "fsdp", "tp", "fsdp+tp"]
Weights = Mapping[str, Tensor]
"""Full tensors by parameter name, read on demand (``checkpoint.SafetensorsWeights``, a dict)."""


def resolve_strategy(dist_cfg: DistConfig, info: DistInfo, command: str,
                     tp_model: object | None = None) -> Strategy:
    """none | ddp | fsdp | tp (tensor parallel alone) | fsdp+tp (the 2-D mesh); one-line errors
    for what cannot work. ``tp_model`` is the decoder config when TP is possible, else None."""
    strategy, tp = dist_cfg.strategy, dist_cfg.tp
    launch = f"torchrun --nproc_per_node N -m lmforge.cli {command} ..."
    if tp > 1:
        if not info.launched:
            raise UserError(f"--dist.tp {tp} needs torchrun: {launch.replace('N', str(tp))}")
        if tp_model is None:
            raise UserError("--dist.tp: tensor parallelism is for decoders (pretrain --objective "
                            "clm, finetune --task chat with --method full)")
        if info.world_size % tp:
            raise UserError(f"--dist.tp {tp} does not divide the {info.world_size} processes")
        check_tp(tp_model, tp)
        if strategy in ("ddp", "none"):
            raise UserError(f"--dist.tp does not compose with --dist.strategy {strategy}; "
                            f"use --dist.strategy fsdp (or auto) for the data-parallel ranks")
        return "tp" if info.world_size == tp else "fsdp+tp"
    if strategy == "auto":
        return "ddp" if info.distributed else "none"
    if strategy in ("ddp", "fsdp") and not info.launched:
        raise UserError(f"--dist.strategy {strategy} needs torchrun: {launch}")
    if strategy == "none" and info.distributed:
        raise UserError("--dist.strategy none with several processes would train separate "
                        "models; use ddp or fsdp (or auto)")
    return strategy  # type: ignore[return-value]


def data_ranks(info: DistInfo, tp: int) -> DistInfo:
    """The data-parallel view of the job: the tp ranks of one TP group read the same batches."""
    if tp == 1:
        return info
    return dataclasses.replace(info, rank=info.rank // tp, world_size=info.world_size // tp)


@dataclass
class Setup:
    """What the loop trains: the model it calls (maybe DDP-wrapped), the module underneath
    (the same parameters: DTensor shards under FSDP / TP), its optimizer and how it runs."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    strategy: Strategy
    info: DistInfo
    scaler: torch.amp.GradScaler | None = None

    @property
    def sharded(self) -> bool:
        """True when no rank holds whole parameters (FSDP and/or TP)."""
        return self.strategy in ("fsdp", "tp", "fsdp+tp")


def setup_training(
    build: Callable[[], nn.Module],
    *,
    info: DistInfo,
    strategy: Strategy,
    train_cfg: TrainConfig,
    dist_cfg: DistConfig,
    optim_cfg: OptimConfig,
    generator: torch.Generator,
    weights: Weights | None = None,
    adapt: Callable[[nn.Module], None] | None = None,
    rename: Callable[[str], str] | None = None,
) -> Setup:
    """Build, adapt, parallelize, materialize and fill the model; return it with its optimizer.

    ``weights`` holds the starting values (a base model, ``--init_from``); parameters it lacks
    (new heads, LoRA adapters, everything when None) get the model's own init. ``adapt`` runs
    on the meta model before parallelization (LoRA, freezing); ``rename`` maps a parameter name
    to its name in ``weights`` (default: LoRA-wrapped names back to the base layer's).
    """
    with torch.device("meta"):
        model = build()
    if adapt is not None:
        adapt(model)
    mesh = make_mesh(info.device, info.world_size, dist_cfg.tp) if "tp" in strategy else None
    if mesh is not None:
        apply_tp(model, mesh["tp"])
    if train_cfg.activation_checkpointing:
        apply_ac(model)
    if train_cfg.compile:
        apply_compile(model)
    if strategy in ("fsdp", "fsdp+tp"):
        apply_fsdp(model, train_cfg.precision, dist_cfg.reshard_after_forward,
                   dist_cfg.cpu_offload, mesh=mesh["dp"] if mesh is not None else None)
    # CPU offload keeps the shards in CPU memory; FSDP moves each one to the device in use.
    materialize(model, "cpu" if dist_cfg.cpu_offload else info.device)
    fill(model, generator, weights, rename or lora_base_names(model))
    wrapped = apply_ddp(model, info.device) if strategy == "ddp" else model
    return Setup(wrapped, model, build_optimizer(model, optim_cfg), strategy, info,
                 grad_scaler(train_cfg.precision, info.device))


def materialize(model: nn.Module, device: str | torch.device) -> None:
    """Allocate the meta model's (sharded) storage on ``device`` and compute its buffers."""
    model.to_empty(device=device)
    for module in model.modules():
        init_buffers = getattr(module, "init_buffers", None)
        if callable(init_buffers):
            init_buffers()


def lora_base_names(model: nn.Module) -> Callable[[str], str]:
    """Map ``x.q_proj.base.weight`` (a LoRA-wrapped layer) to the base model's ``x.q_proj.weight``."""
    wrapped = [name + ".base." for name, m in model.named_modules() if isinstance(m, LoRALinear)]

    def rename(name: str) -> str:
        for prefix in wrapped:
            if name.startswith(prefix):
                return prefix[: -len("base.")] + name[len(prefix):]
        return name

    return rename


@torch.no_grad()
def fill(model: nn.Module, generator: torch.Generator, weights: Weights | None = None,
         rename: Callable[[str], str] = lambda n: n) -> list[str]:
    """Give every parameter its value; return the names filled from ``weights``.

    Parameters found in ``weights`` are copied (one full tensor at a time, each rank keeping
    its slice). Then every module whose own parameters were not all loaded is initialized by
    the model's rule (``init_module``; LoRA adapters by ``init_lora``) in module order, drawing
    from ``generator`` exactly as ``init_weights`` does on one process.
    """
    loaded: set[int] = set()  # parameters given their value (tied ones count once)
    names: list[str] = []
    if weights is not None:
        for name, module in model.named_modules():  # NF4 layers: quantized as they load
            load_weight = getattr(module, "load_weight", None)
            if callable(load_weight):
                key = rename(f"{name}.weight")
                if key not in weights:
                    raise UserError(f"{key}: not in the checkpoint; is it the right base model?")
                load_weight(weights[key])
        for name, p in model.named_parameters():
            key = rename(name)
            if key in weights:
                copy_full(p, weights[key])
                loaded.add(id(p))
                names.append(name)
    rule = getattr(model, "init_module", None)
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own or all(id(p) in loaded for p in own.values()):
            continue
        if any(id(p) in loaded for p in own.values()):
            raise UserError(f"{name}: only some of its weights are in the checkpoint "
                            f"({', '.join(own)}); is it the right base model?")
        _init_module(module, name, generator, rule)
        loaded.update(id(p) for p in own.values())
    return names


def _init_module(module: nn.Module, name: str, generator: torch.Generator,
                 rule: Callable | None) -> None:
    """Run the init rule on full tensors of this module's own parameters, then copy them in.

    Plain parameters are initialized in place; sharded ones through a stand-in module that
    holds full CPU tensors of just this module's parameters.
    """
    own = dict(module.named_parameters(recurse=False))
    sharded = any(_is_dtensor(p) for p in own.values())
    target = module
    if sharded:
        target = copy.copy(module)  # same class and settings, for the rule's isinstance checks
        object.__setattr__(target, "_modules", {})
        object.__setattr__(target, "_parameters", {  # None stays None (a Linear's bias)
            k: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                   requires_grad=False)
            for k, p in module._parameters.items()})
    if isinstance(module, LoRALinear):
        init_lora(target, generator)
    elif rule is not None:
        rule(name, target, generator)
    else:
        raise TypeError(f"{type(module).__name__} {name}: the model has no init_module rule")
    if sharded:
        for key, p in own.items():
            copy_full(p, target._parameters[key])


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@torch.no_grad()
def copy_full(dst: Tensor, full: Tensor) -> None:
    """Copy a full tensor into a parameter: whole, or this rank's slice of a DTensor."""
    if tuple(dst.shape) != tuple(full.shape):
        raise UserError(f"a checkpoint tensor of shape {tuple(full.shape)} does not fit a "
                        f"parameter of shape {tuple(dst.shape)}; is it the right base model?")
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        # every rank holds the same full tensor: each keeps its slice, no communication
        mine = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh,  # type: ignore[attr-defined]
                                 dst.placements, src_data_rank=None)  # type: ignore[attr-defined]
        dst.to_local().copy_(mine.to_local())  # type: ignore[attr-defined]
    else:
        dst.copy_(full.to(dst.device, dst.dtype))


def gather_full(setup: Setup, build: Callable[[], nn.Module]) -> nn.Module | None:
    """Collective under FSDP / TP: the trained weights as a plain CPU model on rank 0 (None on
    the other ranks, which never hold them). Unsharded runs return their own module."""
    if not setup.sharded:
        return setup.module if setup.info.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(setup.module, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
    if not setup.info.is_main:
        return None
    with torch.device("meta"):
        plain = build()
    materialize(plain, "cpu")
    fill(plain, torch.Generator(), full)
    return plain.eval()


def load_state(setup: Setup, ckpt: Path) -> tuple[TrainState, dict[str, Tensor], dict]:
    """Resume weights, optimizer state and RNG from a checkpoint; (state, extras, info).

    A sharded checkpoint loads into sharded models at any world size (each rank reads its
    slices); a single-file one is streamed tensor by tensor into either kind, so under FSDP
    no rank ever holds the whole model or optimizer state.
    """
    if not setup.sharded:
        return load_checkpoint(ckpt, setup.module, setup.optimizer)
    if is_sharded(read_meta(ckpt)):
        return load_sharded_checkpoint(ckpt, setup.module, setup.optimizer)
    fill(setup.module, torch.Generator(), checkpoint_weights(ckpt))
    _stream_optimizer(ckpt, setup.optimizer)
    return checkpoint_state(ckpt)


@torch.no_grad()
def _stream_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    """Give each (sharded) parameter its slice of a single-file checkpoint's optimizer state."""
    saved, tensors = checkpoint_optimizer(ckpt)
    groups = saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise UserError(f"optimizer state in {ckpt} does not match the optimizer: other "
                        "parameter groups; was it trained with other trainable parameters?")
    for group, live in zip(groups, optimizer.param_groups):
        for pid, p in zip(group["params"], live["params"]):
            entry = saved["state"].get(str(pid))
            if entry is None:
                continue
            state = {}
            for key, value in entry.items():
                value = resolve_ref(value, tensors)
                if isinstance(value, Tensor) and tuple(value.shape) == tuple(p.shape):
                    # a moment like exp_avg: shaped (and sharded) like its parameter
                    moment = torch.empty_like(p)
                    copy_full(moment, value)
                    value = moment
                state[key] = value
            optimizer.state[p] = state
