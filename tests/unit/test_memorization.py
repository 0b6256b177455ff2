"""Memorization check of `lmforge eval --memorization`: windows inside documents, exact suffixes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge import cli
from lmforge.config import UserError
from lmforge.data.corpora import pydoc_topics_text
from lmforge.eval.memorization import documents, memorization, sample_windows, summarize
from lmforge.models.decoder import Decoder, DecoderConfig
from tests.serve import make_tiny_run

EOS = 0


def test_documents_are_the_spans_between_eos() -> None:
    arrays = [np.array([5, 6, 0, 7, 8, 9, 0, 0, 1]), np.array([2, 3])]
    assert documents(arrays, EOS) == [(0, 0, 2), (0, 3, 6), (0, 8, 9), (1, 0, 2)]


def test_windows_stay_inside_documents_and_repeat_with_the_seed() -> None:
    rng = np.random.default_rng(0)
    lengths = [3, 40, 9, 120, 12, 75]
    stream = np.concatenate([np.r_[rng.integers(1, 50, n), EOS] for n in lengths])
    docs = documents([stream], EOS)
    assert [b - a for _, a, b in docs] == lengths
    windows = sample_windows(docs, 30, 10, False, np.random.default_rng(1))
    assert len({w.start for w in windows}) == 30
    for w in windows:
        assert EOS not in stream[w.start: w.start + 10]
        _, a, b = docs[w.document]
        assert a <= w.start and w.start + 10 <= b
    assert windows == sample_windows(docs, 30, 10, False, np.random.default_rng(1))
    starts = sample_windows(docs, 30, 10, True, np.random.default_rng(1))
    # one window per document long enough (lengths 40, 120, 12, 75), at its start
    assert [(w.document, w.start) for w in starts] == [(i, docs[i][1]) for i in (1, 3, 4, 5)]
    # every valid position (31 + 111 + 3 + 66) when more are asked for
    assert len(sample_windows(docs, 10_000, 10, False, np.random.default_rng(2))) == 211
    with pytest.raises(UserError, match="no training document has 500 tokens"):
        sample_windows(docs, 5, 500, False, np.random.default_rng(0))


def _greedy(model: Decoder, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forward passes (no KV cache): the reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor(ids)[None])[0, -1].argmax()))
    return ids[len(prompt):]


def test_a_reproduced_suffix_counts_and_a_changed_token_stops_the_match() -> None:
    cfg = DecoderConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32,
                        init_std=0.3)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    rng = np.random.default_rng(0)
    prefix, suffix = 6, 8
    docs = []
    for k in range(4):
        p = rng.integers(1, 64, prefix).tolist()
        s = _greedy(model, p, suffix)
        if k == 3:
            s[5] = s[5] % 63 + 1 if s[5] % 63 + 1 != s[5] else 2  # a different non-EOS token
        docs.append([*p, *s, EOS])
    assert all(EOS not in d[:-1] for d in docs[:3]) or pytest.skip("greedy produced EOS")
    stream = np.array([t for d in docs for t in d])
    windows = sample_windows(documents([stream], EOS), 4, prefix + suffix, True,
                             np.random.default_rng(0))
    rows = memorization(model, [stream], windows, prefix, suffix, batch_size=3)
    assert [r["exact"] for r in rows] == [True, True, True, False]
    assert [r["matched"] for r in rows] == [8, 8, 8, 5]
    assert summarize(rows, suffix) == {"sampled": 4, "memorized": 3, "memorized_fraction": 0.75,
                                       "mean_matched_fraction": 29 / 32}
    with pytest.raises(UserError, match="exceeds the model's context of 32"):
        memorization(model, [stream], windows, 20, 20)


def test_memorization_of_a_run_through_the_cli(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = make_tiny_run(tmp_path / "runs", block_size=64)
    with pytest.raises(UserError, match="names no dataset folder"):
        cli.run(["eval", str(run), "--memorization"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in sorted(pydoc_topics_text().items())[:12]:
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    assert cli.run(["data", "prepare", str(corpus), "--out", "prepared", "--tokenizer",
                    str(run / "tokenizer.json"), "--split_chars", "500", "--val_fraction", "0.1"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "data": "prepared"}))
    args = ["eval", str(run), "--memorization", "--mem_samples", "20", "--mem_prefix", "16",
            "--mem_suffix", "8", "--seed", "3"]
    assert cli.run(args) == 0
    first = json.loads((run / "eval_memorization.json").read_text())
    assert first["sampled"] == 20 and len(first["windows"]) == 20
    assert 0.0 <= first["memorized_fraction"] <= 1.0
    assert first["memorized"] == sum(w["exact"] for w in first["windows"])
    assert first["settings"]["split"] == "train" and first["settings"]["prefix"] == 16
    assert {"prefix", "suffix", "generated", "matched", "document", "start"} <= set(
        first["windows"][0])
    assert cli.run(args) == 0  # the same seed samples the same windows
    again = json.loads((run / "eval_memorization.json").read_text())
    assert again["windows"] == first["windows"]
    # one window per document start goes to its own file; the uniform sample stays as it was
    assert cli.run([*args, "--mem_from_start"]) == 0
    starts = json.loads((run / "eval_memorization_starts.json").read_text())
    documents = [w["document"] for w in starts["windows"]]
    assert documents and len(set(documents)) == len(documents)  # one window per document
    assert starts["settings"]["from_start"] and not again["settings"]["from_start"]
    assert json.loads((run / "eval_memorization.json").read_text()) == again
