"""Masked-LM data: BERT's 15% / 80-10-10 statistics, special tokens, determinism and resume."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.config import ConfigError, UserError
from lmforge.data.mlm import (
    IGNORE,
    MLM_SPECIAL_TOKENS,
    MaskedBatches,
    Masker,
    MaskingConfig,
    MlmVocab,
    masked_eval_batches,
)
from lmforge.data.tokenizer import (
    EOS_TOKEN,
    special_token_ids,
    train_bpe,
    vocab_size_of,
    with_special_tokens,
)

TEXTS = ["the quick brown fox jumps over the lazy dog"] * 20 + ["pack my box with jugs"] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, 300)


@pytest.fixture(scope="module")
def vocab(tok: Tokenizer) -> MlmVocab:
    return MlmVocab.from_tokenizer(with_special_tokens(tok, MLM_SPECIAL_TOKENS)[0])


class Windows:
    """A stand-in for RandomBatches: random windows of regular ids, resumable."""

    def __init__(self, vocab: MlmVocab, seed: int, shape: tuple[int, int] = (4, 30)) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.shape, self.vocab = shape, vocab

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(1, 250, self.shape, generator=self.generator)
        return x, x

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(d["rng_state"])


# --------------------------------------------------------------------------- special tokens


def test_special_tokens_are_appended_and_existing_ids_kept(tok: Tokenizer) -> None:
    before = vocab_size_of(tok)
    grown, ids = with_special_tokens(tok, [*MLM_SPECIAL_TOKENS, EOS_TOKEN])
    assert ids[EOS_TOKEN] == tok.token_to_id(EOS_TOKEN) == 0
    assert sorted(ids[n] for n in MLM_SPECIAL_TOKENS) == list(range(before, before + 4))
    assert vocab_size_of(grown) == before + 4 and vocab_size_of(tok) == before  # a copy
    text = "the lazy dog"
    assert grown.encode(text).ids == tok.encode(text).ids  # shards stay valid
    assert ids["[MASK]"] in grown.encode("the [MASK] dog").ids  # one token, never split
    assert set(special_token_ids(grown)) == set(ids.values())
    again, same = with_special_tokens(grown, MLM_SPECIAL_TOKENS)
    assert vocab_size_of(again) == vocab_size_of(grown) and all(same[n] == ids[n] for n in same)


def test_vocab_without_mask_token_is_a_user_error(tok: Tokenizer) -> None:
    with pytest.raises(UserError, match=r"\[PAD\], \[CLS\], \[SEP\], \[MASK\]"):
        MlmVocab.from_tokenizer(tok)


@pytest.mark.parametrize("kw", [{"probability": 0.0}, {"probability": 1.0},
                                {"mask_fraction": 0.95, "random_fraction": 0.1}])
def test_bad_masking_config_names_the_field(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="mlm."):
        MaskingConfig(**kw)


# --------------------------------------------------------------------------- statistics


def test_masking_statistics_match_bert(vocab: MlmVocab) -> None:
    masker = Masker(MaskingConfig(), vocab)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 250, (400, 254), generator=g)  # id 0 is EOS: special
    ids = masker.wrap(windows)  # (400, 256) with [CLS] and [SEP]
    inputs, labels = masker(ids, torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor(vocab.special_ids))
    chosen = labels != IGNORE
    assert not (chosen & special).any()  # [CLS], [SEP] and EOS are never chosen
    assert (inputs[special] == ids[special]).all()
    assert (labels[chosen] == ids[chosen]).all()  # labels are the original tokens
    assert (inputs[~chosen] == ids[~chosen]).all()  # nothing else is touched
    rate = chosen.sum() / (~special).sum()
    assert abs(float(rate) - 0.15) < 0.005  # ~100k eligible tokens: std 0.001
    n = int(chosen.sum())
    masked = (inputs == vocab.mask_id) & chosen
    same = (inputs == ids) & chosen
    swapped = chosen & ~masked & ~same
    assert abs(int(masked.sum()) / n - 0.8) < 0.01
    assert abs(int(swapped.sum()) / n - 0.1) < 0.01
    # a random swap can draw the original token (1 in ~250): "unchanged" is 10% + a little
    assert abs(int(same.sum()) / n - 0.1) < 0.01
    assert not torch.isin(inputs[swapped], torch.tensor(vocab.special_ids)).any()


def test_masking_is_deterministic_with_a_seed(vocab: MlmVocab) -> None:
    masker = Masker(MaskingConfig(), vocab)
    ids = masker.wrap(torch.randint(1, 250, (8, 40), generator=torch.Generator().manual_seed(0)))
    a = masker(ids, torch.Generator().manual_seed(5))
    b = masker(ids, torch.Generator().manual_seed(5))
    c = masker(ids, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_every_row_gets_a_label_even_when_short(vocab: MlmVocab) -> None:
    masker = Masker(MaskingConfig(probability=0.01), vocab)
    ids = masker.wrap(torch.randint(1, 250, (200, 3), generator=torch.Generator().manual_seed(0)))
    _, labels = masker(ids, torch.Generator().manual_seed(0))
    per_row = (labels != IGNORE).sum(dim=1)
    assert (per_row >= 1).all()
    assert (labels[:, 0] == IGNORE).all() and (labels[:, -1] == IGNORE).all()


# --------------------------------------------------------------------------- streams


def test_masked_batches_resume_exactly(vocab: MlmVocab) -> None:
    masker = Masker(MaskingConfig(), vocab)
    straight = MaskedBatches(Windows(vocab, 0), masker, seed=1)
    expected = [next(straight) for _ in range(6)]
    first = MaskedBatches(Windows(vocab, 0), masker, seed=1)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    resumed = MaskedBatches(Windows(vocab, 123), masker, seed=999)
    resumed.load_state_dict(state)
    for want in expected[3:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x, y = expected[0]
    assert x.shape == y.shape == (4, 32)
    assert (x[:, 0] == vocab.cls_id).all() and (x[:, -1] == vocab.sep_id).all()


def test_eval_masks_are_the_same_on_every_pass(vocab: MlmVocab) -> None:
    masker = Masker(MaskingConfig(), vocab)
    windows = [(w, w) for w in torch.randint(1, 250, (3, 4, 20)).unbind(0)]
    a = list(masked_eval_batches(windows, masker, seed=0))
    b = list(masked_eval_batches(windows, masker, seed=0))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
