"""SFT data: row shapes, role order, and exactly which tokens carry loss (hand-checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.config import UserError
from lmforge.data.check import check_sft, refusals
from lmforge.data.sft import (
    CONTENT,
    END,
    NONE,
    SftBatches,
    encode_conversation,
    read_conversations,
    to_example,
)
from lmforge.infer.chat import CHATML, ChatTemplate

EOT = "<|im_end|>"
WORDS = ["<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "hello", "there",
         "bye", "ok", "[UNK]"]


def word_tokenizer() -> Tokenizer:
    """Ids are hand-checkable: one id per word, the ChatML markers are special tokens."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok


def chatml() -> ChatTemplate:
    return ChatTemplate(CHATML, "chatml", stop=(EOT,))


def test_hand_checked_two_turn_mask() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]
    enc = encode_conversation(messages, chatml(), word_tokenizer(), EOT)
    # <|im_start|> user hi <|im_end|> <|im_start|> assistant hello there <|im_end|> ...
    assert enc.ids == [0, 2, 5, 1, 0, 3, 6, 7, 1, 0, 2, 8, 1, 0, 3, 9, 1]
    n, c, e = NONE, CONTENT, END
    assert enc.mask == [n, n, n, n, n, n, c, c, e, n, n, n, n, n, n, c, e]
    x, y = to_example(enc, max_len=64)
    assert x.tolist() == enc.ids[:-1]
    # targets: hello(6) there(7) <|im_end|>(1) ok(9) <|im_end|>(1), nothing else
    assert [t for t in y.tolist() if t != -100] == [6, 7, 1, 9, 1]
    assert y.tolist()[5:8] == [6, 7, 1]  # x[5] = 'assistant' predicts 'hello'


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_three_row_shapes_and_errors_by_line(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", [
        {"prompt": "hi", "completion": "hello"},
        {"messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "bye"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]},
        "{not json",
        {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
        {"text": "hi"},
    ])
    read = read_conversations(f)
    assert [c.messages[-1]["content"] for c in read.rows] == ["hello", "bye", "ok"]
    assert [e.split(": ")[0] for e in read.errors] == [f"{f}:4", f"{f}:5", f"{f}:6"]
    assert "wrong role order" in read.errors[1]


def test_empty_assistant_turns_are_refused(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": ""}] * 3)
    report = check_sft(f, word_tokenizer(), chatml(), EOT, max_len=32)
    assert report.empty_turns == 3 and report.duplicates == 2
    reasons = refusals(report, EOT)
    assert len(reasons) == 1 and "no assistant token would be trained" in reasons[0]


def test_template_without_end_of_turn_is_refused(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello"}])
    dropped = ChatTemplate(CHATML.replace("'<|im_end|>' + ", ""), "broken")
    report = check_sft(f, word_tokenizer(), dropped, EOT, max_len=32)
    assert report.content_tokens == 1 and report.eot_tokens == 0
    reasons = refusals(report, EOT)
    assert len(reasons) == 1 and "no end-of-turn token" in reasons[0]
    assert refusals(check_sft(f, word_tokenizer(), chatml(), EOT, 32), EOT) == []


def test_check_counts_truncation_and_loss_fraction(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "hello there"},
                                     {"prompt": "hi " * 20, "completion": "ok"}])
    report = check_sft(f, word_tokenizer(), chatml(), EOT, max_len=16)
    s = report.summary()
    assert s["rows"] == 2 and s["truncated"] == 1
    assert s["loss_tokens"] == 3  # hello there <|im_end|>; the long row's reply is cut off


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        read_conversations(tmp_path / "nope.jsonl")


def test_batches_pad_with_no_loss_pack_and_group() -> None:
    ex = [(torch.arange(n), torch.arange(n)) for n in (3, 5, 7, 2)]
    x, y = next(SftBatches(ex, batch_size=4, seq_len=8, pad_id=0, seed=0))
    assert x.shape == (4, 7) and int((y == -100).sum()) == 4 + 2 + 5
    packed = SftBatches(ex, batch_size=1, seq_len=8, pad_id=0, seed=0, pack=True)
    (x, segments), y = next(packed)  # whole examples, numbered (tests/unit/test_sft_pack.py)
    assert x.shape == segments.shape == y.shape and x.shape[1] <= 8
    grouped = SftBatches(ex, batch_size=2, seq_len=8, pad_id=0, seed=0, group_by_length=True)
    widths = sorted(next(grouped)[0].shape[1] for _ in range(2))
    assert widths == [3, 7]  # (2, 3) and (5, 7) batched together: little padding
