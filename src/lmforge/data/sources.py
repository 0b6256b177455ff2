"""Document sources: stream raw documents one at a time from files, folders or the HF hub.

Supported inputs:

- ``.txt``: the whole file is one document (decoded with the configured encoding);
- ``.jsonl``: one JSON object per line, the text in ``text_field``; blank lines are ignored;
- ``.parquet``: the ``text_field`` column, read batch by batch so memory stays flat;
- a folder: every supported file below it, recursively, in sorted order (hidden names skipped);
- ``hf:NAME[:split]``: a Hugging Face dataset, streamed (needs ``pip install datasets``).

A malformed row is a :class:`UserError` naming ``file:line``; with ``skip_bad`` it is counted
instead (``Corpus.bad_rows``) and the first few locations are kept for the report.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

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
    ) -> None:
        if not inputs:
            raise UserError("no inputs given; pass --inputs with files, folders or hf:NAME")
        self.sources: list[str] = [s for spec in inputs for s in _expand(spec)]
        self.text_field = text_field
        self.encoding = encoding
        self.skip_bad = skip_bad
        self.bad_rows = 0
        self.bad_examples: list[str] = []

    def __iter__(self) -> Iterator[str]:
        self.bad_rows = 0
        self.bad_examples = []
        for src in self.sources:
            if src.startswith(HF_PREFIX):
                yield from self._hf(src)
                continue
            suffix = Path(src).suffix.lower()
            if suffix == ".txt":
                yield from self._txt(Path(src))
            elif suffix == ".jsonl":
                yield from self._jsonl(Path(src))
            else:
                assert suffix == ".parquet", src
                yield from self._parquet(Path(src))

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

    def _jsonl(self, path: Path) -> Iterator[str]:
        field = self.text_field
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
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

    def _parquet(self, path: Path) -> Iterator[str]:
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
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[self.text_field]):
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
        for i, row in enumerate(_hf_rows(name, split), start=1):
            text = row.get(self.text_field) if isinstance(row, dict) else None
            if isinstance(text, str):
                yield text
            else:
                self._bad(
                    f"{spec}: row {i}",
                    f"no string field '{self.text_field}'",
                    "set --text_field to the text column",
                )


def _hf_rows(name: str, split: str) -> Iterator[dict]:
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
    yield from ds
