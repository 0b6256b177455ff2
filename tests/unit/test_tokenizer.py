"""Byte-level BPE: training on real text, exact round trips, loading errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from lmforge.config import UserError
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.tokenizer import (
    EOS_TOKEN,
    encode_batch,
    eos_id,
    load_tokenizer,
    train_bpe,
    vocab_size_of,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # A generator, as prepare() passes one: training must not need a list.
    return train_bpe((t for t in pydoc_topics_text().values()), vocab_size=1000)


def test_vocab_and_eos(tok: Tokenizer) -> None:
    assert vocab_size_of(tok) == 1000
    assert eos_id(tok) == 0 and tok.id_to_token(0) == EOS_TOKEN
    # merges were learned from the corpus: common words (with their leading space) are one token
    assert len(tok.encode(" the").ids) == 1
    assert len(tok.encode(" return").ids) == 1


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x ** 2  # square\n",
        "Hello world",
        " leading space and trailing  ",
        "naïve café, Straße, 日本語のテキスト, Ελληνικά",
        "emoji 🎉🧑‍🚀 and \u200b zero width",
        "\t\n\r\n",
    ],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert encode_batch(tok, [text, text]) == [ids, ids]


def test_unseen_bytes_still_encode(tok: Tokenizer) -> None:
    # Byte-level: no unknown token, even for scripts absent from the training text.
    text = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ"
    assert tok.decode(tok.encode(text).ids) == text


def test_small_corpus_gives_smaller_vocab() -> None:
    tok = train_bpe(iter(["abc abc abc"]), vocab_size=5000)
    assert 257 < vocab_size_of(tok) < 300


def test_load_tokenizer(tmp_path: Path, tok: Tokenizer) -> None:
    good = tmp_path / "tokenizer.json"
    good.write_text(tok.to_str())
    assert load_tokenizer(good).encode("hello").ids == tok.encode("hello").ids
    with pytest.raises(UserError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match=r"bad\.json: not a valid tokenizer\.json"):
        load_tokenizer(bad)


def test_tokenizer_without_eos_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"has no '<\|endoftext\|>' token"):
        eos_id(Tokenizer(models.BPE()), "x.json")
