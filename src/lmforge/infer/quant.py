"""Quantized inference: a decoder's weights in int8 or int4, through fbgemm's and torchao's kernels.

The one quantization module of every inference command (``--quant`` of generate, chat, eval
and serve; ``lmforge.load(quant=...)``). ``lmforge.run.load_run`` quantizes *while loading*
(``load_quantized``): the model is built on the meta device, and each layer is materialized,
filled from the checkpoint and quantized before the next one is read, so the full-precision
model is never resident. ``quantize`` does the same to a model already in memory.

- ``int8``: on a CPU in fp32 where PyTorch has fbgemm (x86), the fbgemm int8 GEMM of
  ``int8-dynamic`` below; elsewhere (CUDA, bf16) torchao's ``Int8WeightOnlyConfig``: symmetric
  int8 weights, one scale per output channel. 2.2-4x less weight memory (fbgemm's packing
  below).
- ``int4``: torchao's 4-bit weight-only, asymmetric groups of ``INT4_GROUP`` input features:
  on CPU ``Int4OpaqueTensor`` (aten's ``_weight_int4pack_mm_for_cpu``), on CUDA the tinygemm
  layout (``Int4WeightOnlyConfig`` tile_packed_to_4d, bf16 only). A linear layer whose width
  is not a multiple of the group stays in floating point (documented fallback).
- ``int8-dynamic`` (CPU, fp32): ``Int8DynamicLinear``: int8 weights, one scale per output
  channel, packed for fbgemm (``quantized::linear_prepack``); activations quantized on the fly
  and multiplied in int8 (``quantized::linear_dynamic``: on AVX2 ``vpmaddubsw``, the one int8
  kernel here faster than fp32). fbgemm gives a whole input one scale, so each token row is
  scaled to max |x| = 1 first (a linear map commutes with that), and activations far above
  their row's mean (LLM.int8()'s outlier features) go through the same GEMM in rows of their
  own, so they no longer coarsen everyone else's 8-bit step.

In every method the token embedding becomes one int8 table (torchao ``Int8Tensor``, a scale
per row); a tied output head (SmolLM2, Llama 3.2) uses that same table as an int8 weight-only
linear (on CPU ``Int8Head``, in blocks), so the 49152x576 table of SmolLM2 (a fifth of its
weights) is stored once, in int8.

Where fbgemm's int8 lost perplexity (SmolLM2-135M, 1024 pydoc tokens in windows of 512, fp32
14.253; benchmarks/quant_int8_variants.py and one-off scripts, 2026-12-02): PyTorch's dynamic
Linear as it is (one activation scale per input) 32.306; per-tensor weights 35.346; its
down_proj in fp32 16.796; one scale per token 15.264; per token with q/k/v in fp32 14.590 (the
attention input has channels 9-28x the median channel); per token with outlier features apart
(this module) 14.328. torchao's
Int8DynamicActivationInt8WeightConfig: 15.010, but its run took 347 s to fp32's 23 s
(CPU ``torch._int_mm`` was 13-66x slower than fp32 ``F.linear`` at 576x1536 here).
Memory: a packed fbgemm matrix of 576 input features takes 1.8x its int8 bytes here (1.6 MB RSS
per 576x1536 layer, measured), so ``int8`` here holds ~38 MiB more than torchao's weight-only.
Sweep numbers: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmforge.config import UserError
from lmforge.models.decoder import Decoder
from lmforge.utils.memory import release_freed_memory

Quant = Literal["none", "int8", "int8-dynamic", "int4"]
METHODS: tuple[str, ...] = ("none", "int8", "int8-dynamic", "int4")
# 32 keeps every Llama-family width we ship (576 = 18 x 32) quantized; the CPU kernel takes
# 32, 64 or 128, and a finer group loses less (the GPTQ/gpt-fast default for small models).
INT4_GROUP = 64
# An activation above OUTLIER x its row's mean |x| is an outlier feature (int8-dynamic). The
# 6 of LLM.int8() (Dettmers et al. 2022) is an absolute value for their models; relative to the
# row it is scale-free. SmolLM2's attention inputs have channels 9-28x the median (measured).
OUTLIER = 6.0
_FIX = "pip install 'lmforge[quant]'"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torchao's import-time noise: on a CPU-only torch it logs that its CUDA .so
    files do not load, and torch warns about an Enum it registers as a pytree constant."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao() -> ModuleType:
    """``torchao.quantization``, or a one-line UserError naming the extra."""
    try:
        with _quiet():
            import torchao.quantization as ao
    except ImportError as e:
        raise UserError(f"quant: needs torchao ({e.name or e} is missing): {_FIX}") from None
    return ao


def check_quant(method: str, device: torch.device, dtype: torch.dtype) -> None:
    """UserError (with the fix) for a method that cannot run on ``device`` in ``dtype``."""
    if method not in METHODS:
        raise UserError(f"quant: must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "none":
        return
    if method == "int8-dynamic" and not fbgemm_int8(device, dtype):
        raise UserError("quant: int8-dynamic is fbgemm's x86 CPU kernel for fp32 activations; "
                        "use --device cpu --dtype fp32, or --quant int8")
    if method == "int4" and device.type == "cuda" and dtype != torch.bfloat16:
        raise UserError("quant: int4 on CUDA (tinygemm) computes in bf16; add --dtype bf16")
    _torchao()  # every method keeps the token table in torchao's int8


def _int4_config(device: torch.device) -> Any:
    ao = _torchao()
    if device.type == "cuda":
        return ao.Int4WeightOnlyConfig(group_size=INT4_GROUP, set_inductor_config=False,
                                       int4_packing_format="tile_packed_to_4d")
    with _quiet():
        from torchao.prototype.quantization.int4.inference_workflow import (
            PrototypeInt4WeightOnlyConfig,
        )
    return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP, set_inductor_config=False)


def _int8(linear: nn.Linear) -> nn.Linear:
    """``linear`` with a torchao int8 weight-only weight, in place (set_inductor_config=False:
    torchao would otherwise change torch.compile's global settings)."""
    ao = _torchao()
    with _quiet():
        ao.quantize_(linear, ao.Int8WeightOnlyConfig(set_inductor_config=False))
    return linear


def fbgemm_int8(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``int8`` takes fbgemm's int8 GEMM (``Int8DynamicLinear``) here: CPU, fp32, x86."""
    return (device.type == "cpu" and dtype == torch.float32
            and "fbgemm" in torch.backends.quantized.supported_engines)


class SharedInput:
    """The quantization-ready input of the last call, shared by sibling layers that are fed the
    same tensor (q/k/v, gate/up): preparing it is a dozen small ops, which at batch 1 cost as
    much as the int8 GEMM itself. Recognised by identity (a weak reference, so nothing is kept
    alive); the decoder never changes a layer's input in place."""

    def __init__(self) -> None:
        self.ref: weakref.ref[Tensor] | None = None
        self.rows, self.scale = torch.empty(0), torch.empty(0)


class Int8DynamicLinear(nn.Module):
    """A linear layer whose int8 weights (one symmetric scale per output channel) are packed
    for fbgemm, and whose input is quantized to 8 bits per call: fbgemm's dynamic GEMM.

    fbgemm picks one (scale, zero point) for its whole input; over many tokens that step is set
    by the largest activation anywhere. So each row is divided by its max |x| before the GEMM
    and the output row multiplied back (exact: the map is linear), and the activations above
    ``OUTLIER`` x their row's mean |x| are split off into rows of their own in the same call,
    so each row's 8-bit step follows its own range. The bias is added in fp32 afterwards.
    Layers given one ``shared`` prepare an input they were all fed only once.
    """

    def __init__(self, linear: nn.Linear, shared: SharedInput | None = None) -> None:
        super().__init__()
        from torch.ao.quantization.observer import PerChannelMinMaxObserver

        w = linear.weight.detach().float()  # (N, K)
        observer = PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        observer(w)
        scale, zero = observer.calculate_qparams()
        with warnings.catch_warnings():  # quantized tensors are deprecated (pytorch#184982)
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scale.double(), zero.long(), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.shared = shared or SharedInput()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(),
                                                                  requires_grad=False)

    def _prepare(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (..., K) -> rows (M or 2M, K) with max |row| = 1, and their scales (M or 2M, 1)."""
        rows = x.reshape(-1, self.in_features)  # (M, K)
        mag = rows.abs()
        outlier = mag > mag.mean(-1, keepdim=True).mul_(OUTLIER)  # (M, K)
        if bool(outlier.any()):  # no index_add/nonzero: per call they cost more than the GEMM
            apart = rows * outlier
            rows = torch.cat([rows - apart, apart])  # (2M, K)
            mag = rows.abs()
        scale = mag.amax(-1, keepdim=True).clamp_min_(torch.finfo(x.dtype).tiny)
        return rows / scale, scale

    def forward(self, x: Tensor) -> Tensor:
        """x (..., K) fp32 -> (..., N) fp32."""
        shared = self.shared
        if shared.ref is None or shared.ref() is not x:
            shared.rows, shared.scale = self._prepare(x)
            shared.ref = weakref.ref(x)
        y = torch.ops.quantized.linear_dynamic(shared.rows, self.packed, reduce_range=True)
        y = y.mul_(shared.scale)  # (M or 2M, N)
        m = x.numel() // self.in_features
        if y.shape[0] > m:  # the outliers' rows
            y = y[:m].add_(y[m:])
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def quantize_linear(linear: nn.Linear, method: str,
                    shared: SharedInput | None = None) -> nn.Module:
    """``linear`` quantized by ``method``: the same module with a torchao weight (int8 off
    fbgemm's CPU path, int4), or an ``Int8DynamicLinear`` (int8-dynamic; int8 on a CPU in
    fp32; ``shared``: see ``SharedInput``). An int4 layer whose in_features is not a multiple
    of ``INT4_GROUP`` is returned as it is (floating point)."""
    w = linear.weight
    if method == "int8-dynamic" or (method == "int8" and fbgemm_int8(w.device, w.dtype)):
        return Int8DynamicLinear(linear, shared)
    if method == "int8":
        return _int8(linear)
    if method == "int4":
        if linear.in_features % INT4_GROUP == 0:
            ao = _torchao()
            with _quiet():
                ao.quantize_(linear, _int4_config(linear.weight.device))
        return linear
    raise UserError(f"quant: must be one of {', '.join(METHODS)}; got {method!r}")


class Int8Embedding(nn.Module):
    """A token table of torchao int8 rows (one scale per row) that dequantizes only the rows
    it looks up. torchao's own embedding op dequantizes the whole table on every call: for
    SmolLM2 a 113 MB fp32 copy per decoded token."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # (V, C) Int8Tensor, shared with a tied head

    def forward(self, idx: Tensor) -> Tensor:
        """idx (...,) -> (..., C) in the table's original dtype."""
        rows = self.weight[idx.reshape(-1)]  # (N, C) Int8Tensor
        return rows.dequantize().view(*idx.shape, -1)


class Int8Head(nn.Module):
    """A CPU output head over an int8 table (torchao ``Int8Tensor``, one scale per row), maybe
    the token table itself: logits in blocks of ``rows`` vocabulary rows, each converted to the
    activations' dtype just before its matmul. torchao's linear converts the whole table per
    call (SmolLM2: 113 MB of fp32 written and read again per token, 7x the fp32 head's time,
    measured); a block of 1024 x 576 stays in the CPU's cache."""

    def __init__(self, weight: nn.Parameter, rows: int = 1024) -> None:
        super().__init__()
        self.weight = weight  # (V, C) Int8Tensor, shared with the token table when tied
        self.rows = rows

    @torch.no_grad()  # inference only: mm(out=) does not record a graph
    def forward(self, x: Tensor) -> Tensor:
        """x (..., C) -> logits (..., V) in x's dtype."""
        qdata, scale = self.weight.qdata, self.weight.scale  # (V, C) int8, (V, 1)
        flat = x.reshape(-1, x.shape[-1])  # (N, C)
        out = flat.new_empty(flat.shape[0], qdata.shape[0])  # (N, V)
        for s in range(0, qdata.shape[0], self.rows):
            torch.mm(flat, qdata[s : s + self.rows].to(x.dtype).t(), out=out[:, s : s + self.rows])
        out.mul_(scale.view(1, -1).to(x.dtype))
        return out.view(*x.shape[:-1], -1)


def _quantize_embedding(model: Decoder) -> None:
    """The token table in int8, shared with the output head when they are tied (on CPU read
    through ``Int8Head``)."""
    emb, head = model.tok_emb, model.lm_head
    if model.cfg.tie_embeddings:
        head.weight = emb.weight
        model.tok_emb = Int8Embedding(_int8(head).weight)
        if head.weight.device.type == "cpu":
            model.lm_head = Int8Head(model.tok_emb.weight)
        return
    scratch = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
    scratch.weight = emb.weight
    model.tok_emb = Int8Embedding(_int8(scratch).weight)


def _linears(model: nn.Module, skip: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and child is not skip]


@torch.no_grad()
def quantize(model: Decoder, method: str) -> Decoder:
    """Quantize a loaded decoder in place (every linear layer and the token table); return it.

    Call it last: after the model is on its device, in its dtype, in eval mode; do not move
    it afterwards. ``lmforge.run.load_run(..., quant=)`` quantizes while loading instead.
    """
    p = next(model.parameters())
    check_quant(method, p.device, p.dtype)
    if method == "none":
        return model
    _quantize_embedding(model)
    tied_head = model.lm_head if model.cfg.tie_embeddings else None  # not a Linear on CPU
    shared: dict[tuple[int, int], SharedInput] = {}
    for parent, name, child in _linears(model, tied_head):
        key = (id(parent), child.in_features)  # siblings that may be fed one tensor
        setattr(parent, name, quantize_linear(child, method, shared.setdefault(key, SharedInput())))
    return model


@torch.no_grad()
def load_quantized(model: Decoder, method: str, device: torch.device,
                   read: Callable[[str], Tensor | None], where: str) -> Decoder:
    """Fill a meta-built decoder (already in its dtype) from ``read`` (clean name -> tensor)
    one module at a time, quantizing each linear layer and the token table as soon as their
    weights are in, so at most one of them is ever held in full precision. ``where`` names
    the checkpoint in errors. Returns the model in eval mode, its position tables computed."""
    assert method != "none", "an unquantized load goes through run.build_model"
    check_quant(method, device, next(model.parameters()).dtype)
    tied_head = model.lm_head if model.cfg.tie_embeddings else None
    shared: dict[tuple[str, int], SharedInput] = {}  # as in quantize
    for name, module in list(model.named_modules()):
        if module is tied_head:
            continue  # it gets the token table's weight
        for key, param in list(module.named_parameters(recurse=False)):
            full = f"{name}.{key}" if name else key
            tensor = read(full)
            if tensor is None or tuple(tensor.shape) != tuple(param.shape):
                raise UserError(f"checkpoint {where} does not match the model: tensor {full} is "
                                f"{'missing' if tensor is None else tuple(tensor.shape)}; was "
                                "it trained with a different --model config?")
            setattr(module, key, nn.Parameter(tensor.to(device, param.dtype),
                                                  requires_grad=False))
            del tensor
        if module is model.tok_emb:
            _quantize_embedding(model)
        elif isinstance(module, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            one = shared.setdefault((parent_name, module.in_features), SharedInput())
            setattr(model.get_submodule(parent_name), attr, quantize_linear(module, method, one))
            release_freed_memory()  # see utils.memory: else the heap grows layer by layer
    model.init_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not materialized: {left}"
    return model.eval()
