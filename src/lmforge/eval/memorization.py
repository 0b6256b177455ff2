"""Verbatim memorization of training text: prompt with a prefix, check the greedy suffix.

The test of Carlini et al., "Quantifying Memorization Across Neural Language Models" (2023): a
training sequence of P + S tokens counts as memorized when greedy decoding from its first P
tokens reproduces the next S tokens exactly. Sequences are windows inside one document (the
EOS-separated spans of a prepared split), never across a document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.config import UserError
from lmforge.infer.generate import generate_batch
from lmforge.models.decoder import Decoder


@dataclass(frozen=True)
class Window:
    """P + S tokens of one document: shard index, document index within the split, start."""

    shard: int
    document: int
    start: int
    """Offset of the first token in the shard."""


def documents(arrays: list[np.ndarray], eos_id: int) -> list[tuple[int, int, int]]:
    """(shard, start, end) of every document: the spans between EOS tokens, EOS excluded."""
    docs = []
    for s, arr in enumerate(arrays):
        cuts = np.flatnonzero(np.asarray(arr) == eos_id)
        starts = np.concatenate([[0], cuts + 1])
        ends = np.concatenate([cuts, [len(arr)]])
        docs += [(s, int(a), int(b)) for a, b in zip(starts, ends) if b > a]
    return docs


def sample_windows(docs: list[tuple[int, int, int]], n: int, length: int, from_start: bool,
                   rng: np.random.Generator) -> list[Window]:
    """``n`` distinct windows of ``length`` tokens inside documents (fewer if fewer exist).

    ``from_start``: each window opens a document (n distinct documents). Otherwise the start is
    uniform over every position a window fits, so each training token is equally likely.
    """
    fits = [(i, d) for i, d in enumerate(docs) if d[2] - d[1] >= length]
    if not fits:
        raise UserError(f"no training document has {length} tokens (mem_prefix + mem_suffix); "
                        "lower them")
    if from_start:
        picks = rng.choice(len(fits), size=min(n, len(fits)), replace=False)
        return [Window(fits[k][1][0], fits[k][0], fits[k][1][1]) for k in sorted(picks)]
    counts = np.array([d[2] - d[1] - length + 1 for _, d in fits])  # valid starts per document
    bounds = np.cumsum(counts)
    flat = np.sort(rng.choice(int(bounds[-1]), size=min(n, int(bounds[-1])), replace=False))
    out = []
    for f in flat:
        k = int(np.searchsorted(bounds, f, side="right"))
        offset = int(f - (bounds[k] - counts[k]))
        i, (shard, start, _) = fits[k]
        out.append(Window(shard, i, start + offset))
    return out


@torch.no_grad()
def memorization(model: Decoder, arrays: list[np.ndarray], windows: list[Window], prefix: int,
                 suffix: int, batch_size: int = 16) -> list[dict[str, object]]:
    """Per window: the prefix and true suffix ids, the greedy continuation, and how much of
    the suffix it reproduces (``matched``: leading tokens equal; ``exact``: all S equal)."""
    if prefix + suffix > model.cfg.block_size:
        raise UserError(f"mem_prefix + mem_suffix = {prefix + suffix} exceeds the model's "
                        f"context of {model.cfg.block_size} tokens; lower them")
    rows = [np.asarray(arrays[w.shard][w.start: w.start + prefix + suffix]).tolist()
            for w in windows]
    out: list[dict[str, object]] = []
    for b in range(0, len(rows), batch_size):
        batch = rows[b: b + batch_size]
        # Every prompt has P tokens, so one batch shares the cache; no EOS stop: S tokens each.
        gens = generate_batch(model, [r[:prefix] for r in batch], suffix, temperature=0.0)
        for w, r, g in zip(windows[b: b + batch_size], batch, gens):
            truth = r[prefix:]
            matched = next((k for k, (a, t) in enumerate(zip(g, truth)) if a != t), len(truth))
            out.append({"shard": w.shard, "document": w.document, "start": w.start,
                        "prefix_ids": r[:prefix], "suffix_ids": truth, "generated_ids": g,
                        "matched": matched, "exact": g == truth})
    return out


def summarize(rows: list[dict[str, object]], suffix: int) -> dict[str, float | int]:
    """Fraction reproduced exactly, mean fraction of suffix tokens matched before the first
    miss, and the sample count."""
    n = len(rows)
    exact = sum(bool(r["exact"]) for r in rows)
    matched = sum(int(r["matched"]) for r in rows)  # type: ignore[call-overload]
    return {"sampled": n, "memorized": exact, "memorized_fraction": exact / n,
            "mean_matched_fraction": matched / (n * suffix)}
