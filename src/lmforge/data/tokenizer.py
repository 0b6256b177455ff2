"""Byte-level BPE tokenizers (the ``tokenizers`` library): train one, or load a tokenizer.json.

Byte-level means every string round-trips exactly (``decode(encode(s)) == s``): the 256 byte
symbols are always in the vocabulary, so there is no unknown token and no normalizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.config import UserError

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)
# The smallest useful vocabulary: the 256 byte symbols plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def new_bpe() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (GPT-2 style pre-tokenization, no prefix space)."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a document's first word is not silently changed to " word".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on a stream of texts (consumed once, never held in memory).

    The result may be smaller than ``vocab_size`` when the corpus has fewer useful merges.
    ``EOS_TOKEN`` gets id 0.
    """
    assert vocab_size >= MIN_VOCAB_SIZE, vocab_size
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # the caller draws its own rich progress
    )
    tok.train_from_iterator(iter(texts), trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``, with a one-line UserError if it is missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"tokenizer file not found: {p}; pass the path of a tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON or schema
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: not a valid tokenizer.json ({first})") from None


def eos_id(tok: Tokenizer, where: str = "tokenizer") -> int:
    """The id of ``EOS_TOKEN`` in ``tok``; UserError naming ``where`` if it has none."""
    i = tok.token_to_id(EOS_TOKEN)
    if i is None:
        raise UserError(
            f"{where}: has no '{EOS_TOKEN}' token, which separates documents; "
            "use a tokenizer that has it, or leave --tokenizer empty to train one"
        )
    return i


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of several texts at once (parallel in Rust); no special tokens are added."""
    # encode_batch_fast skips computing character offsets (about 30% faster); tokenizers>=0.20.
    fn = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in fn(texts, add_special_tokens=False)]


def vocab_size_of(tok: Tokenizer) -> int:
    """One more than the largest id (added tokens included): the embedding rows a model needs."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def with_special_tokens(tok: Tokenizer, names: Iterable[str]) -> tuple[Tokenizer, dict[str, int]]:
    """A copy of ``tok`` that has every special token in ``names``, and their ids.

    Tokens it already has keep their ids; missing ones are appended after the largest id, so
    the ids of every existing token (and so any prepared token shards) stay valid: a model
    just needs ``vocab_size_of`` the returned tokenizer rows. ``tok`` itself is not changed.
    """
    out = Tokenizer.from_str(tok.to_str())
    missing = [n for n in names if out.token_to_id(n) is None]
    if missing:
        out.add_special_tokens(missing)
    return out, {n: out.token_to_id(n) for n in names}


def special_token_ids(tok: Tokenizer) -> list[int]:
    """Ids of every special token of ``tok`` (EOS, [CLS], [MASK], ...), sorted."""
    return sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
