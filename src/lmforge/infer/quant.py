"""Quantized inference on CPU: the linear layers of a built model with int8 or int4 weights.

Applied from outside to a loaded model (the model file knows nothing of it), after it is on
its device and in eval mode; quantize last, and do not move the model afterwards.

- ``int8``: weight-only, symmetric per output channel (W ~= scale * q, q in [-127, 127]),
  through PyTorch's ``_weight_int8pack_mm`` kernel. 4x less weight memory.
- ``int8-dynamic``: PyTorch's dynamic quantization (fbgemm/onednn): int8 weights per channel,
  activations quantized per batch on the fly, an int8 GEMM. Deprecated in torch but present.
- ``int4``: weight-only, asymmetric groups of 32 input features (gpt-fast's scheme), through
  ``_weight_int4pack_mm_for_cpu``. 8x less weight memory; layers whose width is not a
  multiple of the group stay in floating point.

Measured on this project's 2-core AMD EPYC (torch 2.13, one thread), llama-6m batch-1 greedy
decoding: fp32 194 tokens/s, int8 87, int4 42, int8-dynamic 320. The weight-only kernels have
no fast path on this CPU build, so they save memory, not time. Validation perplexity of a
trained llama-1m moved by -0.01% (int8), +0.77% (int8-dynamic), +1.21% (int4).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from lmforge.config import UserError

METHODS = ("int8", "int8-dynamic", "int4")
INT4_GROUP = 32


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one fp scale per output channel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight_int8,
                                      self.scale.to(x.dtype))  # (N, out)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights in groups of ``INT4_GROUP`` input features.

    Per group, w = (q - 8) * scale + zero with q in [0, 15], scale = (max - min) / 15 and
    zero = min + 8 * scale: the layout ``_weight_int4pack_mm_for_cpu`` expects.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        n, k = linear.weight.shape
        w = linear.weight.detach().float().view(n, k // INT4_GROUP, INT4_GROUP)  # (N, K/g, g)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/g)
        scale = (hi - lo).clamp(min=1e-12) / 15.0
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.view(n, k), 1))
        zeros = lo + 8.0 * scale
        self.register_buffer("scales_zeros", torch.stack((scale, zeros), -1).transpose(0, 1)
                             .contiguous().to(linear.weight.dtype))  # (K/g, N, 2)
        self.bias = linear.bias
        self.in_features, self.out_features = k, n

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.packed,
                                              INT4_GROUP, self.scales_zeros.to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize(model: nn.Module, method: str) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by its ``method`` version; return it.

    A tied output head gets its own quantized copy; the embedding table stays as it was.
    """
    if method not in METHODS:
        raise UserError(f"quant: must be one of {', '.join(METHODS)}; got {method!r}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise UserError("quant: the int8/int4 kernels used here run on CPU only; load on cpu")
    if method == "int8-dynamic":
        return _dynamic(model)
    cls = Int8Linear if method == "int8" else Int4Linear
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and _fits(child, method):
                setattr(parent, name, cls(child))
    return model


def _fits(linear: nn.Linear, method: str) -> bool:
    return method != "int4" or linear.in_features % INT4_GROUP == 0


def _dynamic(model: nn.Module) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch.ao.quantization warns that it is deprecated
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig},
                                    dtype=torch.qint8, inplace=True)
    except (ImportError, AttributeError) as e:
        raise UserError(f"quant: int8-dynamic needs torch.ao.quantization ({e}); "
                        "use --quant int8") from None
