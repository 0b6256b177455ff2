"""Synthetic translation tasks: word sequences and a rule that maps them to their target.

Small, exactly checkable seq2seq problems for testing an encoder-decoder end to end: a model
that learned the rule gets every held-out pair exactly right, so greedy exact match measures
it directly. Tasks: ``reverse`` (the words backwards), ``sort`` (alphabetical order) and
``copy``. Words are made-up two-syllable words ("bako", "tiru", ...) so every word is one
token of a word-level tokenizer that is written alongside the pairs.

Validation pairs are drawn first and training pairs never repeat a validation source, so the
val exact match is on sequences the model has never seen.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.config import ConfigError, UserError, to_dict
from lmforge.data.pairs import (
    BOS_TOKEN,
    PAD_TOKEN,
    TOKENIZER_FILE,
    TRAIN_FILE,
    VAL_FILE,
    Pair,
)
from lmforge.data.tokenizer import EOS_TOKEN
from lmforge.utils.io import atomic_dir, atomic_write_json, atomic_write_text

Task = Literal["reverse", "sort", "copy"]
UNK_TOKEN = "[UNK]"
WORD_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, BOS_TOKEN, UNK_TOKEN)
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass
class SynthConfig:
    """Options of ``lmforge data synth``."""

    task: Task = "reverse"
    """The rule from source to target: reverse, sort (alphabetically) or copy the words."""
    out: str = "data/reverse"
    """Output folder: train.jsonl, val.jsonl, tokenizer.json (word-level) and synth.json."""
    n_train: int = 50_000
    """Number of training pairs."""
    n_val: int = 500
    """Number of held-out validation pairs (sources never seen in training)."""
    min_len: int = 3
    """Fewest words in a source sequence."""
    max_len: int = 10
    """Most words in a source sequence."""
    n_words: int = 50
    """Size of the word vocabulary the sequences draw from (at most 4900)."""
    seed: int = 0
    """Seed of the word list and the sequences: the same seed writes the same files."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        if self.task not in ("reverse", "sort", "copy"):
            raise ConfigError(f"task: must be one of reverse, sort, copy; got {self.task!r}")
        for name in ("n_train", "n_val", "min_len", "n_words"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.max_len < self.min_len:
            raise ConfigError(f"max_len: {self.max_len} is below min_len {self.min_len}")
        limit = len(_CONSONANTS) ** 2 * len(_VOWELS) ** 2
        if self.n_words > limit:
            raise ConfigError(f"n_words: at most {limit}, got {self.n_words}")
        if not self.out.strip():
            raise ConfigError("out: must be a folder path")


def make_words(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct made-up consonant-vowel-consonant-vowel words."""
    syllables = [c + v for c, v in itertools.product(_CONSONANTS, _VOWELS)]
    words = [a + b for a, b in itertools.product(syllables, syllables)]
    return sorted(rng.sample(words, n))


def apply_task(task: Task, words: list[str]) -> list[str]:
    """The target word sequence for source ``words``."""
    if task == "reverse":
        return words[::-1]
    if task == "sort":
        return sorted(words)
    return list(words)


def make_pairs(cfg: SynthConfig, vocab: list[str], n: int, rng: random.Random,
               exclude: set[str]) -> list[Pair]:
    """``n`` pairs with distinct sources not in ``exclude`` (which gains them)."""
    pairs: list[Pair] = []
    tries = 0
    while len(pairs) < n:
        tries += 1
        if tries > 20 * n + 1000:
            raise UserError(f"could not draw {n} distinct sequences; raise --n_words or "
                            "--max_len, or lower --n_train / --n_val")
        words = [rng.choice(vocab) for _ in range(rng.randint(cfg.min_len, cfg.max_len))]
        source = " ".join(words)
        if source in exclude:
            continue
        exclude.add(source)
        pairs.append(Pair(source, " ".join(apply_task(cfg.task, words))))
    return pairs


def word_tokenizer(vocab: list[str]) -> Tokenizer:
    """A word-level tokenizer: whitespace-split words, the special tokens first (EOS = id 0)."""
    table = {t: i for i, t in enumerate([*WORD_SPECIAL_TOKENS, *vocab])}
    tok = Tokenizer(models.WordLevel(table, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(WORD_SPECIAL_TOKENS))  # never split, skipped when decoding
    return tok


def _jsonl(pairs: list[Pair]) -> str:
    return "".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in pairs)


def write_synthetic(cfg: SynthConfig) -> Path:
    """Write the pairs folder ``cfg.out``; it appears only once complete."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite:
        raise UserError(f"output folder {out} already exists; pass --overwrite true to "
                        "replace it or choose another --out")
    rng = random.Random(cfg.seed)
    vocab = make_words(cfg.n_words, rng)
    seen: set[str] = set()
    val = make_pairs(cfg, vocab, cfg.n_val, rng, seen)
    train = make_pairs(cfg, vocab, cfg.n_train, rng, seen)  # never a val source
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        atomic_write_text(tmp / TRAIN_FILE, _jsonl(train))
        atomic_write_text(tmp / VAL_FILE, _jsonl(val))
        atomic_write_text(tmp / TOKENIZER_FILE, word_tokenizer(vocab).to_str())
        atomic_write_json(tmp / "synth.json", {"config": to_dict(cfg), "words": vocab})
    return out
