"""NF4 storage of frozen base weights for QLoRA (Dettmers et al. 2023).

Each weight is cut into blocks of 64 values; a block keeps its absolute maximum and one 4-bit
code per value, the index of the nearest of 16 NormalFloat levels (quantiles of a normal
distribution, which is how trained weights are spread). Two codes share a byte. With the
paper's double quantization the block maxima are themselves quantized: their mean is taken
out (one fp32 offset per matrix) and they are stored in 8 bits, in blocks of 256 with one
fp32 scale each. A weight then costs 4 + 8/64 + 32/(64*256) = 4.127 bits (0.516 bytes, 7.75x
less than fp32); without it 4 + 32/64 = 4.5 bits. ``nf4_matrix_bytes`` is that arithmetic,
exact per matrix, and ``lmforge plan`` uses it. Forward dequantizes one whole weight and runs
an ordinary matmul; backward dequantizes it again rather than keeping it (``_DequantMatmul``),
so only one layer's full-precision weight exists at a time.

Two implementations with the same storage and interface (``load_weight``, ``dequantize``):
``BnbNF4Linear`` over bitsandbytes (the library QLoRA was written with; CPU and CUDA since
0.45), used when it is installed (``pip install 'lmforge[qlora]'``), and ``NF4Linear`` in plain
PyTorch as the fallback. Only this module imports bitsandbytes, lazily. Measured once (2026-12,
one CPU thread, 1024x512 weight, 1024 tokens, forward + backward): dequantize + F.linear
37 ms, ``bnb.matmul_4bit`` 37 ms, so both backends share one dequantize-and-matmul function.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.config import UserError

BLOCK = 64
# Double quantization: the 8-bit block maxima are grouped 256 to a scale (QLoRA §3, bitsandbytes).
BLOCK2 = 256
Backend = Literal["auto", "bitsandbytes", "torch"]
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


def nf4_matrix_bytes(numel: int, double_quant: bool) -> int:
    """Bytes one NF4 matrix of ``numel`` weights (a multiple of 64) holds, in either backend:
    packed codes, block maxima and, with double quantization, their scales and offset."""
    blocks = numel // BLOCK
    if not double_quant:
        return numel // 2 + 4 * blocks
    return numel // 2 + blocks + 4 * -(-blocks // BLOCK2) + 4


def absmax_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization in plain PyTorch: (int8 codes, fp32 scale per 256 codes, fp32 mean).

    As bitsandbytes: the mean is taken out, then blocks of 256 are scaled by their largest
    magnitude (symmetric int8 here; bitsandbytes uses its 8-bit dynamic map, same bytes)."""
    offset = absmax.mean()
    centered = absmax - offset
    pad = -centered.numel() % BLOCK2
    blocks = nn.functional.pad(centered, (0, pad)).reshape(-1, BLOCK2)  # (n_blocks2, 256)
    scale = blocks.abs().amax(dim=1).clamp_min(1e-12)  # (n_blocks2,)
    codes = torch.round(blocks / scale[:, None] * 127).to(torch.int8).flatten()
    return codes[: centered.numel()], scale, offset


def absmax_dequantize(codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """The block maxima back from ``absmax_quantize``."""
    pad = -codes.numel() % BLOCK2
    blocks = nn.functional.pad(codes.float(), (0, pad)).reshape(-1, BLOCK2) / 127
    return (blocks * scale[:, None]).flatten()[: codes.numel()] + offset


class _NF4Base(nn.Module):
    """What both NF4 layers share: shape, frozen bias, the load check and the forward."""

    backend = ""

    def __init__(self, linear: nn.Linear, double_quant: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.double_quant = double_quant
        self.bias = (nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
                     if linear.bias is not None else None)

    def _buffers_for(self, numel: int, device: torch.device, packed_shape: tuple[int, ...],
                     absmax_dtype: torch.dtype) -> None:
        blocks = numel // BLOCK
        self.register_buffer("codes", torch.empty(packed_shape, dtype=torch.uint8,
                                                  device=device))
        if self.double_quant:
            self.register_buffer("absmax", torch.empty(blocks, dtype=absmax_dtype, device=device))
            self.register_buffer("absmax_scale", torch.empty(-(-blocks // BLOCK2), device=device))
            self.register_buffer("absmax_offset", torch.empty((), device=device))
        else:
            self.register_buffer("absmax", torch.empty(blocks, device=device))

    def _check(self, weight: Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for an NF4 layer of "
                             f"{(self.out_features, self.in_features)}")

    def dequantize(self) -> Tensor:  # pragma: no cover - each backend defines it
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return _DequantMatmul.apply(x, self, self.bias)


class _DequantMatmul(torch.autograd.Function):
    """x @ W.T + b with W dequantized for the product and again in backward, never kept.

    A plain ``F.linear(x, layer.dequantize())`` saves the full-precision W for the gradient of
    x, so every layer's dequantized weight would live from forward to backward: the whole
    base back in fp32, and QLoRA measured above LoRA. This is the trick of QLoRA's
    ``bnb.matmul_4bit`` (which saves only the packed weight): recompute, do not store.
    """

    @staticmethod
    def forward(ctx: object, x: Tensor, layer: _NF4Base, bias: Tensor | None) -> Tensor:
        ctx.layer = layer  # type: ignore[attr-defined]
        ctx.x_dtype = x.dtype  # type: ignore[attr-defined]
        return nn.functional.linear(x, layer.dequantize().to(x.dtype), bias)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            w = ctx.layer.dequantize().to(grad.dtype)  # type: ignore[attr-defined]
            grad_x = (grad @ w).to(ctx.x_dtype)  # type: ignore[attr-defined]
        if ctx.needs_input_grad[2]:  # type: ignore[attr-defined]
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_b


class NF4Linear(_NF4Base):
    """A frozen linear layer stored in NF4 by plain PyTorch; codes and scales are buffers."""

    backend = "torch"

    def __init__(self, linear: nn.Linear, double_quant: bool = True) -> None:
        super().__init__(linear, double_quant)
        numel = linear.weight.numel()
        self._buffers_for(numel, linear.weight.device, (numel // 2,), torch.int8)
        if linear.weight.device.type != "meta":
            self.load_weight(linear.weight)

    @torch.no_grad()
    def load_weight(self, weight: Tensor) -> None:
        """Quantize a full-precision weight (out, in) into this layer's codes, in place: a base
        model loads layer by layer straight into NF4 (the training setup's ``fill``)."""
        self._check(weight)
        packed, absmax = nf4_quantize(weight.to(self.codes.device))
        self.codes.copy_(packed)
        if self.double_quant:
            codes, scale, offset = absmax_quantize(absmax)
            self.absmax.copy_(codes)
            self.absmax_scale.copy_(scale)
            self.absmax_offset.copy_(offset)
        else:
            self.absmax.copy_(absmax)

    def dequantize(self) -> Tensor:
        """The full-precision weight (out, in) this layer stands for."""
        absmax = (absmax_dequantize(self.absmax, self.absmax_scale, self.absmax_offset)
                  if self.double_quant else self.absmax)
        return nf4_dequantize(self.codes, absmax,
                              torch.Size((self.out_features, self.in_features)), self.dtype)


class BnbNF4Linear(_NF4Base):
    """A frozen linear layer stored in NF4 by bitsandbytes (``quantize_4bit``).

    Its quantization state lives in buffers (packed codes, block maxima, their scales and
    offset), so it is built on the meta device, moves with ``.to`` / ``to_empty`` and counts in
    ``storage_bytes``; the two code books (the 16 NF4 levels, the 256-entry 8-bit map of the
    double quantization) are constants of the format, rebuilt once per device, not per layer.
    """

    backend = "bitsandbytes"

    def __init__(self, linear: nn.Linear, double_quant: bool = True) -> None:
        super().__init__(linear, double_quant)
        numel = linear.weight.numel()
        self._buffers_for(numel, linear.weight.device, (numel // 2, 1), torch.uint8)
        self._books: dict[torch.device, tuple[Tensor, Tensor]] = {}
        if linear.weight.device.type != "meta":
            self.load_weight(linear.weight)

    @torch.no_grad()
    def load_weight(self, weight: Tensor) -> None:
        """Quantize a full-precision weight (out, in) into this layer's buffers, in place."""
        from bitsandbytes.functional import quantize_4bit

        self._check(weight)
        w = weight.to(self.codes.device, self.dtype).contiguous()
        packed, state = quantize_4bit(w, blocksize=BLOCK, quant_type="nf4",
                                      compress_statistics=self.double_quant)
        self.codes.copy_(packed)
        self.absmax.copy_(state.absmax)
        if self.double_quant:
            self.absmax_scale.copy_(state.state2.absmax)
            self.absmax_offset.copy_(state.offset)

    def _state(self) -> object:
        from bitsandbytes.functional import QuantState, create_dynamic_map, get_4bit_type

        device = self.codes.device
        if device not in self._books:
            self._books[device] = (get_4bit_type("nf4", device=device),
                                   create_dynamic_map(signed=True).to(device))
        code, code2 = self._books[device]
        shape = torch.Size((self.out_features, self.in_features))
        if not self.double_quant:
            return QuantState(self.absmax, shape, code, BLOCK, "nf4", self.dtype)
        nested = QuantState(self.absmax_scale, code=code2, blocksize=BLOCK2, dtype=torch.float32)
        return QuantState(self.absmax, shape, code, BLOCK, "nf4", self.dtype,
                          offset=self.absmax_offset, state2=nested)

    def dequantize(self) -> Tensor:
        """The full-precision weight (out, in) this layer stands for."""
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.codes, self._state())  # type: ignore[arg-type]


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes imports here (its 4-bit functions run on CPU and CUDA)."""
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # not installed, or its native library does not load on this machine
        return False
    return True


def nf4_backend(requested: Backend = "auto") -> Literal["bitsandbytes", "torch"]:
    """The NF4 implementation to use: bitsandbytes when installed (auto), else plain PyTorch."""
    if requested == "torch":
        return "torch"
    if bitsandbytes_available():
        return "bitsandbytes"
    if requested == "bitsandbytes":
        raise UserError("lora.quant_backend bitsandbytes: bitsandbytes is not installed; "
                        "pip install 'lmforge[qlora]', or use --lora.quant_backend auto")
    return "torch"


def is_nf4(module: nn.Module) -> bool:
    """Whether a module is an NF4 layer of either backend."""
    return isinstance(module, _NF4Base)

def _fits(model: nn.Module, module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear) or module.weight.numel() % BLOCK:
        return False
    # The output head stays full precision, as in QLoRA and transformers' bitsandbytes loading:
    # its error lands on every logit. A weight shared with another parameter (tied embeddings)
    # must stay one tensor anyway.
    if module is getattr(model, "lm_head", None):
        return False
    w = module.weight
    return sum(p is w for _, p in model.named_parameters(remove_duplicate=False)) == 1


@torch.no_grad()
def quantize_nf4(model: nn.Module, double_quant: bool = True,
                 backend: Backend = "auto") -> list[str]:
    """Replace every linear layer of the blocks whose size is a multiple of 64 by an NF4 layer
    (``BnbNF4Linear`` or ``NF4Linear``, per ``nf4_backend(backend)``), in place.

    Returns the names replaced. Embeddings, norms, biases and the output head stay as they are.
    Works on the meta device (the layers then get their weights through ``load_weight``).
    """
    layer = BnbNF4Linear if nf4_backend(backend) == "bitsandbytes" else NF4Linear
    names = [n for n, m in model.named_modules() if n and _fits(model, m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, layer(getattr(owner, child), double_quant))
    return names


@torch.no_grad()
def dequantize_nf4(model: nn.Module) -> nn.Module:
    """Replace every NF4 layer by a plain ``nn.Linear`` of its dequantized weight, in place."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, _NF4Base):
            continue
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.codes.device, dtype=module.dtype)
        plain.weight.copy_(module.dequantize())
        if module.bias is not None:
            plain.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model


def nf4_summary(model: nn.Module) -> dict[str, object]:
    """What a model's NF4 base is: backend, double quantization, matrices, bits per weight."""
    layers = [m for m in model.modules() if isinstance(m, _NF4Base)]
    if not layers:
        return {}
    weights = sum(m.in_features * m.out_features for m in layers)
    stored = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    return {"backend": layers[0].backend, "double_quant": layers[0].double_quant,
            "matrices": len(layers), "weights": weights, "bytes": stored,
            "bits_per_weight": 8 * stored / weights}


def storage_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what the model holds at rest)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
