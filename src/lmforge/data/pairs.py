"""Source -> target pairs for encoder-decoder training: read JSONL, tokenize, pad into batches.

A pairs folder (what ``lmforge data synth`` writes, or one you make) holds::

    train.jsonl      one {"source": "...", "target": "..."} object per line (blank lines skipped)
    val.jsonl        the same, held out
    tokenizer.json   one tokenizer for both sides

Teacher forcing (Vaswani et al. 2017): the source is ``ids + [EOS]``; the decoder reads
``[BOS] + target`` and learns to emit ``target + [EOS]``. Sequences are padded on the right
with [PAD] to the longest of their batch; a padded source position is masked out of attention
by ``src_mask`` and a padded label is -100, so padding never carries loss. Decoder padding
needs no mask: it sits after every real target token, and causal attention never looks ahead.

Pairs are held in memory as token-id lists: fine up to a few million short pairs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lmforge.config import UserError
from lmforge.data.tokenizer import EOS_TOKEN, encode_batch

PAD_TOKEN, BOS_TOKEN = "[PAD]", "[BOS]"
SEQ2SEQ_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, BOS_TOKEN)
TRAIN_FILE, VAL_FILE, TOKENIZER_FILE = "train.jsonl", "val.jsonl", "tokenizer.json"
IGNORE = -100

Ids = list[int]
# x = (source ids (B, S), decoder input ids (B, T), source mask (B, S)); y = labels (B, T).
PairBatch = tuple[tuple[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Pair:
    """One training example: a source text and the target text it maps to."""

    source: str
    target: str


@dataclass(frozen=True)
class PairIds:
    """The special ids teacher forcing needs."""

    pad: int
    bos: int
    eos: int


def pairs_folder(path: str | Path) -> tuple[Path, Path, Path]:
    """(train.jsonl, val.jsonl, tokenizer.json) of a pairs folder; UserError naming what is missing."""
    p = Path(path).expanduser()
    make = "make one with `lmforge data synth --out DIR` or give a folder with those files"
    if not p.is_dir():
        raise UserError(f"pairs folder not found: {p}; {make}")
    files = (p / TRAIN_FILE, p / VAL_FILE, p / TOKENIZER_FILE)
    for f in files:
        if not f.is_file():
            raise UserError(f"{p}: has no {f.name}; a pairs folder holds {TRAIN_FILE}, "
                            f"{VAL_FILE} and {TOKENIZER_FILE}; {make}")
    return files


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a JSONL file; a malformed line is a UserError naming ``file:line``."""
    p = Path(path)
    pairs = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise UserError(f"{where}: not a valid JSON line ({msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected an object {{\"source\": ..., \"target\": ...}}")
            for key in ("source", "target"):
                if not isinstance(row.get(key), str):
                    got = "missing" if key not in row else f"a {type(row[key]).__name__}"
                    raise UserError(f"{where}: field '{key}' is {got}, not a string; give each "
                                    "line string 'source' and 'target' fields")
            pairs.append(Pair(row["source"], row["target"]))
    if not pairs:
        raise UserError(f"{p}: has no pairs; add lines like {{\"source\": \"a b\", \"target\": \"b a\"}}")
    return pairs


def encode_pairs(tok: Tokenizer, pairs: list[Pair], ids: PairIds,
                 max_len: int) -> tuple[list[tuple[Ids, Ids]], int]:
    """Token ids ``(source + [EOS], target)`` of each pair, and how many were dropped.

    A pair is dropped when its source + EOS or its target + EOS exceeds ``max_len`` (the
    model's block_size): truncating would teach the model to stop mid-sentence.
    """
    sources = encode_batch(tok, [p.source for p in pairs])
    targets = encode_batch(tok, [p.target for p in pairs])
    kept = [([*s, ids.eos], t) for s, t in zip(sources, targets)
            if len(s) + 1 <= max_len and len(t) + 1 <= max_len]
    return kept, len(pairs) - len(kept)


def collate(items: list[tuple[Ids, Ids]], ids: PairIds) -> PairBatch:
    """Pad a list of (source, target) ids into ``((src, tgt_in, src_mask), labels)``."""
    B = len(items)
    S = max(len(s) for s, _ in items)
    T = max(len(t) for _, t in items) + 1
    src = torch.full((B, S), ids.pad, dtype=torch.long)
    tgt_in = torch.full((B, T), ids.pad, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    src_mask = torch.zeros((B, S), dtype=torch.bool)
    for i, (s, t) in enumerate(items):
        src[i, : len(s)] = torch.tensor(s)
        src_mask[i, : len(s)] = True
        tgt_in[i, : len(t) + 1] = torch.tensor([ids.bos, *t])  # [BOS] target
        labels[i, : len(t) + 1] = torch.tensor([*t, ids.eos])  # target [EOS]
    return (src, tgt_in, src_mask), labels


class PairBatches:
    """Endless shuffled batches of pairs, epoch by epoch, reproducible and resumable.

    Each epoch is a permutation drawn from ``generator``; the state is the generator as it was
    before that draw plus the position in it, so a resumed stream redraws the same permutation.
    """

    def __init__(self, items: list[tuple[Ids, Ids]], batch_size: int, ids: PairIds,
                 seed: int) -> None:
        if len(items) < batch_size:
            raise UserError(f"only {len(items)} training pairs, fewer than one batch of "
                            f"{batch_size}; lower --train.batch_size or add pairs")
        self.items, self.batch_size, self.ids = items, batch_size, ids
        self.generator = torch.Generator().manual_seed(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch_rng = self.generator.get_state()
        self._order = torch.randperm(len(self.items), generator=self.generator).tolist()
        self.pos = 0

    def __iter__(self) -> Iterator[PairBatch]:
        return self

    def __next__(self) -> PairBatch:
        if self.pos + self.batch_size > len(self._order):
            self._new_epoch()  # drop the ragged tail: every batch has batch_size pairs
        chosen = self._order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return collate([self.items[i] for i in chosen], self.ids)

    def state_dict(self) -> dict[str, Tensor]:
        """RNG state at the start of this epoch and the position in it, for checkpoints."""
        return {"epoch_rng_state": self._epoch_rng, "pos": torch.tensor(self.pos)}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """Continue exactly where the saved stream stopped."""
        self.generator.set_state(d["epoch_rng_state"])
        self._new_epoch()
        self.pos = int(d["pos"])


def pair_eval_batches(items: list[tuple[Ids, Ids]], batch_size: int,
                      ids: PairIds) -> Iterator[PairBatch]:
    """The pairs in order, in batches (the last may be smaller): the same batches every call."""
    for i in range(0, len(items), batch_size):
        yield collate(items[i : i + batch_size], ids)
