"""Preference pairs: ``{prompt, chosen, rejected}`` rows to token ids with reply-only labels.

A row's ``prompt`` is a string (one user turn) or a list of chat messages ending with a user
turn (system turns first, then user/assistant alternating); ``chosen`` and ``rejected`` are
strings, or TRL's conversational form, a list holding one assistant message. Each reply is
rendered after the prompt with the run's chat template and tokenized; the labels are the
reply's tokens and its end-of-turn token (as in SFT, ``data/sft.py``), everything else -100.
Examples longer than ``max_len`` are cut at the end; a row whose cut leaves no reply token of
either answer is an error, as are empty replies and a chosen equal to its rejected (the pair
would teach nothing): each error names ``file:line`` and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lmforge.config import UserError
from lmforge.data.sft import (
    Encoded,
    Renderer,
    SftBatches,
    assistant_spans,
    check_order,
    pad_rows,
    to_example,
)

Pair = tuple[Tensor, ...]
"""(x_chosen, y_chosen, x_rejected, y_rejected[, reference log-probs (2,)]) of one row."""


def _reply(value: Any, name: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string or [{{\"role\": \"assistant\", "
                         "\"content\": ...}]")
    if not value.strip():
        raise ValueError(f"'{name}' is empty; drop the row or write the reply")
    return value


def _prompt(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    raise ValueError("'prompt' must be a string or a list of {role, content} messages")


def parse_row(row: Any) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen, rejected) of one row; ValueError says what is wrong."""
    if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= row.keys():
        raise ValueError("expected an object with 'prompt', 'chosen' and 'rejected'")
    prompt = _prompt(row["prompt"])
    chosen, rejected = _reply(row["chosen"], "chosen"), _reply(row["rejected"], "rejected")
    check_order([*prompt, {"role": "assistant", "content": chosen}])
    if chosen.strip() == rejected.strip():
        raise ValueError("'chosen' and 'rejected' are identical: the pair teaches nothing")
    return prompt, chosen, rejected


def is_preference_file(path: str | Path) -> bool:
    """Whether the file's first row has 'chosen' and 'rejected' fields (else it is SFT data)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return False
                return isinstance(row, dict) and {"chosen", "rejected"} <= row.keys()
    return False


def encode_reply(prompt: list[dict[str, str]], reply: str, template: Renderer, tok: Tokenizer,
                 end_of_turn: str) -> Encoded:
    """The prompt and one reply rendered and tokenized; mask 1 on the reply's tokens and its
    end-of-turn (the last assistant turn only: earlier ones in the prompt carry no loss)."""
    text, spans = assistant_spans([*prompt, {"role": "assistant", "content": reply}],
                                  template, end_of_turn)
    start, _, end = spans[-1]
    enc = tok.encode(text, add_special_tokens=False)
    return Encoded(list(enc.ids), [int(start <= s < end) for s, _ in enc.offsets], 1)


@dataclass
class PreferenceReport:
    """What `lmforge data check` found in a preference file, and the encoded pairs."""

    path: str
    max_len: int
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    duplicates: int = 0
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)
    reply_tokens: list[int] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers (no per-row data)."""
        ls = sorted(self.lengths) or [0]
        return {"path": self.path, "pairs": len(self.pairs), "bad_rows": len(self.errors),
                "duplicates": self.duplicates, "max_len": self.max_len,
                "truncated_replies": self.truncated, "length_min": ls[0],
                "length_p50": ls[len(ls) // 2], "length_max": ls[-1],
                "reply_tokens_mean": sum(self.reply_tokens) / max(len(self.reply_tokens), 1)}


def check_preference(path: str | Path, tok: Tokenizer, template: Renderer, end_of_turn: str,
                     max_len: int) -> PreferenceReport:
    """Read, render and tokenize every row of ``path``; bad rows become file:line errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    report = PreferenceReport(str(path), max_len)
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.rows += 1
            try:
                prompt, chosen, rejected = parse_row(json.loads(line))
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                report.errors.append(f"{path}:{n}: {e}")
                continue
            key = json.dumps([prompt, chosen, rejected])
            report.duplicates += key in seen
            seen.add(key)
            pair: list[Tensor] = []
            for name, reply in (("chosen", chosen), ("rejected", rejected)):
                enc = encode_reply(prompt, reply, template, tok, end_of_turn)
                x, y = to_example(enc, max_len)
                kept, whole = int((y != -100).sum()), sum(enc.mask[1:])
                if kept == 0:
                    report.errors.append(
                        f"{path}:{n}: the {name} reply starts after token {max_len} (the prompt "
                        f"is {len(enc.ids) - whole} tokens), so max_len cuts all of it; raise "
                        "--max_len or shorten the prompt")
                    break
                report.truncated += kept < whole
                report.lengths.append(len(enc.ids))
                report.reply_tokens.append(kept)
                pair += [x, y]
            else:
                report.pairs.append(tuple(pair))
    return report


def collate(pairs: list[Pair], pad_id: int) -> tuple[tuple[Tensor, Tensor, Tensor | None], Tensor]:
    """((ids, labels, reference) , y) of a batch of B pairs: the B chosen rows then the B
    rejected rows, right-padded to one width; reference (2B,) in the same order, or None; y
    holds one entry per pair, so the loop counts pairs (the loss is a mean over pairs)."""
    ids, labels = pad_rows([(p[0], p[1]) for p in pairs] + [(p[2], p[3]) for p in pairs], pad_id)
    ref = torch.stack([p[4] for p in pairs]).t().flatten() if len(pairs[0]) > 4 else None
    return (ids, labels, ref), torch.zeros(len(pairs), dtype=torch.long)


def preference_batches(pairs: list[Pair], batch_size: int, max_len: int, pad_id: int, seed: int,
                       group_by_length: bool = False, rank: int = 0,
                       world_size: int = 1) -> SftBatches:
    """Endless shuffled batches of pairs (SFT's seeded epochs and rank shares, our collate)."""
    return SftBatches(pairs, batch_size, max_len, pad_id, seed, False, group_by_length, rank,  # type: ignore[arg-type]
                      world_size, collate=collate)


def eval_pair_batches(pairs: list[Pair], batch_size: int,
                      pad_id: int) -> list[tuple[tuple[Tensor, Tensor, Tensor | None], Tensor]]:
    """Fixed, ordered batches of held-out pairs."""
    return [collate(pairs[k: k + batch_size], pad_id) for k in range(0, len(pairs), batch_size)]


def with_reference(pairs: list[Pair], logps: Callable[[list[Pair]], Tensor],
                   batch_size: int) -> list[Pair]:
    """Each pair with its reference log-probs appended, computed ``batch_size`` pairs at a time
    by ``logps`` (-> (2B,), chosen rows then rejected)."""
    out: list[Pair] = []
    for k in range(0, len(pairs), batch_size):
        chunk = pairs[k: k + batch_size]
        ref = logps(chunk).view(2, len(chunk)).t()  # (B, 2): chosen, rejected
        out += [(*p[:4], r) for p, r in zip(chunk, ref)]
    return out
