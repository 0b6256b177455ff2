"""Autoregressive generation with a static KV cache, in the gpt-fast style.

``prefill`` runs the prompt once and fills the cache; ``decode_step`` feeds one token per
step. ``generate`` streams token ids for one prompt; ``generate_batch`` runs equal-length
prompts together.

Context policy: the prompt is truncated from the left so that prompt + max_new_tokens fits
in block_size (the last generated token is never fed back, so it needs no position).
When max_new_tokens alone exceeds block_size, one prompt token is kept and generation stops
once the context is full.
"""

from __future__ import annotations

from collections.abc import Collection, Generator

import torch
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.infer.sampling import SamplingParams, sample
from lmforge.models.decoder import Decoder, KVCache


def prefill(model: Decoder, idx: Tensor, cache: KVCache) -> Tensor:
    """Run prompt ids (B, T) into an empty ``cache``; logits (B, V) of the last position."""
    return model(idx, cache)[:, -1]  # (B, V)


def decode_step(model: Decoder, token: Tensor, cache: KVCache) -> Tensor:
    """Feed one token per row (B,) after the cached ones; logits (B, V) for the next."""
    return model(token[:, None], cache)[:, -1]  # (B, 1) in -> (B, V) out


def _stream(model: Decoder, prompts: list[list[int]],
            params: SamplingParams) -> Generator[Tensor, None, None]:
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
    keep = max(1, block + 1 - max_new_tokens)
    device = model.tok_emb.weight.device
    fitted = [p[-keep:] for p in prompts]
    idx = torch.tensor(fitted, dtype=torch.long, device=device)  # (B, T)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    outputs: list[list[int]] = [[] for _ in prompts]  # the history penalties look at
    cache = model.new_cache(idx.shape[0], min(block, idx.shape[1] + max_new_tokens - 1))
    logits = prefill(model, idx, cache)  # (B, V)
    for step in range(max_new_tokens):
        token = sample(logits, params, generator, fitted, outputs)  # (B,)
        yield token
        if step == max_new_tokens - 1 or cache.length == cache.max_len:
            return
        if params.penalized:
            for out, tok in zip(outputs, token.tolist()):
                out.append(tok)
        logits = decode_step(model, token, cache)


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
) -> Generator[int, None, str]:
    """Stream up to ``max_new_tokens`` token ids continuing ``prompt_ids``.

    Stops at ``eos_id`` (or any of several) without yielding it. The generator's return value (``yield from``
    or StopIteration.value) is the finish reason: "stop" (eos) or "length" (max_new_tokens
    or context full). ``seed`` makes sampling reproducible; temperature 0 is greedy.
    ``params`` (min-p, penalties, ...) replaces the sampling arguments before it.
    """
    stops = stop_set(eos_id)
    params = _params(params, max_new_tokens, temperature, top_k, top_p, seed)
    for token in _stream(model, [prompt_ids], params):
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
) -> list[list[int]]:
    """Continuations of equal-length ``prompts``, each cut before its first ``eos_id``.

    Rows share one cache offset (no padding); a finished row keeps decoding until all rows
    are done, its extra tokens discarded. Same rules as ``generate`` otherwise.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = stop_set(eos_id)
    params = _params(params, max_new_tokens, temperature, top_k, top_p, seed)
    for token in _stream(model, prompts, params):
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
