"""Masked-language-model batches (BERT, Devlin et al. 2018) from windows of a token stream.

Each window of ``seq_len - 2`` tokens becomes ``[CLS] window [SEP]``. Of the tokens that are not
special (never [CLS], [SEP], [PAD], [MASK] nor the document separator), each is chosen with
probability 15%; a chosen token is replaced by [MASK] 80% of the time, by a random non-special
token 10% of the time and left as it is 10% of the time, and is the only kind of position
with a label (-100 elsewhere, so the loss and the token count cover chosen tokens only).

Every draw comes from an explicit ``torch.Generator``: the same seed gives the same masks, and
its state is part of ``MaskedBatches.state_dict`` so a resumed run continues the same stream.
Evaluation re-seeds a fresh generator on each pass, so every evaluation sees the same masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lmforge.config import ConfigError, UserError
from lmforge.data.tokenizer import special_token_ids, vocab_size_of

PAD_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = "[PAD]", "[CLS]", "[SEP]", "[MASK]"
MLM_SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)
IGNORE = -100  # label of a position that carries no loss (cross_entropy's ignore_index)


@dataclass
class MaskingConfig:
    """How tokens are chosen and corrupted for the masked-LM objective."""

    probability: float = 0.15
    """Chance that a non-special token is chosen for prediction (BERT: 0.15)."""
    mask_fraction: float = 0.8
    """Share of chosen tokens replaced by [MASK] (BERT: 0.8)."""
    random_fraction: float = 0.1
    """Share of chosen tokens replaced by a random non-special token (BERT: 0.1); the rest stay unchanged."""

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ConfigError(f"mlm.probability: must be in (0, 1), got {self.probability}")
        for name in ("mask_fraction", "random_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"mlm.{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.mask_fraction + self.random_fraction > 1.0:
            raise ConfigError(
                f"mlm.mask_fraction + mlm.random_fraction must be <= 1, got "
                f"{self.mask_fraction} + {self.random_fraction}"
            )


@dataclass(frozen=True)
class MlmVocab:
    """The token ids masking needs, read from a tokenizer that has the MLM special tokens."""

    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> MlmVocab:
        """Ids of ``tok``; UserError if it lacks one of ``MLM_SPECIAL_TOKENS``."""
        ids = [tok.token_to_id(name) for name in MLM_SPECIAL_TOKENS]
        missing = [n for n, i in zip(MLM_SPECIAL_TOKENS, ids) if i is None]
        if missing:
            raise UserError(f"tokenizer: has no {', '.join(missing)} token; add the MLM special "
                            "tokens with lmforge.data.tokenizer.with_special_tokens")
        pad, cls_, sep, mask = ids
        specials = tuple(sorted(set(special_token_ids(tok)) | set(ids)))
        return cls(vocab_size_of(tok), pad, cls_, sep, mask, specials)


class Masker:
    """Wraps windows in [CLS] ... [SEP] and masks them, drawing from a caller's generator."""

    def __init__(self, cfg: MaskingConfig, vocab: MlmVocab) -> None:
        self.cfg, self.vocab = cfg, vocab
        self.is_special = torch.zeros(vocab.vocab_size, dtype=torch.bool)
        self.is_special[list(vocab.special_ids)] = True
        self.regular = torch.nonzero(~self.is_special).flatten()  # ids a random swap may use

    def wrap(self, windows: Tensor) -> Tensor:
        """Token windows (B, L) -> [CLS] window [SEP], (B, L + 2)."""
        B = windows.shape[0]
        cls_ = torch.full((B, 1), self.vocab.cls_id, dtype=windows.dtype)
        sep = torch.full((B, 1), self.vocab.sep_id, dtype=windows.dtype)
        return torch.cat((cls_, windows, sep), dim=1)

    def __call__(self, ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Token ids (B, T) -> (corrupted inputs (B, T), labels (B, T) with -100 where not chosen)."""
        cfg = self.cfg
        eligible = ~self.is_special[ids]  # (B, T)
        chosen = (torch.rand(ids.shape, generator=generator) < cfg.probability) & eligible
        chosen = _at_least_one(chosen, eligible, generator)
        labels = torch.where(chosen, ids, IGNORE)
        action = torch.rand(ids.shape, generator=generator)  # (B, T), one draw decides 80/10/10
        to_mask = chosen & (action < cfg.mask_fraction)
        to_random = chosen & (action >= cfg.mask_fraction) & (
            action < cfg.mask_fraction + cfg.random_fraction)
        pick = torch.randint(len(self.regular), ids.shape, generator=generator)  # (B, T)
        inputs = torch.where(to_mask, self.vocab.mask_id, ids)
        inputs = torch.where(to_random, self.regular[pick], inputs)
        return inputs, labels


def _at_least_one(chosen: Tensor, eligible: Tensor, generator: torch.Generator) -> Tensor:
    """Choose one random eligible token in rows where none was chosen.

    Without it a short row (or a whole small batch) could carry no label, and an all-ignored
    batch gives a NaN loss. On long rows this almost never fires (0.85^126 ~ 1e-9).
    """
    empty = ~chosen.any(dim=1) & eligible.any(dim=1)  # (B,)
    if not bool(empty.any()):
        return chosen
    scores = torch.rand(chosen.shape, generator=generator).masked_fill(~eligible, -1.0)
    pick = torch.zeros_like(chosen).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
    return chosen | (pick & empty[:, None])


class WindowStream(Protocol):
    """A resumable stream of ``(x, y)`` token windows, such as ``loader.RandomBatches``."""

    def __next__(self) -> tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, d: dict[str, Tensor]) -> None: ...


class MaskedBatches:
    """Endless ``(inputs, labels)`` masked-LM batches over a window stream, resumable."""

    def __init__(self, windows: WindowStream, masker: Masker, seed: int) -> None:
        self.windows, self.masker = windows, masker
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        x, _ = next(self.windows)  # (B, L): the window's inputs; its next-token targets unused
        return self.masker(self.masker.wrap(x), self.generator)  # (B, L + 2) each

    def state_dict(self) -> dict[str, Tensor]:
        """The window stream's position and the masking RNG state, for checkpoints."""
        return {"mask_rng_state": self.generator.get_state(),
                **{f"windows.{k}": v for k, v in self.windows.state_dict().items()}}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """Continue exactly where the saved stream stopped."""
        self.generator.set_state(d["mask_rng_state"])
        self.windows.load_state_dict({k.removeprefix("windows."): v for k, v in d.items()
                                      if k.startswith("windows.")})


def masked_eval_batches(windows: Iterable[tuple[Tensor, Tensor]], masker: Masker,
                        seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Fixed masked batches over fixed windows: the same masks on every call with one seed."""
    generator = torch.Generator().manual_seed(seed)
    for x, _ in windows:
        yield masker(masker.wrap(x), generator)
