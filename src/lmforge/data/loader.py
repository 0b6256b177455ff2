"""Read a prepared token dataset: memory-mapped shards, random training batches, eval batches.

A dataset folder is what ``lmforge data prepare`` writes: ``manifest.json`` plus raw
little-endian token shards (see ``shards.py``). Nothing is read into memory up front; the OS
pages in the windows that batches touch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.config import UserError
from lmforge.data.shards import MANIFEST_FORMAT, READABLE_VERSIONS

_NOT_PREPARED = "run `lmforge data prepare --out {path}` to create it"
_BINCOUNT_CHUNK = 1 << 24  # tokens per np.bincount call: 16M int64 temporaries at most


class TokenDataset:
    """A prepared dataset folder: its manifest, tokenizer path and memory-mapped splits."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.vocab_size: int = int(manifest["vocab_size"])
        self.eos_id: int = int(manifest["eos_id"])
        self.tokenizer_path: Path = path / manifest["tokenizer"]
        self._dtype = np.dtype(manifest["dtype"]).newbyteorder("<")

    @classmethod
    def open(cls, path: str | Path) -> TokenDataset:
        """Open a dataset folder; UserError if it is missing or not a prepared dataset."""
        p = Path(path).expanduser()
        mpath = p / "manifest.json"
        if not p.is_dir():
            raise UserError(f"dataset folder not found: {p}; " + _NOT_PREPARED.format(path=p))
        if not mpath.is_file():
            raise UserError(
                f"{p} is not a prepared dataset (no manifest.json); " + _NOT_PREPARED.format(path=p)
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(
                f"{mpath}: not valid JSON ({e}); " + _NOT_PREPARED.format(path=p)
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise UserError(
                f"{mpath}: not an lmforge token manifest; " + _NOT_PREPARED.format(path=p)
            )
        if manifest.get("version") not in READABLE_VERSIONS:
            raise UserError(
                f"{mpath}: manifest version {manifest.get('version')} is not supported by this "
                "lmforge; upgrade lmforge or prepare the data again"
            )
        return cls(p, manifest)

    def split(self, name: str) -> list[np.ndarray]:
        """The read-only memory-mapped shards of split ``name`` (e.g. "train", "val")."""
        splits = self.manifest["splits"]
        if name not in splits:
            raise UserError(f"{self.path}: no split '{name}' (has: {', '.join(splits)})")
        arrays = []
        for shard in splits[name]["shards"]:
            f = self.path / shard["file"]
            expected = int(shard["tokens"]) * self._dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                raise UserError(
                    f"{f}: missing or not {expected} bytes as manifest.json says; the dataset is "
                    "incomplete: prepare it again with --overwrite true"
                )
            arrays.append(np.memmap(f, dtype=self._dtype, mode="r"))
        return arrays

    def mixture(self, name: str) -> tuple[list[int], list[float]] | None:
        """For a weighted mixture: the source of each shard of split ``name`` and the weights.

        None when the dataset has no weights (every token equally likely).
        """
        sources = self.manifest.get("sources") or []
        if not sources or any(s.get("weight") is None for s in sources):
            return None
        owner = {f: k for k, s in enumerate(sources) for f in s["shards"].get(name, [])}
        shards = self.manifest["splits"][name]["shards"]
        return [owner[s["file"]] for s in shards], [float(s["weight"]) for s in sources]

    def random_batches(
        self, name: str, batch_size: int, block_size: int, seed: int, rank: int = 0,
        world_size: int = 1,
    ) -> RandomBatches:
        """Training batches from split ``name``, drawn by the mixture weights if it has them."""
        mix = self.mixture(name)
        return RandomBatches(self.split(name), batch_size, block_size, seed, rank, world_size,
                             sources=mix[0] if mix else None, weights=mix[1] if mix else None)

    def num_tokens(self, name: str) -> int:
        """Total tokens of split ``name``."""
        return int(self.manifest["splits"][name]["tokens"])

    def bytes_per_token(self, name: str) -> float:
        """UTF-8 bytes of source text per token in split ``name`` (for bits per byte)."""
        s = self.manifest["splits"][name]
        return float(s["bytes"]) / max(int(s["tokens"]), 1)


def _too_short(total: int, block_size: int) -> UserError:
    return UserError(
        f"the split has {total:,} tokens, fewer than block_size + 1 = {block_size + 1:,}; "
        "lower --block_size or add data"
    )


class RandomBatches:
    """Endless ``(x, y)`` batches of random windows, reproducible and resumable.

    Every rank draws the same global batch of ``batch_size * world_size`` windows from its own
    ``torch.Generator`` and keeps its slice, so ranks never overlap and need no communication.
    A window start is uniform over all valid starts of all shards, i.e. a shard is picked in
    proportion to its usable length. With a mixture (``sources[i]`` = the source of shard i,
    ``weights`` per source) each window first draws its source with probability ``weight``
    (from the same generator), then a start uniform within that source's shards: the blended
    sampling of Megatron-LM's and OLMo's data mixtures, at the level of windows.
    """

    def __init__(
        self,
        arrays: list[np.ndarray],
        batch_size: int,
        block_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        sources: list[int] | None = None,
        weights: list[float] | None = None,
    ) -> None:
        assert batch_size > 0 and block_size > 0 and 0 <= rank < world_size
        sources = sources if sources is not None else [0] * len(arrays)
        assert len(sources) == len(arrays)
        keep = [i for i, a in enumerate(arrays) if len(a) > block_size]
        self.arrays = [arrays[i] for i in keep]
        if not self.arrays:
            raise _too_short(sum(len(a) for a in arrays), block_size)
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        # Shards sorted by source, so each source's start range is one contiguous span.
        order = sorted(range(len(keep)), key=lambda j: sources[keep[j]])
        self.arrays = [self.arrays[j] for j in order]
        owner = [sources[keep[j]] for j in order]
        starts = torch.tensor([len(a) - block_size for a in self.arrays], dtype=torch.int64)
        self._ends = torch.cumsum(starts, 0)  # exclusive end of each shard's start range
        self._mix = _source_spans(owner, self._ends, weights) if weights else None
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        n_global = self.batch_size * self.world_size
        if self._mix is None:
            flat = torch.randint(int(self._ends[-1]), (n_global,), generator=self.generator)
        else:
            cum, lo, size = self._mix
            src = torch.searchsorted(cum, torch.rand(n_global, generator=self.generator),
                                     right=True).clamp_(max=len(cum) - 1)
            u = torch.rand(n_global, generator=self.generator, dtype=torch.float64)
            flat = lo[src] + (u * size[src]).long()
        mine = flat[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        shard = torch.searchsorted(self._ends, mine, right=True)
        offset = mine - torch.where(shard > 0, self._ends[shard - 1], 0)
        T = self.block_size
        rows = [
            np.asarray(self.arrays[s][o : o + T + 1], dtype=np.int64)
            for s, o in zip(shard.tolist(), offset.tolist())
        ]
        w = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        self.batches_drawn += 1
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)

    def state_dict(self) -> dict[str, Tensor]:
        """The position in the batch stream (RNG state and count), for checkpoints."""
        return {
            "rng_state": self.generator.get_state(),
            "batches_drawn": torch.tensor(self.batches_drawn, dtype=torch.int64),
        }

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """Continue exactly where the saved stream stopped."""
        self.generator.set_state(d["rng_state"])
        self.batches_drawn = int(d["batches_drawn"])


def _source_spans(
    owner: list[int], ends: Tensor, weights: list[float]
) -> tuple[Tensor, Tensor, Tensor]:
    """Cumulative source probabilities and each source's [lo, lo + size) span of starts.

    A source with no shard long enough for a window cannot be drawn: its weight goes to the
    others in proportion (the loader cannot make tokens that are not there).
    """
    n = len(weights)
    lo, size = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    for k in range(n):
        idx = [i for i, o in enumerate(owner) if o == k]
        if idx:
            lo[k] = ends[idx[0] - 1] if idx[0] > 0 else 0
            size[k] = ends[idx[-1]] - lo[k]
    w = torch.tensor(weights, dtype=torch.float64) * (size > 0)
    cum = torch.cumsum(w / w.sum(), 0).to(torch.float32)
    return cum, lo, size


def eval_batches(
    arrays: list[np.ndarray], batch_size: int, block_size: int, max_tokens: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Sequential non-overlapping windows over a split: the same batches on every call.

    Windows never cross a shard boundary; ``max_tokens`` (if set) caps the predicted tokens at
    whole windows (at least one). The last batch may be smaller than ``batch_size``.
    """
    T = block_size
    total = sum(len(a) for a in arrays)
    n_windows = sum((len(a) - 1) // T for a in arrays)
    if n_windows == 0:
        raise _too_short(total, block_size)
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // T))
    starts = ((i, k * T) for i, a in enumerate(arrays) for k in range((len(a) - 1) // T))
    for first in range(0, n_windows, batch_size):
        chunk = [next(starts) for _ in range(min(batch_size, n_windows - first))]
        w = torch.from_numpy(
            np.stack([np.asarray(arrays[i][o : o + T + 1], dtype=np.int64) for i, o in chunk])
        )  # (B, T + 1)
        yield w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _token_counts(arrays: list[np.ndarray], vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for a in arrays:
        for i in range(0, len(a), _BINCOUNT_CHUNK):
            c = np.bincount(a[i : i + _BINCOUNT_CHUNK], minlength=vocab_size)
            if c.size > vocab_size:
                raise UserError(f"token id {c.size - 1} is outside the vocabulary of {vocab_size}")
            counts += c
    return counts


def unigram_baseline(train: list[np.ndarray], val: list[np.ndarray], vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``val`` under the add-one unigram model of ``train``.

    A model that has not beaten this has learned nothing beyond token frequencies.
    """
    p_counts = _token_counts(train, vocab_size)
    q_counts = _token_counts(val, vocab_size)
    n_val = int(q_counts.sum())
    assert n_val > 0, "empty val split"
    log_p = np.log(p_counts + 1.0) - math.log(int(p_counts.sum()) + vocab_size)
    return float(-(q_counts * log_p).sum() / n_val)
