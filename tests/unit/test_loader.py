"""TokenDataset, RandomBatches (determinism, ranks, resume), eval_batches, unigram baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import UserError
from lmforge.data.loader import RandomBatches, TokenDataset, eval_batches, unigram_baseline


def _make_dataset(root: Path, splits: dict[str, list[np.ndarray]], vocab_size: int = 5000) -> Path:
    """A dataset folder written by hand, so the loader is tested independently of prepare."""
    root.mkdir()
    manifest_splits = {}
    for name, arrays in splits.items():
        shards = []
        for i, a in enumerate(arrays):
            f = f"{name}_{i:06d}.bin"
            a.astype("<u2").tofile(root / f)
            shards.append({"file": f, "tokens": len(a)})
        manifest_splits[name] = {
            "shards": shards,
            "tokens": sum(map(len, arrays)),
            "bytes": 3 * sum(map(len, arrays)),
        }
    manifest = {
        "format": "lmforge.tokens",
        "version": 1,
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "eos_id": 0,
        "tokenizer": "tokenizer.json",
        "splits": manifest_splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def arange_ds(tmp_path: Path) -> TokenDataset:
    # Token value == position (+ an offset per shard): any window's contiguity is checkable.
    train = [np.arange(0, 1000), np.arange(2000, 2300)]
    val = [np.arange(3000, 3500)]
    return TokenDataset.open(_make_dataset(tmp_path / "ds", {"train": train, "val": val}))


def test_open_and_split(arange_ds: TokenDataset) -> None:
    assert arange_ds.vocab_size == 5000 and arange_ds.eos_id == 0
    assert arange_ds.tokenizer_path == arange_ds.path / "tokenizer.json"
    train = arange_ds.split("train")
    assert [len(a) for a in train] == [1000, 300] and train[1][5] == 2005
    assert arange_ds.num_tokens("train") == 1300 and arange_ds.bytes_per_token("val") == 3.0
    with pytest.raises(ValueError):
        train[0][0] = 1  # read-only map
    with pytest.raises(UserError, match="no split 'test'"):
        arange_ds.split("test")


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dataset folder not found.*lmforge data prepare"):
        TokenDataset.open(tmp_path / "missing")
    with pytest.raises(UserError, match="not a prepared dataset.*lmforge data prepare"):
        TokenDataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not an lmforge token manifest"):
        TokenDataset.open(tmp_path)
    ds = _make_dataset(tmp_path / "ds", {"train": [np.arange(10)]})
    (ds / "train_000000.bin").write_bytes(b"\0" * 6)  # truncated shard
    with pytest.raises(UserError, match="missing or not 20 bytes"):
        TokenDataset.open(ds).split("train")


def _assert_windows(x: torch.Tensor, y: torch.Tensor, B: int, T: int) -> None:
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    # consecutive values: every window lies inside one shard (the arange data jumps between shards)
    assert torch.all(y == x + 1)


def test_random_batches_shapes_and_determinism(arange_ds: TokenDataset) -> None:
    train = arange_ds.split("train")
    a = RandomBatches(train, batch_size=8, block_size=32, seed=1)
    b = RandomBatches(train, batch_size=8, block_size=32, seed=1)
    c = RandomBatches(train, batch_size=8, block_size=32, seed=2)
    starts = []
    for _ in range(20):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        _assert_windows(xa, ya, 8, 32)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
        starts += xa[:, 0].tolist()
    # both shards are sampled, and no window runs past a shard's end
    assert any(s >= 2000 for s in starts) and any(s < 1000 for s in starts)
    assert all(s <= 1000 - 33 or 2000 <= s <= 2300 - 33 for s in starts)


def test_random_batches_resume(arange_ds: TokenDataset) -> None:
    train = arange_ds.split("train")
    run = RandomBatches(train, batch_size=4, block_size=16, seed=7)
    for _ in range(5):
        next(run)
    state = {k: v.clone() for k, v in run.state_dict().items()}
    expected = [next(run) for _ in range(3)]
    resumed = RandomBatches(train, batch_size=4, block_size=16, seed=999)
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 5
    for (x, y), (ex, ey) in zip((next(resumed) for _ in range(3)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_ranks_draw_disjoint_slices_of_one_global_batch(arange_ds: TokenDataset) -> None:
    train = arange_ds.split("train")
    whole = RandomBatches(train, batch_size=6, block_size=8, seed=3)
    ranks = [RandomBatches(train, 3, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        x, _ = next(whole)
        parts = [next(r)[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)


def test_split_too_short_for_block(arange_ds: TokenDataset) -> None:
    with pytest.raises(
        UserError, match=r"has 500 tokens, fewer than block_size \+ 1 = 501.*lower --block_size"
    ):
        RandomBatches(arange_ds.split("val"), batch_size=2, block_size=500, seed=0)
    with pytest.raises(UserError, match="has 500 tokens"):
        list(eval_batches(arange_ds.split("val"), 2, 500, None))
    RandomBatches(arange_ds.split("val"), batch_size=2, block_size=499, seed=0)  # just fits


def test_eval_batches_sequential_and_repeatable(arange_ds: TokenDataset) -> None:
    train = arange_ds.split("train")
    T = 100
    batches = list(eval_batches(train, batch_size=4, block_size=T, max_tokens=None))
    again = list(eval_batches(train, batch_size=4, block_size=T, max_tokens=None))
    assert all(
        torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(batches, again)
    )
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    _assert_windows(x, y, len(x), T)
    # shard 0: (1000 - 1) // 100 = 9 windows, shard 1: 2 windows; last batch is partial
    assert [len(b[0]) for b in batches] == [4, 4, 3]
    assert x[:, 0].tolist() == [*range(0, 900, 100), 2000, 2100]
    capped = list(eval_batches(train, batch_size=4, block_size=T, max_tokens=550))
    assert sum(len(b[0]) for b in capped) == 5
    assert len(list(eval_batches(train, 4, T, max_tokens=1))) == 1


def test_unigram_baseline_matches_direct_computation() -> None:
    V = 6
    train = [np.array([1, 1, 2, 3, 3, 3], dtype=np.uint16), np.array([5, 1], dtype=np.uint16)]
    val = [np.array([1, 3, 4, 0], dtype=np.uint16)]
    counts = np.bincount(np.concatenate(train), minlength=V)
    p = (counts + 1) / (counts.sum() + V)
    direct = -np.mean(np.log(p[val[0]]))
    assert unigram_baseline(train, val, V) == pytest.approx(direct, rel=1e-12)
    # uniform if train is uninformative: ln V
    flat = [np.arange(V, dtype=np.uint16)]
    assert unigram_baseline(flat, val, V) == pytest.approx(math.log(V))
    with pytest.raises(UserError, match="outside the vocabulary"):
        unigram_baseline([np.array([9], dtype=np.uint16)], val, V)
