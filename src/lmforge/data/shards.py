"""Token shards: encode documents, route each to its split, write raw binary shards.

Layout on disk: ``train_000000.bin``, ``train_000001.bin``, ..., ``val_000000.bin``, ... each a
flat array of little-endian ``uint16`` (vocabularies up to 65,536 ids) or ``uint32`` token ids,
with ``EOS`` after every document. A reader memory-maps them (see ``loader.py``).

Which split a document goes to is decided before it gets here (``split.py``: by a hash of the
document, so no document is on both sides). Each source of a mixture starts new shards, so a
shard holds the tokens of one source only and the loader can weight sources by their shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.tokenizer import encode_batch

SPLITS = ("train", "val")
# manifest.json identifies a prepared dataset by these (written by prepare, checked by loader).
# Version 2: per-document splits, optional "test" split, "sources" with mixture weights.
MANIFEST_FORMAT = "lmforge.tokens"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
T = TypeVar("T")
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


def _batches(docs: Iterable[tuple[T, str]]) -> Iterator[list[tuple[T, str]]]:
    """``docs`` cut into batches of about ``_BATCH_CHARS`` characters or ``_BATCH_DOCS`` documents."""
    batch: list[tuple[T, str]] = []
    chars = 0
    for tag, text in docs:
        batch.append((tag, text))
        chars += len(text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_stream(
    tok: Tokenizer, docs: Iterable[tuple[T, str]]
) -> Iterator[tuple[T, str, list[int]]]:
    """Yield ``(tag, text, ids)`` for each ``(tag, text)``, in order, encoding modest batches.

    One batch is encoded in a worker thread (the Rust side releases the GIL) while this thread
    reads and cleans the next one and the caller writes the previous one's ids, so lmforge's
    own Python overlaps the encoding instead of running between encodings. At most two batches
    are in memory at once.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-encode") as pool:
        pending: tuple[list[tuple[T, str]], Future[list[list[int]]]] | None = None
        try:
            for batch in _batches(docs):
                future = pool.submit(encode_batch, tok, [t for _, t in batch])
                if pending is not None:
                    yield from _zipped(*pending)
                pending = (batch, future)
            if pending is not None:
                yield from _zipped(*pending)
        finally:  # the caller stopped early or failed: drop the batch being encoded
            if pending is not None:
                pending[1].cancel()


def _zipped(
    batch: list[tuple[T, str]], future: Future[list[list[int]]]
) -> Iterator[tuple[T, str, list[int]]]:
    return ((g, t, i) for (g, t), i in zip(batch, future.result(), strict=True))


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
    """Write documents, each to the split it was given, into per-split shard writers.

    ``start_source(name)`` closes the open shards so the next tokens go to new files; the
    manifest then lists every source's shards and token/byte counts per split.
    """

    def __init__(
        self,
        out_dir: Path,
        vocab_size: int,
        eos_id: int,
        shard_tokens: int,
        splits: tuple[str, ...] = SPLITS,
    ) -> None:
        self.dtype = token_dtype(vocab_size)
        self.eos_id = eos_id
        self.splits = splits
        self.writers = {s: ShardWriter(out_dir, s, self.dtype, shard_tokens) for s in splits}
        self.sources: list[dict[str, Any]] = []

    def start_source(self, name: str) -> None:
        """Begin a new source: later tokens go to new shard files counted under ``name``."""
        for w in self.writers.values():
            w.close()  # a ShardWriter keeps going after close(), into its next file
        self.sources.append({
            "name": name,
            "first": {s: len(w.shards) for s, w in self.writers.items()},
            "tokens": dict.fromkeys(self.splits, 0),
            "bytes": dict.fromkeys(self.splits, 0),
        })

    def add(self, split: str, ids: list[int], nbytes: int) -> None:
        """Append one document (its ids, then EOS) that came from ``nbytes`` of UTF-8 text."""
        if not self.sources:
            self.start_source("")
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = self.eos_id
        self.writers[split].write(arr)
        self.sources[-1]["tokens"][split] += arr.size
        self.sources[-1]["bytes"][split] += nbytes

    def close(self) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """Finish every shard; return the splits and the sources.

        Splits: ``{split: {"shards": [...], "tokens": n, "bytes": n}}``. Sources: ``[{"name",
        "shards": {split: [file, ...]}, "tokens": {split: n}, "bytes": {split: n}}]``.
        """
        splits = {}
        for split, writer in self.writers.items():
            shards = writer.close()
            splits[split] = {
                "shards": shards,
                "tokens": sum(s["tokens"] for s in shards),
                "bytes": sum(src["bytes"][split] for src in self.sources),
            }
        sources = []
        for k, src in enumerate(self.sources):
            files = {}
            for split, writer in self.writers.items():
                stop = self.sources[k + 1]["first"][split] if k + 1 < len(self.sources) else None
                files[split] = [s["file"] for s in writer.shards[src["first"][split] : stop]]
            sources.append({"name": src["name"], "shards": files, "tokens": src["tokens"],
                            "bytes": src["bytes"]})
        for split in self.splits:
            assert splits[split]["tokens"] == sum(s["tokens"][split] for s in sources)
        return splits, sources

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
