"""Speculative decoding: greedy equals the target alone; samples follow the target's law."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmforge.config import UserError
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate
from lmforge.infer.sampling import InvalidRequest, SamplingParams, probabilities
from lmforge.infer.speculative import SpecStats, speculative_generate
from lmforge.models.decoder import Decoder, DecoderConfig


def model_for(seed: int, vocab: int = 53, **kw: object) -> Decoder:
    base: dict[str, object] = dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=4,
                                   n_embd=32, init_std=0.2)
    base.update(kw)
    model = Decoder(DecoderConfig(**base))  # type: ignore[arg-type]
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def drain(gen: object) -> tuple[list[int], str]:
    out: list[int] = []

    def inner() -> object:
        return (yield from gen)  # type: ignore[misc]

    it = inner()
    while True:
        try:
            out.append(next(it))
        except StopIteration as stop:
            return out, stop.value


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("prompt", [[1, 2, 3], [7], list(range(5, 25))])
def test_greedy_equals_the_target_alone(k: int, prompt: list[int]) -> None:
    target, draft = model_for(0), model_for(1, n_layer=1, n_embd=16, n_head=2)
    expected = list(generate(target, prompt, 40, temperature=0.0))  # runs into the context end
    stats = SpecStats()
    got, reason = drain(speculative_generate(target, draft, prompt, 40, k=k, temperature=0.0,
                                             stats=stats))
    assert got == expected and reason == "length"
    assert stats.rounds < len(got) or k == 1 or stats.accepted == 0


def test_a_perfect_draft_is_always_accepted() -> None:
    target = model_for(0)
    stats = SpecStats()
    got, _ = drain(speculative_generate(target, target, [1, 2], 20, k=4, temperature=0.0,
                                        stats=stats))
    assert got == list(generate(target, [1, 2], 20, temperature=0.0))
    assert stats.accepted == stats.proposed > 0 and stats.rounds == 4  # 5 tokens a round


def test_stops_at_eos_without_yielding_it() -> None:
    target, draft = model_for(0), model_for(3)
    expected = list(generate(target, [4, 5], 12, temperature=0.0))
    eos = expected[6]
    got, reason = drain(speculative_generate(target, draft, [4, 5], 12, k=3,
                                             temperature=0.0, eos_id=eos))
    assert got == expected[: expected.index(eos)] and reason == "stop"


def test_vocabularies_must_match() -> None:
    with pytest.raises(UserError, match="vocab_size"):
        drain(speculative_generate(model_for(0), model_for(1, vocab=50), [1], 3))
    with pytest.raises(UserError, match="^draft: vocab_size"):
        Engine(model_for(0), str, eos_id=None, draft=model_for(1, vocab=50))


# --------------------------------------------------------------------------- the engine


def no_text(ids: list[int]) -> str:
    return ""


def test_engine_rows_with_a_draft_each_get_their_greedy_answer() -> None:
    target, other = model_for(0), model_for(1, n_layer=1, n_embd=16, n_head=2)
    prompts = [[1, 2, 3], list(range(5, 25)), [7], [9, 9, 9, 9], [30, 31]]
    lengths = [10, 12, 31, 3, 17]  # 20 + 12 and 1 + 31 fill the 32 positions exactly
    for draft in (other, target):  # a poor draft (rejections) and a perfect one
        engine = Engine(target, no_text, eos_id=None, max_batch=3, draft=draft, draft_tokens=3)
        handles = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0))
                   for p, n in zip(prompts, lengths)]  # 3 slots: two wait, then join midway
        for handle, prompt, n in zip(handles, prompts, lengths):
            assert handle.result().token_ids == list(generate(target, prompt, n, temperature=0))
        spec = engine.spec
        assert spec.rounds > 0 and (spec.accepted == spec.proposed if draft is target
                                    else spec.accepted < spec.proposed)
    penalized = SamplingParams(max_tokens=3, presence_penalty=0.5)
    with pytest.raises(InvalidRequest, match="^presence_penalty: .*draft"):
        engine.submit([1], penalized)


# --------------------------------------------------------------------------- distribution

VOCAB, STEPS, SAMPLES = 4, 3, 1000
Z_999 = 3.0902  # the standard normal's 0.999 quantile


@torch.no_grad()
def joint(model: Decoder, prompt: list[int], temperature: float,
          top_k: int | None) -> dict[tuple[int, ...], float]:
    """Exact probability of every 3-token continuation, by enumeration."""
    out = {}
    for seq in itertools.product(range(VOCAB), repeat=STEPS):
        ids = torch.tensor([prompt + list(seq)])
        params = SamplingParams(temperature=temperature, top_k=top_k)
        probs = probabilities(model(ids)[0, len(prompt) - 1 : -1], params)
        out[seq] = math.prod(float(probs[i, t]) for i, t in enumerate(seq))
    return out


def chi2(counts: dict[tuple[int, ...], float], p: dict[tuple[int, ...], float],
         n: int) -> tuple[float, float]:
    """Pearson's statistic, cells expecting < 5 pooled into one; and its 0.001 critical value."""
    big = [s for s, ps in p.items() if n * ps >= 5]
    observed = [counts.get(s, 0) for s in big]
    expected = [n * p[s] for s in big]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(big)  # bins - 1
    # Wilson-Hilferty: chi2_dof quantiles from the normal one, good to ~1% at these dof.
    critical = dof * (1 - 2 / (9 * dof) + Z_999 * math.sqrt(2 / (9 * dof))) ** 3
    return stat, critical


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.7, 3)])
def test_samples_follow_the_targets_distribution(temperature: float, top_k: int | None) -> None:
    # Two unrelated tiny models: the draft's law is far from the target's, so keeping its
    # proposals unchecked would fail this test by a wide margin (asserted first).
    target = model_for(0, vocab=VOCAB, n_layer=1, n_embd=16, n_head=2, init_std=0.1)
    draft = model_for(5, vocab=VOCAB, n_layer=1, n_embd=16, n_head=2, init_std=0.1)
    prompt = [1, 3]
    p = joint(target, prompt, temperature, top_k)
    q = joint(draft, prompt, temperature, top_k)
    stat, critical = chi2({s: SAMPLES * qs for s, qs in q.items()}, p, SAMPLES)
    assert stat > 3 * critical
    counts: dict[tuple[int, ...], int] = {}
    stats = SpecStats()
    for seed in range(SAMPLES):
        got, _ = drain(speculative_generate(target, draft, prompt, STEPS, k=2,
                                            temperature=temperature, top_k=top_k, seed=seed,
                                            stats=stats))
        counts[tuple(got)] = counts.get(tuple(got), 0) + 1
    assert all(p[s] > 0 for s in counts)  # nothing top-k forbids
    stat, critical = chi2(counts, p, SAMPLES)
    assert stat < critical
    assert 0 < stats.accepted < stats.proposed  # both the accept and the reject paths ran


def test_engine_rows_with_a_draft_sample_the_targets_distribution() -> None:
    target = model_for(0, vocab=VOCAB, n_layer=1, n_embd=16, n_head=2, init_std=0.1)
    draft = model_for(5, vocab=VOCAB, n_layer=1, n_embd=16, n_head=2, init_std=0.1)
    prompt = [1, 3]
    p = joint(target, prompt, 1.0, None)
    n = SAMPLES // 2  # 1000 single-row runs above; the batched rows take longer per sample
    q = joint(draft, prompt, 1.0, None)
    assert chi2({s: n * qs for s, qs in q.items()}, p, n)[0] > 3 * chi2({}, p, n)[1]  # power
    engine = Engine(target, no_text, eos_id=None, max_batch=8, max_queue=n, draft=draft,
                    draft_tokens=2)
    handles = [engine.submit(prompt, SamplingParams(max_tokens=STEPS, seed=seed))
               for seed in range(n)]  # 8 rows per batch, each with its own generator
    counts: dict[tuple[int, ...], int] = {}
    for handle in handles:
        got = tuple(handle.result().token_ids)
        counts[got] = counts.get(got, 0) + 1
    stat, critical = chi2(counts, p, n)
    assert stat < critical
    assert 0 < engine.spec.accepted < engine.spec.proposed  # both paths of the rule ran
