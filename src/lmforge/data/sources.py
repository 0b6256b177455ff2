"""Document sources: stream raw documents one at a time from files, folders or the HF hub.

Supported inputs:

- ``.txt``: the whole file is one document (decoded with the configured encoding);
- ``.jsonl``: one JSON object per line, the text in ``text_field``; blank lines are ignored;
- ``.parquet``: the ``text_field`` column, read batch by batch so memory stays flat;
- a folder: every supported file below it, recursively, in sorted order (hidden names skipped);
- ``hf:NAME[:split]``: a Hugging Face dataset, streamed (needs ``pip install datasets``).

A malformed row is a :class:`UserError` naming ``file:line``; with ``skip_bad`` it is counted
instead (``Corpus.bad_rows``) and the first few locations are kept for the report.

Slices (``num_shards`` K, ``shard_index`` i) divide the inputs among K independent processes,
each reading only its part: ``.txt`` file number f (in the sorted list of all input files) goes
to slice ``f % K``; a ``.jsonl`` file is cut into K byte ranges at line starts, as Hadoop input
splits are, and slice i reads the lines that start in range i; a ``.parquet`` file's row group
g goes to slice ``(f + g) % K``; an ``hf:`` dataset is divided by ``datasets``' own
``split_dataset_by_node`` (by its files when they divide evenly, else by rows).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.config import UserError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
HF_PREFIX = "hf:"
_MAX_BAD_EXAMPLES = 5
_PARQUET_BATCH_ROWS = 1024


def _expand(spec: str) -> list[str]:
    """One input spec -> the concrete sources it names, checked to exist (no reading yet)."""
    if spec.startswith(HF_PREFIX):
        name = spec[len(HF_PREFIX) :].split(":", 1)[0]
        if not name:
            raise UserError(f"input '{spec}': write a Hugging Face dataset as hf:NAME[:split]")
        return [spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(
                f"input folder {path} has no {'/'.join(SUPPORTED_SUFFIXES)} files; "
                "point --inputs at files of those kinds"
            )
        return [str(p) for p in files]
    if not path.exists():
        raise UserError(f"input not found: {path}; check the path given in --inputs")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise UserError(
            f"input {path}: unsupported file type '{path.suffix}'; "
            f"use {', '.join(SUPPORTED_SUFFIXES)} files or hf:NAME[:split]"
        )
    return [str(path)]


class Corpus:
    """A re-iterable stream of raw documents from a list of input specs.

    Paths are resolved and checked when the corpus is built, so a typo fails before any work.
    Each iteration is a fresh pass (the tokenizer is trained on one pass, shards written on
    the next); ``bad_rows`` and ``bad_examples`` describe the latest pass.
    """

    def __init__(
        self,
        inputs: list[str],
        text_field: str = "text",
        encoding: str = "utf-8",
        skip_bad: bool = False,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> None:
        if not inputs:
            raise UserError("no inputs given; pass --inputs with files, folders or hf:NAME")
        assert 0 <= shard_index < num_shards
        expanded = [(k, s) for k, spec in enumerate(inputs) for s in _expand(spec)]
        self.sources: list[str] = [s for _, s in expanded]
        self.input_of: list[int] = [k for k, _ in expanded]  # which input spec each came from
        self.num_shards, self.shard_index = num_shards, shard_index
        self.text_field = text_field
        self.encoding = encoding
        self.skip_bad = skip_bad
        self.bad_rows = 0
        self.bad_examples: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for _, text in self.documents():
            yield text

    def documents(self) -> Iterator[tuple[int, str]]:
        """``(input index, text)`` for every document of this slice, in a fixed order."""
        self.bad_rows = 0
        self.bad_examples = []
        for f, src in enumerate(self.sources):
            k = self.input_of[f]
            if src.startswith(HF_PREFIX):
                yield from ((k, t) for t in self._hf(src))
                continue
            suffix = Path(src).suffix.lower()
            if suffix == ".txt":
                if f % self.num_shards == self.shard_index:
                    yield from ((k, t) for t in self._txt(Path(src)))
            elif suffix == ".jsonl":
                yield from ((k, t) for t in self._jsonl(Path(src)))
            else:
                assert suffix == ".parquet", src
                yield from ((k, t) for t in self._parquet(Path(src), f))

    def _bad(self, where: str, problem: str, fix: str) -> None:
        """Record a malformed row, or raise if bad rows are not to be skipped."""
        if not self.skip_bad:
            raise UserError(f"{where}: {problem}; {fix}, or pass --skip_bad true to skip such rows")
        self.bad_rows += 1
        if len(self.bad_examples) < _MAX_BAD_EXAMPLES:
            self.bad_examples.append(f"{where}: {problem}")

    def _txt(self, path: Path) -> Iterator[str]:
        data = path.read_bytes()
        try:
            text = data.decode(self.encoding)
        except UnicodeDecodeError as e:
            self._bad(
                f"{path}",
                f"not valid {self.encoding} at byte offset {e.start}",
                "if the file is Latin-1 text pass --encoding latin-1",
            )
            return
        yield text

    def _lines(self, path: Path) -> Iterator[tuple[str, bytes]]:
        """``(where, line)`` for the lines of this slice: all of them unless sliced."""
        with path.open("rb") as f:
            if self.num_shards == 1:
                for lineno, raw in enumerate(f, start=1):
                    yield f"{path}:{lineno}", raw
                return
            size = path.stat().st_size
            start = size * self.shard_index // self.num_shards
            end = size * (self.shard_index + 1) // self.num_shards
            if start > 0:
                f.seek(start - 1)
                f.readline()  # the line that starts before `start` belongs to the slice before
            pos = f.tell()
            while pos < end:
                raw = f.readline()
                if not raw:
                    break
                yield f"{path}: the line at byte {pos}", raw
                pos += len(raw)

    def _jsonl(self, path: Path) -> Iterator[str]:
        field = self.text_field
        for where, raw in self._lines(path):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                self._bad(where, f"not a valid JSON line ({msg})", "fix or remove the line")
                continue
            if not isinstance(row, dict) or field not in row:
                self._bad(
                    where,
                    f"no '{field}' field",
                    "give each line that field or set --text_field to the right key",
                )
                continue
            text = row[field]
            if not isinstance(text, str):
                self._bad(
                    where,
                    f"field '{field}' is {type(text).__name__}, not a string",
                    "make it a string",
                )
                continue
            yield text

    def _parquet(self, path: Path, file_index: int = 0) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        columns = pf.schema_arrow.names
        if self.text_field not in columns:
            raise UserError(
                f"{path}: no column '{self.text_field}' (columns: {', '.join(columns)}); "
                "set --text_field to the text column"
            )
        for g in range(pf.num_row_groups):
            if (file_index + g) % self.num_shards == self.shard_index:
                yield from self._row_group(path, pf, g)

    def _row_group(self, path: Path, pf: Any, g: int) -> Iterator[str]:
        row = sum(pf.metadata.row_group(k).num_rows for k in range(g))
        batches = pf.iter_batches(
            batch_size=_PARQUET_BATCH_ROWS, row_groups=[g], columns=[self.text_field]
        )
        for batch in batches:
            for value in batch.column(0).to_pylist():
                row += 1
                if isinstance(value, str):
                    yield value
                else:
                    self._bad(
                        f"{path}: row {row}",
                        f"column '{self.text_field}' is {type(value).__name__}, not a string",
                        "fix the row",
                    )

    def _hf(self, spec: str) -> Iterator[str]:
        name, _, split = spec[len(HF_PREFIX) :].partition(":")
        split = split or "train"
        rows = _hf_rows(name, split, self.num_shards, self.shard_index)
        for i, row in enumerate(rows, start=1):
            text = row.get(self.text_field) if isinstance(row, dict) else None
            if isinstance(text, str):
                yield text
            else:
                self._bad(
                    f"{spec}: row {i}",
                    f"no string field '{self.text_field}'",
                    "set --text_field to the text column",
                )


def _hf_rows(name: str, split: str, num_shards: int = 1, shard_index: int = 0) -> Iterator[dict]:
    """Stream the rows of a Hugging Face dataset; the only place that imports ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"input hf:{name} needs the 'datasets' package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # network, unknown name, unknown split: all a user-side problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"input hf:{name}:{split}: could not load it ({first}); "
            "check the dataset name, the split and your network"
        ) from None
    if num_shards > 1:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=shard_index, world_size=num_shards)
    yield from ds
