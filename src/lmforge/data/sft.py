"""Supervised fine-tuning data: chat rows to token ids with a loss mask.

Three JSONL row shapes are read: ``{"prompt", "completion"}`` (one user turn, one reply),
``{"messages": [{"role", "content"}, ...]}`` (OpenAI) and ``{"conversations": [{"from",
"value"}, ...]}`` (ShareGPT: human/gpt/system). Every row becomes a list of messages and is
rendered with the model's chat template (a ``Renderer``: the recipe passes
``lmforge.infer.chat.ChatTemplate``, which this layer may not import).

Which tokens carry loss: those of each assistant turn's content AND its end-of-turn string
(``<|im_end|>`` for ChatML) — without the latter a model never learns to stop. Prompt, system
and user tokens, role headers and what the template writes after the end-of-turn (ChatML's
newline) carry none. The spans are found by rendering the conversation up to each assistant
turn (with and without it) and mapping characters to tokens through the tokenizer's offsets,
so any template that renders a conversation as a prefix of its continuation works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lmforge.config import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
# Per-token mask values: no loss, an assistant content token, an end-of-turn token.
NONE, CONTENT, END = 0, 1, 2


class Renderer(Protocol):
    """A chat template: messages to the text the model sees."""

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...


@dataclass
class Conversation:
    """One row: its messages and where it came from."""

    messages: list[dict[str, str]]
    where: str  # file:line


@dataclass
class ReadResult:
    """The rows that parsed, and one message per row that did not (file:line: what and fix)."""

    rows: list[Conversation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    empty_turns: int = 0


def _row_messages(row: Any) -> list[dict[str, str]]:
    """The row's messages; ValueError says what is wrong with its shape."""
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    if "prompt" in row or "completion" in row:
        p, c = row.get("prompt"), row.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    if isinstance(row.get("messages"), list):
        turns = row["messages"]
        if not all(isinstance(m, dict) for m in turns):
            raise ValueError("every message must be an object")
        return [{"role": m.get("role"), "content": m.get("content")} for m in turns]
    if isinstance(row.get("conversations"), list):
        turns = row["conversations"]
        if not all(isinstance(m, dict) for m in turns):
            raise ValueError("every conversation turn must be an object")
        return [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")),
                 "content": m.get("value")} for m in turns]
    raise ValueError("expected 'prompt'+'completion', 'messages' or 'conversations'")


def check_order(messages: list[dict[str, Any]]) -> None:
    """System turns first, then user/assistant alternating, ending with the assistant."""
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"turn {i}: role {m['role']!r} is not system, user or assistant")
        if not isinstance(m["content"], str):
            raise ValueError(f"turn {i}: content must be a string")
    chat = [m["role"] for m in messages if m["role"] != "system"]
    n_sys = len(messages) - len(chat)
    if any(m["role"] == "system" for m in messages[n_sys:]):
        raise ValueError("wrong role order: system turns must come first")
    expected = ["user", "assistant"] * (len(chat) // 2 + 1)
    if not chat or chat != expected[: len(chat)] or chat[-1] != "assistant":
        raise ValueError(f"wrong role order {'/'.join(chat) or '(none)'}: expected user, "
                         "assistant, user, assistant, ... ending with assistant")


def read_conversations(path: str | Path) -> ReadResult:
    """Parse a JSONL file; bad rows become errors naming file:line, empty turns are counted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    out = ReadResult()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                messages = _row_messages(json.loads(line))
                check_order(messages)
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                out.errors.append(f"{where}: {e}")
                continue
            out.empty_turns += sum(not m["content"].strip() for m in messages)
            out.rows.append(Conversation(messages, where))
    return out


# --------------------------------------------------------------------------- rendering + masks


@dataclass
class Encoded:
    """Token ids of one rendered conversation and the per-token mask (NONE/CONTENT/END)."""

    ids: list[int]
    mask: list[int]
    assistant_turns: int

    @property
    def eot_missing(self) -> bool:
        """Fewer end-of-turn segments trained than assistant turns (the template drops it)."""
        return self.assistant_turns > 0 and not _count_runs(self.mask, END) >= self.assistant_turns


def _count_runs(mask: list[int], value: int) -> int:
    return sum(1 for i, v in enumerate(mask) if v == value and (i == 0 or mask[i - 1] != value))


def assistant_spans(messages: list[dict[str, str]], template: Renderer,
                    end_of_turn: str) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered text and, per assistant turn, (start, end of content, end incl. end-of-turn).

    When the template writes no end-of-turn after a reply, its third number equals the second.
    """
    full = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        after = template.render(messages[: i + 1], add_generation_prompt=False)
        if not after.startswith(before) or not full.startswith(after):
            raise UserError("the chat template does not render a conversation as a prefix of "
                            "its continuation, so reply tokens cannot be located")
        segment = after[len(before):]
        at = segment.find(m["content"])
        content_end = (at + len(m["content"])) if at >= 0 else 0
        eot = segment.find(end_of_turn, content_end) if end_of_turn else -1
        end = eot + len(end_of_turn) if eot >= 0 else content_end
        spans.append((len(before), len(before) + content_end, len(before) + end))
    return full, spans


def encode_conversation(messages: list[dict[str, str]], template: Renderer, tok: Tokenizer,
                        end_of_turn: str) -> Encoded:
    """Render, tokenize once, and mark the tokens that start inside an assistant span."""
    text, spans = assistant_spans(messages, template, end_of_turn)
    enc = tok.encode(text, add_special_tokens=False)
    mask = []
    for start, _ in enc.offsets:
        value = NONE
        for s, content_end, end in spans:
            if s <= start < content_end:
                value = CONTENT
            elif content_end <= start < end:
                value = END
        mask.append(value)
    return Encoded(list(enc.ids), mask, len(spans))


def to_example(enc: Encoded, max_len: int) -> tuple[Tensor, Tensor]:
    """(x, y) for next-token training, cut to ``max_len`` positions; y = -100 where no loss."""
    ids = torch.tensor(enc.ids[: max_len + 1], dtype=torch.long)
    mask = torch.tensor(enc.mask[: max_len + 1]) > 0
    y = torch.where(mask[1:], ids[1:], torch.full_like(ids[1:], -100))
    return ids[:-1], y


# --------------------------------------------------------------------------- batches


def pad_rows(examples: list[tuple[Tensor, Tensor]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest example; padded positions carry no loss."""
    width = max(len(x) for x, _ in examples)
    xs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    ys = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        xs[i, : len(x)], ys[i, : len(y)] = x, y
    return xs, ys


Packed = tuple[Tensor, Tensor, Tensor]  # (x, y, segments): a row of whole examples


def _packed(examples: list[tuple[Tensor, Tensor]], seq_len: int) -> list[Packed]:
    """Whole examples back to back in rows of at most ``seq_len`` positions, in order.

    ``segments`` numbers the examples of a row (0, 0, 0, 1, 1, ...): the model's block-diagonal
    mask keeps each token's attention within its example and restarts positions at 0, so an
    example trains exactly as it would alone. An example never spans two rows (its second
    part would lose its context); a row closes when the next example does not fit.
    """
    rows: list[Packed] = []
    row: list[tuple[Tensor, Tensor]] = []
    used = 0
    for x, y in examples:
        if row and used + len(x) > seq_len:
            rows.append(_join(row))
            row, used = [], 0
        row.append((x, y))
        used += len(x)
    return [*rows, _join(row)] if row else rows


def _join(examples: list[tuple[Tensor, Tensor]]) -> Packed:
    segments = [torch.full((len(x),), i, dtype=torch.long) for i, (x, _) in enumerate(examples)]
    return (torch.cat([x for x, _ in examples]), torch.cat([y for _, y in examples]),
            torch.cat(segments))


def _pad_packed(rows: list[Packed], pad_id: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """((x, segments), y) of packed rows; padding is a segment of its own (-1), with no loss."""
    xs, ys = pad_rows([(x, y) for x, y, _ in rows], pad_id)
    segments = torch.full_like(xs, -1)
    for i, (_, _, seg) in enumerate(rows):
        segments[i, : len(seg)] = seg
    return (xs, segments), ys


def rank_share(rows: list[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's contiguous share of a global batch (sizes differ by at most one row)."""
    n = len(rows)
    return rows[rank * n // world_size: (rank + 1) * n // world_size]


class SftBatches:
    """Endless (x, y) batches over encoded examples, reshuffled every epoch with a seeded generator.

    ``group_by_length`` sorts each window of 64 batches by length before cutting batches (less
    padding), then shuffles the batches; ``pack`` fills rows of up to ``seq_len`` with whole
    examples, and x is then (ids, segments) for ``train.loop.packed_lm_loss``.
    """

    def __init__(self, examples: list[tuple[Tensor, Tensor]], batch_size: int, seq_len: int,
                 pad_id: int, seed: int, pack: bool = False, group_by_length: bool = False,
                 rank: int = 0, world_size: int = 1,
                 collate: Callable[[list[Any], int], Any] | None = None) -> None:
        if not examples:
            raise UserError("no training examples left after checks")
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.pad_id, self.pack, self.group = pad_id, pack, group_by_length
        # how a batch's examples become (x, y): padding by default; preference pairs bring theirs
        self.collate = collate or (_pad_packed if pack else pad_rows)
        self.rank, self.world_size = rank, world_size
        self.gen = torch.Generator().manual_seed(seed)
        self._it: Iterator[tuple[Any, Tensor]] = iter(())

    def _epoch(self) -> Iterator[tuple[Any, Tensor]]:
        order = torch.randperm(len(self.examples), generator=self.gen).tolist()
        items: list[Any] = [self.examples[i] for i in order]
        if self.pack:
            items = _packed(items, self.seq_len)
        if self.group:
            window = self.batch_size * 64
            items = [e for k in range(0, len(items), window)
                     for e in sorted(items[k: k + window], key=lambda e: len(e[0]))]
        # Every rank cuts the same global batches of batch_size * world_size rows from the same
        # seeded order and keeps its share: one process sees exactly the rows of all ranks.
        size = self.batch_size * self.world_size
        batches = [items[k: k + size] for k in range(0, len(items), size)]
        for b in torch.randperm(len(batches), generator=self.gen).tolist():
            if len(batches[b]) < self.world_size:
                continue  # a short last batch without a row for every rank is skipped
            mine = rank_share(batches[b], self.rank, self.world_size)
            yield self.collate(mine, self.pad_id)

    def __iter__(self) -> SftBatches:
        return self

    def __next__(self) -> tuple[Any, Tensor]:
        for _ in range(2):  # a fresh epoch when the last one ran out
            try:
                return next(self._it)
            except StopIteration:
                self._it = self._epoch()
        raise AssertionError("an epoch yielded no batch")


def eval_batches(examples: list[tuple[Tensor, Tensor]], batch_size: int,
                 pad_id: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed, ordered batches for evaluation."""
    return [pad_rows(examples[k: k + batch_size], pad_id)
            for k in range(0, len(examples), batch_size)]


# --------------------------------------------------------------------------- classification rows


def read_labeled(path: str | Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of a JSONL file; a bad row is a UserError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    texts, labels = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{n}: not valid JSON") from None
            text = row.get(text_field) if isinstance(row, dict) else None
            label = row.get(label_field) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip() or not isinstance(label, (str, int)):
                raise UserError(f"{path}:{n}: needs a non-empty string '{text_field}' and a "
                                f"string or integer '{label_field}'")
            texts.append(text)
            labels.append(str(label))
    if len(set(labels)) < 2:
        raise UserError(f"{path}: needs at least two distinct labels, found {sorted(set(labels))}")
    return texts, labels
