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
to the tokens that were kept. ``speculate_rows`` runs the same round for all the rows of a
continuous batch (the serving engine): B x 1 draft steps, one (B, k+1) target forward, and
each row keeps its own prefix by the same ``_verify``. p and q are the distributions after temperature, top-k and
top-p and min-p, as ``sampling.probabilities`` gives them to ``sampling.sample``, so the result
samples what ``generate`` samples. Penalties depend on the tokens before each draft position
and are refused here.
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.infer.generate import stop_set
from lmforge.infer.sampling import SamplingParams, fit_prompt, probabilities, sample
from lmforge.models.decoder import Decoder, KVCache
from lmforge.models.kv_cache import RowKVCache

DRAFT_TOKENS = 4  # tokens the draft proposes per round, unless told otherwise


@dataclass
class SpecStats:
    """How well the draft guessed: ``accepted / proposed`` is the acceptance rate."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    """Target forwards (each gives 1 to k+1 tokens)."""


def check_draft(target: Decoder, draft: Decoder, k: int) -> None:
    """UserError unless ``draft`` can propose ``k`` tokens per round for ``target``."""
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise UserError(f"draft: vocab_size {draft.cfg.vocab_size} differs from the target's "
                        f"{target.cfg.vocab_size}; the two models must share a tokenizer")
    if k < 1:
        raise ConfigError(f"k: must be >= 1 draft tokens per round, got {k}")
    if target.training or draft.training:
        raise ValueError("call model.eval() on both models before generating")


def check_draft_tokenizer(run: str, draft_run: str, tokenizer: Any,
                          draft_tokenizer: Any) -> None:
    """UserError unless the draft run's tokenizer (a ``tokenizers.Tokenizer``) is the target's:
    equal vocabulary sizes are not enough, the same id must mean the same text."""
    if draft_tokenizer.to_str() != tokenizer.to_str():
        raise UserError(f"draft: {draft_run} has another tokenizer than {run}; speculative "
                        "decoding needs a draft trained with the same tokenizer")


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
    k: int = DRAFT_TOKENS,
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
    check_draft(target, draft, k)
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    stats = stats if stats is not None else SpecStats()
    block = min(target.cfg.block_size, draft.cfg.block_size)
    seq, room = fit_prompt(prompt_ids, max_new_tokens, block, truncate=True)
    max_new_tokens = min(max_new_tokens, room)  # prompt + new tokens <= block, as generate
    device = target.tok_emb.weight.device
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    # Rounds cut the caches back by up to k positions: sliding layers keep k more.
    tcache, dcache = target.new_cache(1, block, k), draft.new_cache(1, block, k)
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
            gen: torch.Generator | None, best: list[int] | None = None) -> tuple[int, int]:
    """(number of drafts kept, the token after them) from the target's logits (n+1, V);
    ``best``, the argmax of each row of ``logits`` if the caller has it already."""
    if params.temperature == 0.0:
        best = logits.argmax(dim=-1).tolist() if best is None else best  # (n+1,)
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


# --------------------------------------------------------------------------- a batch of rows


def speculate_rows(target: Decoder, draft: Decoder, tcache: RowKVCache, dcache: RowKVCache,
                   last: list[int], k: int, params: Sequence[SamplingParams],
                   gens: Sequence[torch.Generator | None],
                   stats: SpecStats | None = None) -> list[list[int]]:
    """One round of speculative decoding for every row of a continuous batch.

    Row b's caches (views of the running rows; the two agree row by row) hold its sequence
    but its ``last`` token. The draft feeds ``last`` and proposes ``k`` tokens for every row
    (k+1 batched forwards of B x 1: the last one only writes d_k's keys), the target scores
    [last, d_1..d_k] of all rows in one (B, k+1) forward, and each row keeps its own accepted
    prefix and one more token by ``_verify``, with its own parameters and generator. Both
    caches are then cut back per row to hold again all but the row's last new token. ``k`` 0
    is a plain decode step of both models. Returns each row's new tokens (1 to k+1).
    """
    device = target.tok_emb.weight.device
    start = tcache.lengths.clone()  # (B,)
    fed = torch.tensor(last, device=device)[:, None]  # (B, 1)
    first = fed
    drafts: list[Tensor] = []  # k tensors (B,)
    qs: list[list[Tensor]] = [[] for _ in last]  # per row: the q (V,) of each proposal
    for i in range(k + 1):
        out = draft(fed, dcache, hidden=i == k)  # (B, 1, V), or (B, 1, C) when only writing
        if i == k:
            break
        drafts.append(_draw_rows(out[:, -1], params, gens, qs))
        fed = drafts[-1][:, None]  # (B, 1)
    block = torch.cat([first, *[d[:, None] for d in drafts]], dim=1)  # (B, k+1)
    logits = target(block, tcache)  # (B, k+1, V)
    proposed = block[:, 1:].tolist()
    best = logits.argmax(dim=-1).tolist()  # (B, k+1): one sync serves every greedy row
    news, kept = [], []
    for b, p in enumerate(params):
        n, extra = _verify(logits[b], proposed[b], qs[b], p, gens[b], best[b])
        news.append([*proposed[b][:n], extra])
        kept.append(n)
    ends = start + 1 + torch.tensor(kept, device=start.device)  # (B,)
    tcache.lengths.copy_(ends)  # roll back: a query never sees keys past its own position
    dcache.lengths.copy_(ends)
    if stats is not None:
        stats.proposed, stats.accepted, stats.rounds = (
            stats.proposed + k * len(last), stats.accepted + sum(kept), stats.rounds + 1)
    return news


def _draw_rows(logits: Tensor, params: Sequence[SamplingParams],
               gens: Sequence[torch.Generator | None], qs: list[list[Tensor]]) -> Tensor:
    """A draft token per row (B,) from the draft's logits (B, V); sampled rows add their q."""
    tokens = logits.argmax(dim=-1)  # (B,): greedy rows, all of them in one op
    for b, p in enumerate(params):
        if p.temperature != 0.0:
            row = logits[b : b + 1]  # (1, V)
            tokens[b] = sample(row, p, gens[b])[0]
            qs[b].append(probabilities(row, p)[0])  # what sample drew from
    return tokens
