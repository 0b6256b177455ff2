"""Speculative decoding: a small draft model proposes, the target model verifies.

Each round the draft samples k tokens one by one (cheap), then the target scores all of them
in one forward (k+1 positions for about the cost of one decode step on a memory-bound
machine). Draft token i is kept with probability min(1, p_i(x) / q_i(x)) — p the target's,
q the draft's distribution — and the first rejected one is replaced by a sample from
norm(max(0, p_i - q_i)); when all k are kept, one more token comes from p_{k+1}. The tokens
produced are distributed exactly as the target's own samples (Leviathan et al. 2023,
"Fast Inference from Transformers via Speculative Decoding", thm. 1; Chen et al. 2023).
At temperature 0 the rule becomes "keep while the target's argmax agrees", so the output
is the target's greedy output token for token.

Both models keep a ``KVCache``; after a round each cache is rolled back (its ``length`` cut)
to the tokens that were kept. p and q are the distributions after temperature, top-k and
top-p and min-p, as ``sampling.probabilities`` gives them to ``sampling.sample``, so the result
samples what ``generate`` samples. Penalties depend on the tokens before each draft position
and are refused here.
"""

from __future__ import annotations

from collections.abc import Collection, Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.infer.generate import stop_set
from lmforge.infer.sampling import SamplingParams, probabilities, sample
from lmforge.models.decoder import Decoder, KVCache


@dataclass
class SpecStats:
    """How well the draft guessed: ``accepted / proposed`` is the acceptance rate."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    """Target forwards (each gives 1 to k+1 tokens)."""


def _check(target: Decoder, draft: Decoder, k: int, max_new_tokens: int) -> None:
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise UserError(f"draft: vocab_size {draft.cfg.vocab_size} differs from the target's "
                        f"{target.cfg.vocab_size}; the two models must share a tokenizer")
    if k < 1:
        raise ConfigError(f"k: must be >= 1 draft tokens per round, got {k}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if target.training or draft.training:
        raise ValueError("call model.eval() on both models before generating")


def _feed(model: Decoder, cache: KVCache, ids: list[int]) -> Tensor:
    device = model.tok_emb.weight.device
    return model(torch.tensor([ids], device=device), cache)[0]  # (T, V)


# inference_mode as a decorator, as in generate.py: it covers each resumption of the generator.
@torch.inference_mode()
def speculative_generate(
    target: Decoder,
    draft: Decoder,
    prompt_ids: list[int],
    max_new_tokens: int,
    k: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Collection[int] | None = None,
    seed: int | None = None,
    stats: SpecStats | None = None,
    params: SamplingParams | None = None,
) -> Generator[int, None, str]:
    """Stream up to ``max_new_tokens`` ids continuing ``prompt_ids``, like ``generate``.

    Same context policy, EOS rule and return value ("stop" or "length") as ``generate``;
    ``k`` draft tokens per round; ``stats`` (if given) counts proposals and acceptances;
    ``params`` (min-p, ...) replaces the sampling arguments.
    """
    if params is None:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed)
    params.check()
    if params.penalized:
        raise ConfigError("repetition_penalty: penalties are not supported with a draft model; "
                          "leave them at their defaults")
    max_new_tokens, seed = params.max_tokens, params.seed
    stops = stop_set(eos_id)
    _check(target, draft, k, max_new_tokens)
    if not prompt_ids:
        raise UserError("prompt: empty; give at least one token id (e.g. the tokenizer's BOS)")
    stats = stats if stats is not None else SpecStats()
    block = min(target.cfg.block_size, draft.cfg.block_size)
    seq = list(prompt_ids[-max(1, block + 1 - max_new_tokens):])
    device = target.tok_emb.weight.device
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    tcache, dcache = target.new_cache(1, block), draft.new_cache(1, block)
    produced = 0
    while produced < max_new_tokens and len(seq) <= block:
        n = min(k, block - len(seq), max_new_tokens - produced - 1)  # draft tokens this round
        drafts, qs = _propose(draft, dcache, seq, n, params, gen)
        logits = _feed(target, tcache, seq[tcache.length:] + drafts)[-(n + 1):]  # (n+1, V)
        kept, extra = _verify(logits, drafts, qs, params, gen)
        stats.proposed, stats.accepted, stats.rounds = (
            stats.proposed + n, stats.accepted + kept, stats.rounds + 1)
        tcache.length = len(seq) + kept  # roll back to the kept tokens
        dcache.length = min(dcache.length, len(seq) + kept)
        for token in [*drafts[:kept], extra]:
            if token in stops:
                return "stop"
            yield token
            produced += 1
        seq += [*drafts[:kept], extra]
    return "length"


def _propose(draft: Decoder, cache: KVCache, seq: list[int], n: int, params: SamplingParams,
             gen: torch.Generator | None) -> tuple[list[int], list[Tensor]]:
    """n draft tokens after ``seq`` and the distribution (V,) each was drawn from."""
    if n == 0:
        return [], []
    logits = _feed(draft, cache, seq[cache.length:])[-1]  # (V,)
    tokens: list[int] = []
    dists: list[Tensor] = []
    for i in range(n):
        tokens.append(int(sample(logits[None], params, gen)))
        if params.temperature != 0.0:  # what sample drew from, again: cheap next to a forward
            dists.append(probabilities(logits[None], params)[0])  # (V,)
        if i < n - 1:
            logits = _feed(draft, cache, tokens[-1:])[-1]
    return tokens, dists


def _verify(logits: Tensor, drafts: list[int], qs: list[Tensor], params: SamplingParams,
            gen: torch.Generator | None) -> tuple[int, int]:
    """(number of drafts kept, the token after them) from the target's logits (n+1, V)."""
    if params.temperature == 0.0:
        best = logits.argmax(dim=-1).tolist()  # (n+1,)
        kept = next((i for i, d in enumerate(drafts) if best[i] != d), len(drafts))
        return kept, best[kept]
    ps = probabilities(logits, params)  # (n+1, V)
    for i, (d, q) in enumerate(zip(drafts, qs)):
        u = torch.rand((), generator=gen, device=ps.device)
        if u * q[d] < ps[i, d]:  # u < p/q without dividing by a tiny q
            continue
        residual = (ps[i] - q).clamp(min=0.0)
        if residual.sum() <= 0:  # p == q up to rounding: the target's own sample is right
            residual = ps[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return len(drafts), int(torch.multinomial(ps[-1], 1, generator=gen))
