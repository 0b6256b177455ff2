"""Quantized inference: a decoder's weights in int8 or int4, through torchao's kernels.

The one quantization module of every inference command (``--quant`` of generate, chat, eval
and serve; ``lmforge.load(quant=...)``). ``lmforge.run.load_run`` quantizes *while loading*
(``load_quantized``): the model is built on the meta device, and each layer is materialized,
filled from the checkpoint and quantized before the next one is read, so the full-precision
model is never resident. ``quantize`` does the same to a model already in memory.

- ``int8``: torchao's ``Int8WeightOnlyConfig``: symmetric int8 weights, one scale per output
  channel (CPU and CUDA). 4x less weight memory.
- ``int4``: torchao's 4-bit weight-only, asymmetric groups of ``INT4_GROUP`` input features:
  on CPU ``Int4OpaqueTensor`` (aten's ``_weight_int4pack_mm_for_cpu``), on CUDA the tinygemm
  layout (``Int4WeightOnlyConfig`` tile_packed_to_4d, bf16 only). A linear layer whose width
  is not a multiple of the group stays in floating point (documented fallback).
- ``int8-dynamic`` (CPU, fp32): PyTorch's fbgemm dynamic-quantized Linear: int8 weights per
  channel, activations quantized per token on the fly, an int8 GEMM. Kept because it is the
  one int8 kernel faster than fp32 on a CPU without AVX-512, at a cost in accuracy (below).

In every method the token embedding becomes one int8 table (torchao ``Int8Tensor``, a scale
per row); a tied output head (SmolLM2, Llama 3.2) uses that same table as an int8 weight-only
linear, so the 49152x576 table of SmolLM2 (a fifth of its weights) is stored once, in int8.

Measured on SmolLM2-135M, fp32 on this project's 2-core AVX2 CPU, one thread, each in a fresh
process (benchmarks/quant_memory.py, 2026-12-01): RSS after one completion vs unquantized
(873 MiB) int8 0.60x, int4 0.54x, int8-dynamic 0.65x; batch-1 decode speed int8 0.49x, int4
0.35x, int8-dynamic 1.95x (torchao's eager CPU weight-only paths convert weights on every
call); perplexity on pydoc text int8 +0.41%, int4 +33%, int8-dynamic +127%.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
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
    if method == "int8-dynamic" and (device.type != "cpu" or dtype != torch.float32):
        raise UserError("quant: int8-dynamic is fbgemm's CPU kernel for fp32 activations; use "
                        "--device cpu --dtype fp32, or --quant int8")
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


def quantize_linear(linear: nn.Linear, method: str) -> nn.Module:
    """``linear`` quantized by ``method``: the same module with a torchao weight (int8, int4),
    or a PyTorch dynamic-quantized replacement (int8-dynamic). An int4 layer whose in_features
    is not a multiple of ``INT4_GROUP`` is returned as it is (floating point)."""
    if method == "int8":
        return _int8(linear)
    if method == "int4":
        if linear.in_features % INT4_GROUP == 0:
            ao = _torchao()
            with _quiet():
                ao.quantize_(linear, _int4_config(linear.weight.device))
        return linear
    if method == "int8-dynamic":
        with warnings.catch_warnings():  # torch.ao.quantization warns that it is deprecated
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
            from torch.ao.quantization import per_channel_dynamic_qconfig

            linear.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
            return DynamicLinear.from_float(linear)
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


def _quantize_embedding(model: Decoder) -> None:
    """The token table in int8, shared with the output head when they are tied."""
    emb, head = model.tok_emb, model.lm_head
    if model.cfg.tie_embeddings:
        head.weight = emb.weight
        model.tok_emb = Int8Embedding(_int8(head).weight)
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
    tied_head = model.lm_head if model.cfg.tie_embeddings else None
    for parent, name, child in _linears(model, tied_head):
        setattr(parent, name, quantize_linear(child, method))
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
            setattr(model.get_submodule(parent_name), attr, quantize_linear(module, method))
            release_freed_memory()  # see utils.memory: else the heap grows layer by layer
    model.init_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"not materialized: {left}"
    return model.eval()
