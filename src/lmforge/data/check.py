"""Checks of a fine-tuning file before any training: what would be learned, and what is wrong.

``check_sft`` reads the file, renders and tokenizes every good row, and counts: schema and
role-order errors (file:line), empty turns, token lengths against the maximum length and how
many rows would be cut, exact duplicates, and the fraction of tokens carrying loss.
``refusals`` lists the problems that make training pointless — no assistant content token or
no end-of-turn token would be trained — which both `lmforge data check` and `lmforge finetune`
refuse before touching the disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lmforge.data.sft import (
    CONTENT,
    END,
    Encoded,
    Renderer,
    encode_conversation,
    read_conversations,
)


@dataclass
class CheckReport:
    """What `lmforge data check` found in one file."""

    path: str
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    empty_turns: int = 0
    duplicates: int = 0
    lengths: list[int] = field(default_factory=list)
    max_len: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    content_tokens: int = 0
    eot_tokens: int = 0
    eot_missing_rows: int = 0
    encoded: list[Encoded] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers (no per-row data)."""
        ls = sorted(self.lengths) or [0]
        pct = {f"p{p}": ls[min(len(ls) - 1, int(p / 100 * len(ls)))] for p in (50, 90, 99)}
        return {"path": self.path, "rows": self.rows, "bad_rows": len(self.errors),
                "empty_turns": self.empty_turns, "duplicates": self.duplicates,
                "max_len": self.max_len, "truncated": self.truncated,
                "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "loss_fraction": self.loss_tokens / max(self.tokens, 1),
                "end_of_turn_tokens": self.eot_tokens,
                "rows_without_end_of_turn": self.eot_missing_rows,
                "length_min": ls[0], **pct, "length_max": ls[-1]}


def check_sft(path: str | Path, tok: Tokenizer, template: Renderer, end_of_turn: str,
              max_len: int) -> CheckReport:
    """Read, render and tokenize ``path``; count everything ``CheckReport`` holds."""
    read = read_conversations(path)
    report = CheckReport(str(path), rows=len(read.rows), errors=read.errors,
                         empty_turns=read.empty_turns, max_len=max_len)
    seen: set[str] = set()
    for conv in read.rows:
        key = json.dumps(conv.messages, sort_keys=True)
        report.duplicates += key in seen
        seen.add(key)
        enc = encode_conversation(conv.messages, template, tok, end_of_turn)
        report.encoded.append(enc)
        kept = enc.mask[1: max_len + 1]  # position 0 is never a target
        report.lengths.append(len(enc.ids))
        report.truncated += len(enc.ids) > max_len + 1
        report.tokens += len(kept)
        report.content_tokens += sum(v == CONTENT for v in kept)
        report.eot_tokens += sum(v == END for v in kept)
        report.eot_missing_rows += enc.eot_missing
    report.loss_tokens = report.content_tokens + report.eot_tokens
    return report


def refusals(report: CheckReport, end_of_turn: str) -> list[str]:
    """Reasons training on this file would be pointless; empty = go ahead."""
    out = []
    if report.rows == 0:
        out.append(f"{report.path}: no usable row ({len(report.errors)} bad)")
    elif report.content_tokens == 0:
        out.append(f"{report.path}: every assistant turn is empty (or cut off by max_len "
                   f"{report.max_len}): no assistant token would be trained")
    if report.rows and report.eot_tokens == 0:
        out.append(f"{report.path}: no end-of-turn token ({end_of_turn!r}) would be trained: the "
                   "chat template does not write it after a reply (or max_len cuts it off), so "
                   "the model would never learn to stop; fix the template")
    return out
