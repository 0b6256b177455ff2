"""Autoregressive generation with a static KV cache, in the gpt-fast style.

``prefill`` runs the prompt once at positions 0..T-1, fills the cache and computes the head on
the last position only; ``decode_one`` feeds one token per row at an explicit position. Every
decode step has the same shapes (the cache is static, the position a tensor), so ``DecodeStep``
can hand it to ``torch.compile``; when compiling fails it says so in one line and decodes
eagerly. ``generate`` streams token ids for one prompt; ``generate_batch`` runs equal-length
prompts together.

Context policy (``sampling.fit_prompt``): the prompt is truncated from the left so that
prompt + max_new_tokens fits in block_size. When max_new_tokens alone reaches block_size,
one prompt token is kept and block_size - 1 tokens are generated.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Generator

import torch
from torch import Tensor, nn

from lmforge.config import ConfigError, UserError
from lmforge.infer.sampling import SamplingParams, fit_prompt, sample
from lmforge.models.decoder import Decoder, KVCache

log = logging.getLogger(__name__)


@torch.no_grad()
def decode_layout(model: nn.Module) -> int:
    """Store each fp32 CPU ``nn.Linear`` weight column-major, for faster batch-1 decoding;
    returns how many weights were re-laid out.

    The weight keeps its shape, values and Parameter (state dict, optimizer and tied head are
    untouched); only its strides change, to those of ``weight.t().contiguous().t()``. MKL's
    fp32 matrix-vector product reads that layout faster: all weight matmuls of one llama-6m
    token took 5.07 ms of CPU instead of 6.20 (1 thread; benchmarks/RESULTS.md, Generation).
    bf16 goes the other way (oneDNN: 2.3 -> 12.9 ms), and other devices pick their own
    kernels, so only fp32 on the CPU changes. Results may differ in the last bits (another
    summation order). Training afterwards still works: only strides changed.
    ``lmforge.run.load_run(..., rows=1)`` applies it: it pays at one row per forward only.
    """
    changed = 0
    for module in model.modules():
        w = module.weight if isinstance(module, nn.Linear) else None
        if (w is None or type(w.data) is not Tensor or w.dtype != torch.float32
                or w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous()):
            continue  # a quantized (subclass) weight, another dtype or device, or done already
        w.data = w.data.t().contiguous().t()  # (out, in), strides (1, out)
        changed += 1
    return changed


def prefill(model: Decoder, idx: Tensor, cache: KVCache, input_pos: Tensor) -> Tensor:
    """Run prompt ids (B, T) at positions ``input_pos`` (T,); logits (B, V) of the last one."""
    return model(idx, cache, input_pos=input_pos, last=True)[:, -1]  # (B, V)


def decode_one(model: Decoder, token: Tensor, cache: KVCache, input_pos: Tensor) -> Tensor:
    """Feed one token per row (B, 1) at position ``input_pos`` (1,); logits (B, V) for the next."""
    return model(token, cache, input_pos=input_pos)[:, -1]  # (B, 1) in -> (B, V) out


class DecodeStep:
    """``decode_one``, compiled with ``torch.compile`` when asked (gpt-fast compiles the decode
    step only: a prefill runs once per request, and its shapes change with every prompt).

    CUDA uses mode reduce-overhead (CUDA graphs: one launch per token), the CPU the default
    mode; the graph is full (fullgraph) and static (dynamic=False). A compile error is reported
    in one line and the steps run eagerly, so ``compile`` never costs a result.
    """

    def __init__(self, model: Decoder, compile: bool = False) -> None:
        self.model, self.compiled = model, compile
        self._fn = decode_one
        if compile:
            cuda = model.tok_emb.weight.device.type == "cuda"
            self._fn = torch.compile(decode_one, mode="reduce-overhead" if cuda else None,
                                     fullgraph=True, dynamic=False)

    def __call__(self, token: Tensor, cache: KVCache, input_pos: Tensor) -> Tensor:
        """Logits (B, V) after ``token`` (B, 1) at ``input_pos`` (1,)."""
        if self.compiled:
            try:
                return self._fn(self.model, token, cache, input_pos).clone()
            except Exception as e:  # the compiler's failure, not ours: eager gives the answer
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly",
                            type(e).__name__, first[:200])
                self.compiled, self._fn = False, decode_one
        return decode_one(self.model, token, cache, input_pos)


def _stream(model: Decoder, prompts: list[list[int]], params: SamplingParams,
            compile: bool = False) -> Generator[Tensor, None, None]:
    """Yield the next token of every row (B,) until max_tokens or the context is full."""
    params.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("prompt: empty; give at least one token id (e.g. the tokenizer's BOS)")
    if len({len(p) for p in prompts}) != 1:
        raise UserError("prompts: must all have the same length; pad or group them first")
    if model.training:
        # Dropout in train mode would silently corrupt sampling; we do not flip the caller's
        # module state behind its back.
        raise ValueError("call model.eval() before generating")
    max_new_tokens = params.max_tokens
    if max_new_tokens == 0:
        return
    block = model.cfg.block_size
    device = model.tok_emb.weight.device
    rows = [fit_prompt(p, max_new_tokens, block, truncate=True) for p in prompts]
    fitted, max_new_tokens = [ids for ids, _ in rows], rows[0][1]  # equal lengths: one m
    idx = torch.tensor(fitted, dtype=torch.long, device=device)  # (B, T)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    outputs: list[list[int]] = [[] for _ in prompts]  # the history penalties look at
    T = idx.shape[1]
    cache = model.new_cache(idx.shape[0], min(block, T + max_new_tokens - 1))
    decode = DecodeStep(model, compile)
    logits = prefill(model, idx, cache, torch.arange(T, device=device))  # (B, V)
    input_pos = torch.tensor([T], device=device)  # (1,), advanced in place: no new tensor
    for step in range(max_new_tokens):
        token = sample(logits, params, generator, fitted, outputs)  # (B,)
        yield token
        if step == max_new_tokens - 1 or T + step == cache.max_len:
            return
        if params.penalized:
            for out, tok in zip(outputs, token.tolist()):
                out.append(tok)
        logits = decode(token[:, None], cache, input_pos)
        input_pos += 1


def _params(params: SamplingParams | None, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, seed: int | None) -> SamplingParams:
    if params is not None:
        return params
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    return SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed)


def stop_set(eos_id: int | Collection[int] | None) -> frozenset[int]:
    """The ids that end a text: none, one, or several (Llama 3 lists three EOS tokens)."""
    if eos_id is None:
        return frozenset()
    return frozenset([eos_id] if isinstance(eos_id, int) else eos_id)


# inference_mode as a decorator, not a `with` inside the body: on a generator function torch
# re-enters the mode around each next() call, whereas a `with` would leak inference mode into
# the caller's code between yields.
@torch.inference_mode()
def generate(
    model: Decoder,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Collection[int] | None = None,
    seed: int | None = None,
    params: SamplingParams | None = None,
    compile: bool = False,
) -> Generator[int, None, str]:
    """Stream up to ``max_new_tokens`` token ids continuing ``prompt_ids``.

    Stops at ``eos_id`` (or any of several) without yielding it. The generator's return value (``yield from``
    or StopIteration.value) is the finish reason: "stop" (eos) or "length" (max_new_tokens
    or context full). ``seed`` makes sampling reproducible; temperature 0 is greedy.
    ``params`` (min-p, penalties, ...) replaces the sampling arguments before it, max_new_tokens
    included; ``compile`` compiles the decode step (``DecodeStep``).
    """
    stops = stop_set(eos_id)
    params = _params(params, max_new_tokens, temperature, top_k, top_p, seed)
    for token in _stream(model, [prompt_ids], params, compile):
        tok = int(token.item())
        if tok in stops:
            return "stop"
        yield tok
    return "length"


@torch.inference_mode()
def generate_batch(
    model: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Collection[int] | None = None,
    seed: int | None = None,
    params: SamplingParams | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Continuations of equal-length ``prompts``, each cut before its first ``eos_id``.

    Rows share one cache offset (no padding); a finished row keeps decoding until all rows
    are done, its extra tokens discarded. Same rules as ``generate`` otherwise.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = stop_set(eos_id)
    params = _params(params, max_new_tokens, temperature, top_k, top_p, seed)
    for token in _stream(model, prompts, params, compile):
        for row, tok in enumerate(token.tolist()):
            if done[row]:
                continue
            if tok in stops:
                done[row] = True
            else:
                outputs[row].append(tok)
        if all(done):
            break
    return outputs
