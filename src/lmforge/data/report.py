"""The data-preparation report: counts, token lengths, splits; saved as JSON, shown as a table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_BAR_WIDTH = 40


@dataclass
class LengthHistogram:
    """Document token lengths in log-spaced bins: bin ``i`` holds lengths in [2**i, 2**(i+1))."""

    counts: list[int] = field(default_factory=list)

    def add(self, n_tokens: int) -> None:
        """Count one document of ``n_tokens`` tokens (0 goes to the first bin)."""
        i = max(n_tokens, 1).bit_length() - 1
        if i >= len(self.counts):
            self.counts.extend([0] * (i + 1 - len(self.counts)))
        self.counts[i] += 1

    def bins(self) -> list[dict[str, int]]:
        """``[{"lo", "hi", "count"}]`` from the first to the last non-empty bin (hi exclusive)."""
        nonzero = [i for i, c in enumerate(self.counts) if c]
        if not nonzero:
            return []
        return [
            {"lo": 1 << i, "hi": 1 << (i + 1), "count": self.counts[i]}
            for i in range(nonzero[0], nonzero[-1] + 1)
        ]


@dataclass
class PrepareReport:
    """What ``lmforge data prepare`` did; written to ``report.json``."""

    documents_read: int = 0
    documents_kept: int = 0
    empty: int = 0
    duplicates: int = 0
    over_long: int = 0
    max_doc_tokens: int = 0
    bad_rows_skipped: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    characters: int = 0
    documents_cut: int = 0
    split_chars: int = 0
    near_dup_threshold: float = 0.0
    near_duplicates: int = 0
    near_dup_examples: list[dict[str, str]] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)
    slice: dict[str, int] = field(default_factory=dict)
    vocab_size: int = 0
    seconds_tokenizer: float = 0.0
    seconds_encoding: float = 0.0
    seconds: float = 0.0
    histogram: LengthHistogram = field(default_factory=LengthHistogram)

    def add_document(self, n_tokens: int) -> None:
        """Count one kept document of ``n_tokens`` tokens (all its segments)."""
        self.histogram.add(n_tokens)
        self.over_long += n_tokens > self.max_doc_tokens

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (the histogram as bins)."""
        d = dataclasses.asdict(self)
        d["histogram"] = self.histogram.bins()
        d["bytes_per_token"] = {
            s: round(self.bytes.get(s, 0) / n, 4) for s, n in self.tokens.items() if n
        }
        total = sum(self.tokens.values())
        d["token_fraction"] = {s: round(n / total, 5) for s, n in self.tokens.items() if total}
        return d


def histogram_lines(bins: list[dict[str, int]], width: int = _BAR_WIDTH) -> list[str]:
    """A text bar chart of a histogram, one line per bin."""
    peak = max((b["count"] for b in bins), default=0)
    lines = []
    for b in bins:
        bar = "█" * (round(width * b["count"] / peak) if peak else 0)
        if b["count"] and not bar:
            bar = "▏"  # a non-empty bin never looks empty
        lines.append(f"{b['lo']:>9,}–{b['hi'] - 1:<9,} {bar} {b['count']:,}")
    return lines


def _source_rows(sources: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One row per source of a mixture: its tokens per split and its training weight."""
    if len(sources) < 2:
        return []
    rows = []
    for s in sources:
        counts = ", ".join(f"{split} {n:,}" for split, n in s["tokens"].items())
        weight = f"; weight {s['weight']:.3f}" if s.get("weight") is not None else ""
        rows.append((f"source {s['name']}", f"{counts}{weight}"))
    return rows


def render_report(report: PrepareReport, console: Console) -> None:
    """Print the report as a rich table followed by the token-length histogram."""
    table = Table(title="lmforge data prepare", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("documents read", f"{report.documents_read:,}"),
        ("documents kept", f"{report.documents_kept:,}"),
        ("empty (dropped)", f"{report.empty:,}"),
        ("duplicates (dropped)", f"{report.duplicates:,}"),
        (f"over-long (> {report.max_doc_tokens:,} tokens, kept)", f"{report.over_long:,}"),
        ("bad rows skipped", f"{report.bad_rows_skipped:,}"),
        ("characters", f"{report.characters:,}"),
        (f"cut for the split (> {report.split_chars:,} chars)", f"{report.documents_cut:,}"),
        ("vocab size", f"{report.vocab_size:,}"),
    ]
    if report.near_dup_threshold:
        rows.insert(4, (f"near duplicates (Jaccard >= {report.near_dup_threshold}, dropped)",
                        f"{report.near_duplicates:,}"))
    total = sum(report.tokens.values())
    for split, n in report.tokens.items():
        bpt = report.bytes.get(split, 0) / n if n else 0.0
        share = n / total if total else 0.0
        rows.append((f"{split} tokens", f"{n:,} ({share:.2%}, {bpt:.2f} bytes/token)"))
    rows += _source_rows(report.sources)
    rows.append(("time: tokenizer training", f"{report.seconds_tokenizer:.1f} s"))
    rows.append(("time: cleaning + encoding + writing", f"{report.seconds_encoding:.1f} s"))
    rows.append(("time", f"{report.seconds:.1f} s"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    for example in report.bad_row_examples:
        console.print(f"[yellow]skipped[/yellow] {escape(example)}", highlight=False)
    for pair in report.near_dup_examples:
        console.print(f"[yellow]near duplicate[/yellow] {escape(pair['dropped'])!r}\n"
                      f"   [yellow]of[/yellow] {escape(pair['kept'])!r}", highlight=False)
    bins = report.histogram.bins()
    if bins:
        console.print("tokens per document:")
        for line in histogram_lines(bins):
            console.print(line, markup=False, highlight=False)
