"""NF4 storage of frozen base weights for QLoRA (Dettmers et al. 2023), in plain PyTorch.

Each weight is cut into blocks of 64 values; a block keeps its absolute maximum (fp32) and
one 4-bit code per value, the index of the nearest of 16 NormalFloat levels (quantiles of a
normal distribution, which is how trained weights are spread). Two codes share a byte, so a
weight costs 0.5 + 4/64 = 0.5625 bytes instead of 4 (7.1x less). Forward dequantizes the whole
weight and runs an ordinary matmul: memory is saved at rest, not during the product.

Why not bitsandbytes or torchao: neither is installed on our CPU machines (checked
2026-11-22: bitsandbytes' 4-bit kernels need CUDA; torchao is not present), and this is ~60
lines. Not done: the paper's double quantization of the absmax values (saves 0.37 bit/param).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BLOCK = 64
# The 16 NF4 levels from the QLoRA paper / bitsandbytes (normalized to [-1, 1], with an exact 0).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(packed uint8 codes, per-block absmax) of a weight whose size is a multiple of 64."""
    assert weight.numel() % BLOCK == 0, "caller checks the block fit"
    blocks = weight.detach().float().reshape(-1, BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)  # (n_blocks,)
    normed = blocks / absmax[:, None]
    levels = torch.tensor(NF4_LEVELS, device=weight.device)
    # The nearest level = how many midpoints lie below the value (no (N, 16) distance matrix).
    codes = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()
    packed = codes[0::2] << 4 | codes[1::2]  # two 4-bit codes per byte
    return packed, absmax


def nf4_dequantize(packed: Tensor, absmax: Tensor, shape: torch.Size,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight back from its codes and block maxima."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).flatten().long()
    levels = torch.tensor(NF4_LEVELS, device=packed.device)
    values = levels[codes].reshape(-1, BLOCK) * absmax[:, None]  # (n_blocks, 64)
    return values.reshape(shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4; codes and scales are buffers, so they never train."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        packed, absmax = nf4_quantize(linear.weight)
        self.register_buffer("codes", packed)
        self.register_buffer("absmax", absmax)
        self.bias = (nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
                     if linear.bias is not None else None)

    @torch.no_grad()
    def load_weight(self, weight: Tensor) -> None:
        """Quantize a full-precision weight (out, in) into this layer's codes, in place: a base
        model loads layer by layer straight into NF4 (the training setup's ``fill``)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for an NF4 layer of "
                             f"{(self.out_features, self.in_features)}")
        packed, absmax = nf4_quantize(weight.to(self.codes.device))
        self.codes.copy_(packed)
        self.absmax.copy_(absmax)

    def dequantize(self) -> Tensor:
        """The full-precision weight (out, in) this layer stands for."""
        return nf4_dequantize(self.codes, self.absmax,
                              torch.Size((self.out_features, self.in_features)), self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.dequantize().to(x.dtype), self.bias)


def _fits(model: nn.Module, name: str, module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear) or module.weight.numel() % BLOCK:
        return False
    # A weight shared with another parameter (tied embeddings) must stay one trainable tensor.
    w = module.weight
    return sum(p is w for _, p in model.named_parameters(remove_duplicate=False)) == 1


@torch.no_grad()
def quantize_nf4(model: nn.Module) -> list[str]:
    """Replace every untied linear layer whose size is a multiple of 64 by ``NF4Linear``.

    Returns the names replaced. Embeddings, norms and tied heads stay as they are.
    """
    names = [n for n, m in model.named_modules() if n and _fits(model, n, m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, NF4Linear(getattr(owner, child)))
    return names


@torch.no_grad()
def dequantize_nf4(model: nn.Module) -> nn.Module:
    """Replace every ``NF4Linear`` by a plain ``nn.Linear`` of its dequantized weight, in place."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, NF4Linear):
            continue
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.codes.device, dtype=module.dtype)
        plain.weight.copy_(module.dequantize())
        if module.bias is not None:
            plain.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model


def storage_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what the model holds at rest)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
