"""Sequence classification inputs: an encoder's tokenizer, ``[CLS] text [SEP]`` ids, batches.

Shared by fine-tuning (``finetune --task classify``), ``lmforge eval`` of a classifier and
``lmforge.load(...).classify``, so a text is cut and padded the same way in all three.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lmforge.config import UserError
from lmforge.data.mlm import CLS_TOKEN, SEP_TOKEN
from lmforge.data.tokenizer import load_tokenizer

Items = list[tuple[Tensor, int]]  # ([CLS] text [SEP] ids, label index) per row


def encoder_tokenizer(path: Path) -> Tokenizer:
    """An encoder's tokenizer.json, set to encode one text as it is: no padding, no truncation.

    A Hugging Face BERT tokenizer.json may pad every text to a fixed length (all-MiniLM-L6-v2's
    pads to 128 with [PAD]) and add [CLS]/[SEP] itself; we add them and pad per batch.
    """
    tok = load_tokenizer(path)
    tok.no_padding()
    tok.no_truncation()
    return tok


def classify_ids(tok: Tokenizer, text: str, max_len: int) -> list[int]:
    """``[CLS] text [SEP]`` ids, the text cut to fit ``max_len`` tokens (as in training)."""
    cls, sep = tok.token_to_id(CLS_TOKEN), tok.token_to_id(SEP_TOKEN)
    if cls is None or sep is None:
        raise UserError("the encoder's tokenizer has no [CLS] or [SEP] token")
    return [cls, *tok.encode(text, add_special_tokens=False).ids[: max_len - 2], sep]


def classify_batch(items: Items, pad: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """((ids (B, T), attention mask (B, T)), labels (B,)), right-padded to the longest row."""
    width = max(len(x) for x, _ in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (x, _) in enumerate(items):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return (ids, mask), torch.tensor([y for _, y in items])
