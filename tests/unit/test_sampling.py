"""Sampling rules checked on hand-made distributions with seeded generators."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.infer.sampling import SamplingParams, min_p_filter, penalize, sample, top_p_filter


def draws(logits: torch.Tensor, n: int, seed: int = 0, **kw: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(**kw)  # type: ignore[arg-type]
    return torch.stack([sample(logits, params, g) for _ in range(n)])  # (n, B)


def test_temperature_zero_is_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))


def test_top_k_one_is_argmax_whatever_the_seed() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    got = draws(logits, 50, temperature=1.5, top_k=1)
    assert torch.equal(got, logits.argmax(-1).expand(50, 4))


def test_top_k_draws_only_the_k_best_per_row() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    got = draws(logits, 300, top_k=5)
    for row in range(3):
        allowed = set(logits[row].topk(5).indices.tolist())
        assert set(got[:, row].tolist()) == allowed  # all of them, and nothing else


def test_top_p_keeps_smallest_nucleus() -> None:
    # Tokens in shuffled order so the filter must really sort: probs by id.
    probs = torch.tensor([[0.05, 0.30, 0.02, 0.50, 0.13]])
    logits = probs.log()
    # Sorted: 0.50 (id 3), 0.30 (id 1), 0.13 (id 4) ... cumulative 0.50, 0.80, 0.93.
    assert set(draws(logits, 2000, top_p=0.75).flatten().tolist()) == {3, 1}
    assert set(draws(logits, 2000, top_p=0.85).flatten().tolist()) == {3, 1, 4}
    assert set(draws(logits, 500, top_p=0.4).flatten().tolist()) == {3}  # top token always kept
    got = draws(logits, 4000, top_p=0.75).flatten()
    ratio = (got == 3).float().mean().item()
    assert ratio == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalized over the nucleus


def test_top_p_filter_matches_direct_rule() -> None:
    logits = torch.randn(6, 25, generator=torch.Generator().manual_seed(3))
    kept = top_p_filter(logits, 0.6).isfinite()
    probs = logits.softmax(-1)
    for row in range(6):
        # A token is kept iff the mass of strictly more likely tokens is below p.
        for tok in range(25):
            above = probs[row][probs[row] > probs[row, tok]].sum().item()
            assert kept[row, tok].item() == (above < 0.6)


def test_top_k_then_top_p() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top_k=2 leaves 0.4/0.3 -> renormalized 0.571, 0.429; top_p=0.5 then keeps only id 0.
    assert set(draws(probs.log(), 300, top_k=2, top_p=0.5).flatten().tolist()) == {0}


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 0.0]])
    hot = (draws(logits, 2000, temperature=2.0) == 0).float().mean().item()
    cold = (draws(logits, 2000, temperature=0.25) == 0).float().mean().item()
    assert hot == pytest.approx(torch.tensor([0.5, 0.0]).softmax(0)[0].item(), abs=0.04)
    assert cold == pytest.approx(torch.tensor([4.0, 0.0]).softmax(0)[0].item(), abs=0.02)


def test_same_seed_same_samples() -> None:
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(4))
    a = draws(logits, 30, seed=5, top_p=0.9)
    b = draws(logits, 30, seed=5, top_p=0.9)
    c = draws(logits, 30, seed=6, top_p=0.9)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ],
)
def test_bad_arguments_name_the_field(kw: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        SamplingParams(**kw).check()  # type: ignore[arg-type]


def test_logits_must_be_2d() -> None:
    with pytest.raises(ValueError, match="B, V"):
        sample(torch.zeros(1, 2, 4), SamplingParams())


def test_min_p_keeps_tokens_near_the_top() -> None:
    logits = torch.tensor([[0.0, -0.5, -3.0, -10.0]]).log_softmax(-1)
    kept = min_p_filter(logits, 0.5).isfinite().tolist()
    assert kept == [[True, True, False, False]]  # exp(-0.5) = 0.61 >= 0.5 > exp(-3)
    assert set(draws(logits, 300, min_p=0.5).flatten().tolist()) == {0, 1}


def test_penalties_follow_ctrl_and_openai_rules_per_row() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    out = penalize(logits, SamplingParams(repetition_penalty=2.0), [[0], [3]], [[1], []])
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]))
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = penalize(logits[:1], params, [[3]], [[2, 2, 0]])
    torch.testing.assert_close(out, torch.tensor([[1.25, -1.0, -0.5, 3.0]]))
    # Greedy picks from the penalized logits: token 3 (seen in the prompt) loses to token 0.
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits[:1], params, None, [[3]], [[]]).tolist() == [0]
    with pytest.raises(ValueError, match="penalties need"):
        sample(logits, params)


def test_penalties_match_transformers_processors() -> None:
    """The repetition penalty equals transformers' RepetitionPenaltyLogitsProcessor."""
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(7)
    logits, history = torch.randn(2, 30, generator=g), torch.randint(0, 30, (2, 6), generator=g)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone())
    rows = history.tolist()
    got = penalize(logits, SamplingParams(repetition_penalty=1.7), rows, [[] for _ in rows])
    torch.testing.assert_close(got, ref)
