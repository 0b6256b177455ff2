"""Generation for encoder-decoder models: encode once, then decode token by token.

``encode_sources`` pads a list of source id lists into a batch. ``generate_seq2seq`` runs the
encoder once, then the decoder from [BOS] one token per step with a ``Seq2SeqCache``: the
decoder's self-attention keys/values are written into a preallocated buffer, and each layer's
cross-attention keys/values are computed from the encoder output on the first step and reused.
``use_cache=False`` recomputes the whole target prefix every step instead (the reference the
cached path is tested against). Greedy (temperature 0) or sampled, as ``sampling.sample``.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.infer.sampling import SamplingParams, sample
from lmforge.models.seq2seq import Seq2Seq


def encode_sources(sources: list[list[int]], pad_id: int,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad source ids into (src (B, S), src_mask (B, S) True on real tokens)."""
    if not sources or any(len(s) == 0 for s in sources):
        raise UserError("source: empty; give every source at least one token (e.g. its EOS)")
    S = max(len(s) for s in sources)
    src = torch.full((len(sources), S), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sources), S), dtype=torch.bool, device=device)
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return src, mask


def _steps(model: Seq2Seq, src: Tensor, src_mask: Tensor, bos_id: int, max_new_tokens: int,
           use_cache: bool) -> Generator[Tensor, Tensor, None]:
    """Logits (B, V) of each next target token; the caller sends each chosen token (B,) back."""
    memory = model.encode(src, src_mask)  # (B, S, C), once
    B = src.shape[0]
    tgt = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)  # (B, 1)
    if use_cache:
        cache = model.new_cache(B, max_new_tokens)
        logits = model.decode(tgt, memory, src_mask, cache)[:, -1]  # (B, V)
        while True:
            token = yield logits
            # memory=None: cross-attention reads its keys/values from the cache from now on
            logits = model.decode(token[:, None], None, src_mask, cache)[:, -1]
    while True:
        token = yield model.decode(tgt, memory, src_mask)[:, -1]  # full prefix every step
        tgt = torch.cat((tgt, token[:, None]), dim=1)  # (B, t + 1)


# inference_mode as a decorator (see infer/generate.py): no grad, no autograd bookkeeping.
@torch.inference_mode()
def generate_seq2seq(
    model: Seq2Seq,
    sources: list[list[int]],
    max_new_tokens: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Target ids for each source (ids, ending with EOS as in training), each cut before its EOS.

    Rows decode in lockstep; a finished row's later tokens are discarded. At most
    ``max_new_tokens`` (and block_size) tokens per row. Temperature 0 is greedy; ``seed``
    makes sampling reproducible.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed)
    params.check()
    if model.training:
        raise ValueError("call model.eval() before generating")
    device = model.lm_head.weight.device
    src, src_mask = encode_sources(sources, pad_id, device)
    max_new_tokens = min(max_new_tokens, model.cfg.block_size)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    steps = _steps(model, src, src_mask, bos_id, max_new_tokens, use_cache)
    logits = next(steps)
    outputs: list[list[int]] = [[] for _ in sources]
    done = [False] * len(sources)
    for step in range(max_new_tokens):
        token = sample(logits, params, generator)  # (B,)
        for row, tok in enumerate(token.tolist()):
            done[row] = done[row] or tok == eos_id
            if not done[row]:
                outputs[row].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = steps.send(token)
    steps.close()
    return outputs
