"""Token shards: encode documents into one token stream, split it, write raw binary shards.

Layout on disk: ``train_000000.bin``, ``train_000001.bin``, ..., ``val_000000.bin``, ... each a
flat array of little-endian ``uint16`` (vocabularies up to 65,536 ids) or ``uint32`` token ids,
with ``EOS`` after every document. A reader memory-maps them (see ``loader.py``).

Train/val split: the stream is cut into fixed chunks of ``chunk_tokens`` and chunk ``i`` goes
to val when ``i % k == k // 2`` with ``k = round(1 / val_fraction)``. This is deterministic,
independent of how the corpus is divided into files, and spreads val over the whole corpus
(a plain "last 5%" would make val one late play or one late source).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.tokenizer import encode_batch

SPLITS = ("train", "val")
# manifest.json identifies a prepared dataset by these (written by prepare, checked by loader).
MANIFEST_FORMAT = "lmforge.tokens"
MANIFEST_VERSION = 1
# Enough work per encode_batch call for the Rust side to parallelize, small enough that the
# batch (texts + ids) stays a few tens of MB whatever the corpus size.
_BATCH_CHARS = 1 << 20
_BATCH_DOCS = 256
_WRITE_BUFFER_TOKENS = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds ids ``0 .. vocab_size - 1``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    """'uint16' / 'uint32': the name written to the manifest."""
    return np.dtype(dtype).name


def encode_stream(tok: Tokenizer, docs: Iterable[str]) -> Iterator[tuple[str, list[int]]]:
    """Yield ``(text, ids)`` for each document, encoding modest batches at a time."""
    batch: list[str] = []
    chars = 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield from zip(batch, encode_batch(tok, batch))
            batch, chars = [], 0
    if batch:
        yield from zip(batch, encode_batch(tok, batch))


class ShardWriter:
    """Append tokens to ``{prefix}_{index:06d}.bin`` files, rolling over every ``shard_tokens``.

    Writes go through a fixed-size buffer, so memory does not grow with the corpus. Files are
    opened only when they receive tokens: there are no empty shards.
    """

    def __init__(self, out_dir: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        assert shard_tokens > 0
        self.out_dir = out_dir
        self.prefix = prefix
        self.shard_tokens = shard_tokens
        self.buf = np.empty(min(_WRITE_BUFFER_TOKENS, shard_tokens), dtype=dtype)
        self.fill = 0
        self.in_shard = 0  # tokens of the current shard, written or buffered
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None

    def write(self, arr: np.ndarray) -> None:
        """Append a 1-D array of token ids."""
        off = 0
        while off < arr.size:
            take = min(arr.size - off, self.buf.size - self.fill, self.shard_tokens - self.in_shard)
            self.buf[self.fill : self.fill + take] = arr[off : off + take]
            self.fill += take
            self.in_shard += take
            off += take
            if self.fill == self.buf.size or self.in_shard == self.shard_tokens:
                self._flush()
            if self.in_shard == self.shard_tokens:
                self._roll()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        if self._file is None:
            name = f"{self.prefix}_{len(self.shards):06d}.bin"
            self._file = open(self.out_dir / name, "wb")  # noqa: SIM115 (held across calls)
        self._file.write(self.buf[: self.fill].tobytes())
        self.fill = 0

    def _roll(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            name = f"{self.prefix}_{len(self.shards):06d}.bin"
            self.shards.append({"file": name, "tokens": self.in_shard})
        self.in_shard = 0

    def close(self) -> list[dict[str, Any]]:
        """Flush and close; return ``[{"file", "tokens"}, ...]`` for every shard written."""
        self._flush()
        self._roll()
        return self.shards

    def abort(self) -> None:
        """Close the open file without recording it (the caller discards the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class DatasetWriter:
    """Route a stream of documents' tokens into train/val shard writers (see module doc).

    UTF-8 bytes are attributed to a split in proportion to the tokens of each document that
    land there: exact in total, approximate at the chunk boundaries that cut a document.
    """

    def __init__(
        self,
        out_dir: Path,
        vocab_size: int,
        eos_id: int,
        shard_tokens: int,
        chunk_tokens: int,
        val_fraction: float,
    ) -> None:
        assert 0 < val_fraction <= 0.5 and chunk_tokens > 0
        self.dtype = token_dtype(vocab_size)
        self.eos_id = eos_id
        self.chunk_tokens = chunk_tokens
        self.val_every = round(1 / val_fraction)
        self.writers = {s: ShardWriter(out_dir, s, self.dtype, shard_tokens) for s in SPLITS}
        self.bytes = dict.fromkeys(SPLITS, 0.0)
        self.pos = 0  # tokens in the stream so far

    def split_of_chunk(self, index: int) -> str:
        """Which split chunk ``index`` of the stream belongs to."""
        return "val" if index % self.val_every == self.val_every // 2 else "train"

    def add(self, ids: list[int], nbytes: int) -> None:
        """Append one document (its ids, then EOS) that came from ``nbytes`` of UTF-8 text."""
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = self.eos_id
        off = 0
        while off < arr.size:
            take = min(self.chunk_tokens - self.pos % self.chunk_tokens, arr.size - off)
            split = self.split_of_chunk(self.pos // self.chunk_tokens)
            self.writers[split].write(arr[off : off + take])
            self.bytes[split] += nbytes * take / arr.size
            off += take
            self.pos += take

    def close(self) -> dict[str, dict[str, Any]]:
        """Finish every shard; per split ``{"shards": [...], "tokens": n, "bytes": n}``."""
        out = {}
        for split, writer in self.writers.items():
            shards = writer.close()
            out[split] = {
                "shards": shards,
                "tokens": sum(s["tokens"] for s in shards),
                "bytes": round(self.bytes[split]),
            }
        assert sum(v["tokens"] for v in out.values()) == self.pos
        return out

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            for writer in self.writers.values():
                writer.abort()
