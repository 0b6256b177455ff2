"""LoRA (Hu et al. 2021): low-rank adapters applied to a built model from outside.

``apply_lora`` replaces the ``nn.Linear`` layers whose module name ends with one of the
``targets`` (exact dotted suffix: ``q_proj`` matches ``blocks.0.attn.q_proj``, not ``xq_proj``)
by a ``LoRALinear`` that keeps the frozen base layer and adds ``scaling * B(A(x))``; every
other parameter of the model is frozen, so only the adapters train. ``merge_lora`` folds the
adapters back into plain ``nn.Linear`` layers, so a merged model is an ordinary model again.
The model file knows nothing of this. The base may also be an NF4 layer (``models/quant.py``,
QLoRA): anything with ``in_features``, ``out_features`` and a ``dequantize()`` method.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.config import ConfigError, UserError


@dataclass
class LoraConfig:
    """Where the adapters go and how big they are."""

    rank: int = 8
    """Rank r of each adapter (A is r x in, B is out x r)."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank, so changing the rank keeps its size comparable."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base path never sees it)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module-name suffixes of the linear layers to adapt (exact dotted suffixes)."""
    double_quant: bool = True
    """qlora: also quantize the NF4 block maxima to 8 bits (4.127 instead of 4.5 bits/weight),
    as in the QLoRA paper."""
    quant_backend: Literal["auto", "bitsandbytes", "torch"] = "auto"
    """qlora: the NF4 implementation; auto = bitsandbytes when installed, else plain PyTorch."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("lora: rank must be >= 1, alpha > 0 and dropout in [0, 1)")
        if not self.targets:
            raise ConfigError("lora.targets: name at least one linear layer, e.g. q_proj,v_proj")


class LoRALinear(nn.Module):
    """A frozen base linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.scaling = alpha / rank
        weight = _base_weight(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=weight.dtype,
                                               device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, dtype=weight.dtype,
                                               device=weight.device))
        init_lora(self)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # adapters_disabled(): the base layer alone

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self.base(x)
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()  # (..., out)
        return self.base(x) + self.scaling * update

    def delta_weight(self) -> Tensor:
        """The dense update scaling * B @ A, shaped like the base weight (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)


@torch.no_grad()
def init_lora(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """A's init is nn.Linear's own (as peft); B starts at zero, so the adapted model starts
    exactly equal to the base (the paper). Works on any module with lora_A / lora_B."""
    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5), generator=generator)
    nn.init.zeros_(module.lora_B)


def _base_weight(base: nn.Module) -> Tensor:
    dequantize = getattr(base, "dequantize", None)
    return dequantize() if callable(dequantize) else base.weight


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _shared(model: nn.Module, module: nn.Module) -> bool:
    """Whether the layer's weight is also another parameter (tied embeddings)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter):
        return False
    return sum(p is w for _, p in model.named_parameters(remove_duplicate=False)) > 1


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float,
               targets: list[str]) -> list[str]:
    """Wrap the matching linear layers in place, freeze everything else; return their names."""
    cfg = LoraConfig(rank, alpha, dropout, list(targets))  # validates
    found = [(n, m) for n, m in model.named_modules()
             if n and _matches(n, cfg.targets) and not isinstance(m, LoRALinear)]
    if not found:
        raise UserError(f"lora.targets {','.join(cfg.targets)}: no module of the model has such "
                        "a name; decoder layers are q_proj, k_proj, v_proj, o_proj, "
                        "gate_proj, up_proj, down_proj (gelu MLP: fc_in, fc_out)")
    for name, module in found:
        if not (isinstance(module, nn.Linear) or hasattr(module, "dequantize")):
            raise UserError(f"lora.targets: {name} is a {type(module).__name__}, not a linear layer")
        if _shared(model, module):
            raise UserError(f"lora.targets: {name} shares its weight with another layer (tied "
                            "embeddings); adapt the attention/MLP layers instead")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in found:
        _set(model, name, LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout))
    return [name for name, _ in found]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes as its frozen base: every adapter is skipped (as
    peft's ``disable_adapter``). DPO's reference model is the policy this way, not a copy."""
    layers = list(lora_modules(model).values())
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into a plain ``nn.Linear`` (W + scaling * B @ A), in place; return model.

    An NF4 base is dequantized first: the merged layer is full precision.
    """
    for name, module in lora_modules(model).items():
        base = module.base
        weight = _base_weight(base)
        bias = getattr(base, "bias", None)
        # summed in the wider of the two dtypes: a bf16 base gets its fp32 update exactly
        dtype = torch.promote_types(weight.dtype, module.lora_A.dtype)
        plain = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                          device=weight.device, dtype=dtype)
        plain.weight.copy_(weight.to(dtype) + module.delta_weight().to(dtype))
        if bias is not None:
            plain.bias.copy_(bias)
        _set(model, name, plain)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, keyed ``<module>.lora_A`` / ``<module>.lora_B`` (contiguous)."""
    out: dict[str, Tensor] = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_A"] = module.lora_A.detach().contiguous()
        out[f"{name}.lora_B"] = module.lora_B.detach().contiguous()
    return out


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Copy saved adapters into a model that ``apply_lora`` wrapped with the same settings."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{where}: adapter does not fit the model (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}); was it trained on this base with these targets?")
    for name, module in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            src, dst = tensors[f"{name}.{part}"], getattr(module, part)
            if src.shape != dst.shape:
                raise UserError(f"{where}: {name}.{part} has shape {tuple(src.shape)}, the model "
                                f"expects {tuple(dst.shape)} (a different rank or base?)")
            dst.copy_(src)


def lora_info(cfg: LoraConfig) -> dict:
    """The JSON-able settings written to adapter.json beside the adapter weights."""
    return asdict(cfg)
