"""ONNX export of the decoder (torch.onnx's dynamo exporter) and its onnxruntime check.

The graph takes ``input_ids`` (batch, sequence) int64 and returns ``logits`` (batch, sequence,
vocab) float32, both axes dynamic. With ``kv_cache`` it also takes, per layer i,
``past_key_values.{i}.key`` / ``.value`` (batch, kv_heads, past_sequence, head_dim) and returns
``present.{i}.key`` / ``.value`` with the new positions appended (the names Hugging Face
Optimum uses); a past of length 0 is a plain prefill. Positions continue from the past
length; every sequence of a batch has the same length (no padding mask).

The graph is ``Decoder.forward`` itself, at explicit positions (``input_pos``) over a
``PastKVCache``: the past arrives as tensors and the present leaves as new ones, and the mask
is one explicit (T, P+T) tensor, so no Python condition on a sequence or cache length is left
for torch.export to turn into a symbolic boolean (SDPA rejects a SymBool ``is_causal``). One
graph serves every batch, sequence and past length; the load-back check compares it with
``Decoder`` on every export. The legacy TorchScript exporter is no alternative: it has no rule
for ``aten::rms_norm``.

onnx and onnxruntime are imported only inside functions of this module.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.config import UserError
from lmforge.models.decoder import Decoder
from lmforge.models.kv_cache import PastKVCache

INSTALL = "pip install onnx onnxscript onnxruntime (or pip install 'lmforge[export]')"
MIN_BLOCK = 8  # the export traces a past of 3 and 5 new tokens: sizes 0 and 1 are specialized


class OnnxDecoder(nn.Module):
    """``Decoder.forward`` with the past/present KV of an exported graph (or none)."""

    def __init__(self, model: Decoder, kv_cache: bool) -> None:
        super().__init__()
        self.model, self.kv_cache = model, kv_cache

    def forward(self, input_ids: Tensor, past: tuple[Tensor, ...] = ()) -> tuple[Tensor, ...]:
        """(logits, present.0.key, present.0.value, ...) for ids (B, T) after ``past``."""
        T = input_ids.shape[1]
        P = past[0].shape[2] if self.kv_cache else 0
        cache = PastKVCache(past if self.kv_cache else None)
        input_pos = torch.arange(T, device=input_ids.device) + P  # (T,) absolute positions
        logits = self.model(input_ids, cache, input_pos=input_pos)  # (B, T, V)
        return (logits, *(cache.present if self.kv_cache else ()))


def io_names(n_layer: int, kv_cache: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph."""
    if not kv_cache:
        return ["input_ids"], ["logits"]
    kv = [(i, s) for i in range(n_layer) for s in ("key", "value")]
    return (["input_ids", *(f"past_key_values.{i}.{s}" for i, s in kv)],
            ["logits", *(f"present.{i}.{s}" for i, s in kv)])


def export_onnx(model: Decoder, path: Path, kv_cache: bool) -> float:
    """Write ``model`` (fp32, eval) to ``path`` as ONNX; returns the export time in seconds."""
    cfg = model.cfg
    if cfg.block_size < MIN_BLOCK:
        raise UserError(f"model.block_size: ONNX export needs at least {MIN_BLOCK}, "
                        f"got {cfg.block_size}")
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise UserError(f"ONNX export needs onnxscript; {INSTALL}") from None
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("sequence", min=1, max=cfg.block_size)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    kv_shape = (2, cfg.kv_heads, 3, cfg.head_dim)
    past = tuple(torch.zeros(kv_shape) for _ in range(2 * cfg.n_layer)) if kv_cache else ()
    shapes: tuple[Any, ...] = ({0: batch, 1: seq},)
    if kv_cache:
        past_len = torch.export.Dim("past_sequence", min=0, max=cfg.block_size)
        shapes += (tuple({0: batch, 2: past_len} for _ in past),)
    inputs, outputs = io_names(cfg.n_layer, kv_cache)
    t0 = time.perf_counter()
    with _quiet():
        program = torch.onnx.export(
            OnnxDecoder(model.eval(), kv_cache), (ids, past) if kv_cache else (ids,),
            dynamo=True, dynamic_shapes=shapes, input_names=inputs, output_names=outputs,
            verbose=False)
    # One file below protobuf's 2 GB limit; larger models keep weights in model.onnx.data.
    large = sum(p.numel() * 4 for p in model.parameters()) > 1_800_000_000
    program.save(str(path), external_data=large)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's chatter (axis renaming, "torchvision is not installed") while
    it runs; real failures still raise."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"the onnx export checks its output with onnxruntime; {INSTALL}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def load_back_check(model: Decoder, path: Path, kv_cache: bool) -> tuple[float, list[str]]:
    """Max |Δlogits| between ``model`` and onnxruntime running ``path``, and what was run.

    Two (batch, sequence) shapes that differ from the traced (2, 5) prove the axes dynamic;
    with a KV cache, a prefill then a 1-token and a 3-token step are compared with one full
    forward of the same tokens.
    """
    session, cfg = _session(path), model.cfg
    g = torch.Generator().manual_seed(0)
    worst, runs = 0.0, []
    for batch, length in ((1, min(cfg.block_size, 7)), (3, min(cfg.block_size, 24))):
        ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
        got = _run(session, ids, _empty_past(cfg, batch) if kv_cache else None)[0]
        worst = max(worst, (torch.from_numpy(got) - model(ids)).abs().max().item())
        runs.append(f"{batch}x{length}")
    if kv_cache:
        ids = torch.randint(0, cfg.vocab_size, (2, min(cfg.block_size, 16)), generator=g)
        steps = _chunks(ids, (ids.shape[1] - 4, 1, 3))
        past, logits = _empty_past(cfg, 2), []
        for chunk in steps:
            out = _run(session, chunk, past)
            logits.append(out[0])
            past = out[1:]
        got = torch.from_numpy(np.concatenate(logits, axis=1))
        worst = max(worst, (got - model(ids)).abs().max().item())
        runs.append("2x" + "+".join(str(c.shape[1]) for c in steps) + " cached")
    return worst, runs


def _empty_past(cfg: Any, batch: int) -> list[np.ndarray]:
    return [np.zeros((batch, cfg.kv_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.n_layer)


def _chunks(ids: Tensor, sizes: tuple[int, ...]) -> list[Tensor]:
    return list(ids.split(list(sizes), dim=1))


def _run(session: Any, ids: Tensor, past: list[np.ndarray] | None) -> list[np.ndarray]:
    feed = {"input_ids": ids.numpy().astype(np.int64)}
    if past is not None:
        names = [i.name for i in session.get_inputs()][1:]
        feed.update(zip(names, past, strict=True))
    return session.run(None, feed)
