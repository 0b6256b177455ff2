"""Pretraining data at size: clean splits, slices + merge, near duplicates, mixtures.

Real text throughout (CPython's documentation topics); every check reads the written shards
back and decodes them with the saved tokenizer, so it tests what a training run will see.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from tokenizers import Tokenizer

from lmforge.config import ConfigError, UserError
from lmforge.data.clean import clean_text
from lmforge.data.corpora import pydoc_topics_text
from lmforge.data.loader import TokenDataset
from lmforge.data.merge import MergeConfig, merge
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.data.split import SplitRule, cut_document, phase
from lmforge.data.tokenizer import train_bpe


def _console() -> Console:
    return Console(file=io.StringIO(), width=120)


def _paragraphs() -> list[str]:
    """Distinct paragraphs of real English/code prose, each tagged so it is unique."""
    out = []
    for name, text in sorted(pydoc_topics_text().items()):
        for i, p in enumerate(text.split("\n\n")):
            if len(p.strip()) > 40:
                out.append(f"[{name} {i}] {p.strip()}")
    return out


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    f.write_text(train_bpe(iter(pydoc_topics_text().values()), 512).to_str())
    return f


def _docs_of(out: Path, split: str) -> list[str]:
    """The EOS-separated documents of one split, decoded."""
    m = json.loads((out / "manifest.json").read_text())
    ids = np.concatenate(
        [np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    ).tolist()
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    docs, start = [], 0
    for j, t in enumerate(ids):
        if t == m["eos_id"]:
            docs.append(tok.decode(ids[start:j]))
            start = j + 1
    return docs


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- clean splits


def test_cut_document_at_natural_boundaries() -> None:
    text = "\n\n".join(_paragraphs()[:200])
    pieces = cut_document(text, 3000)
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(len(p) >= 3000 for p in pieces[:-1])
    assert all(p.endswith("\n\n") for p in pieces[:-1])  # paragraphs here are never > 3000
    assert cut_document("short", 3000) == ["short"]
    assert cut_document("x" * 10, 4) == ["xxxx", "xxxx", "xx"]  # no boundary: cut anywhere


def test_a_short_document_is_held_out_by_its_hash_alone() -> None:
    rule = SplitRule(0.1, 0.05, split_chars=10_000)
    for p in _paragraphs()[:300]:
        [(split, text)] = rule.segments(p)
        assert text == p
        assert (split == "train") == (phase(p) < 1 - 0.15)


def test_no_document_on_both_sides_many_small(tmp_path: Path, tok_file: Path) -> None:
    paras = _paragraphs()
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    out = tmp_path / "ds"
    prepare(PrepareConfig(inputs=[str(data)], out=str(out), tokenizer=str(tok_file),
                          val_fraction=0.1, test_fraction=0.05), _console())
    sides = {s: _docs_of(out, s) for s in ("train", "val", "test")}
    digests = {s: {_digest(d) for d in docs} for s, docs in sides.items()}
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"] and not digests["val"] & digests["test"]
    expected = sorted(clean_text(p) for p in paras)
    assert sorted(d for docs in sides.values() for d in docs) == expected  # nothing lost
    r = json.loads((out / "report.json").read_text())
    assert r["documents_cut"] == 0
    # ~2,000 documents: the shares in tokens land near the asked fractions
    assert r["token_fraction"]["val"] == pytest.approx(0.10, abs=0.015)
    assert r["token_fraction"]["test"] == pytest.approx(0.05, abs=0.01)


def test_no_document_on_both_sides_few_huge(tmp_path: Path, tok_file: Path) -> None:
    """Four ~100 KB .txt files (a play each): cut, and no paragraph on both sides."""
    paras = _paragraphs()
    folder = tmp_path / "plays"
    folder.mkdir()
    per = len(paras) // 4
    for i in range(4):
        (folder / f"play{i}.txt").write_text("\n\n".join(paras[i * per : (i + 1) * per]))
    out = tmp_path / "ds"
    prepare(PrepareConfig(inputs=[str(folder)], out=str(out), tokenizer=str(tok_file),
                          val_fraction=0.05, split_chars=4096), _console())
    r = json.loads((out / "report.json").read_text())
    assert r["documents_kept"] == 4 and r["documents_cut"] == 4
    train = {p for d in _docs_of(out, "train") for p in d.split("\n\n")}
    val = {p for d in _docs_of(out, "val") for p in d.split("\n\n")}
    assert not train & val
    assert train | val == {clean_text(p) for p in paras[: 4 * per]}
    # every play gives val its share of pieces, so 4 documents still honour 5% in tokens
    assert r["token_fraction"]["val"] == pytest.approx(0.05, abs=0.01)
    # a whole play would be one document: with no cutting val would be empty or 25%+
    with pytest.raises(UserError, match="split is empty.*--split_chars"):
        prepare(PrepareConfig(inputs=[str(folder)], out=str(tmp_path / "x"),
                              tokenizer=str(tok_file), split_chars=10**9), _console())


# --------------------------------------------------------------------------- slices + merge


def _mixed_inputs(tmp_path: Path) -> list[str]:
    """A .jsonl file, a folder of .txt files and a .parquet file of small row groups."""
    paras = _paragraphs()
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[:900]))
    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(9):
        (folder / f"t{i}.txt").write_text("\n\n".join(paras[900 + 40 * i : 940 + 40 * i]))
    table = pa.table({"text": paras[1300:1700]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=50)
    return [str(jsonl), str(folder), str(tmp_path / "c.parquet")]


def test_slices_partition_every_input_kind(tmp_path: Path) -> None:
    """Any K: the slices' documents, file by file, are exactly the whole corpus's."""
    from lmforge.data.sources import Corpus

    inputs = _mixed_inputs(tmp_path)
    whole = list(Corpus(inputs).documents())
    for k in (1, 2, 3, 7, 300):  # 300: more slices than files, row groups, some lines
        parts = [list(Corpus(inputs, num_shards=k, shard_index=i).documents()) for i in range(k)]
        assert sorted(d for p in parts for d in p) == sorted(whole)
        for p in parts:  # a slice keeps the corpus order
            mine = set(p)
            assert p == [d for d in whole if d in mine]


def _bincounts(out: Path, split: str) -> np.ndarray:
    ds = TokenDataset.open(out)
    return sum(np.bincount(a, minlength=ds.vocab_size) for a in ds.split(split))


def test_slices_merged_equal_one_whole_run(tmp_path: Path, tok_file: Path) -> None:
    inputs = _mixed_inputs(tmp_path)
    common = dict(inputs=inputs, tokenizer=str(tok_file), val_fraction=0.1, split_chars=2000)
    whole = prepare(PrepareConfig(out=str(tmp_path / "whole"), **common), _console())
    slices = [
        prepare(PrepareConfig(out=str(tmp_path / f"s{i}"), num_shards=3, shard_index=i,
                              **common), _console())
        for i in range(3)
    ]
    # each slice did part of the work
    kept = [json.loads((s / "report.json").read_text())["documents_kept"] for s in slices]
    assert all(k > 100 for k in kept)
    merged = merge(MergeConfig(folders=[str(s) for s in reversed(slices)],
                               out=str(tmp_path / "merged")), _console())
    mw, mm = (json.loads((p / "manifest.json").read_text()) for p in (whole, merged))
    for split in ("train", "val"):
        assert np.array_equal(_bincounts(whole, split), _bincounts(merged, split))
        assert mm["splits"][split]["tokens"] == mw["splits"][split]["tokens"]
        assert mm["splits"][split]["bytes"] == mw["splits"][split]["bytes"]
    assert [s["tokens"] for s in mm["sources"]] == [s["tokens"] for s in mw["sources"]]
    rw, rm = (json.loads((p / "report.json").read_text()) for p in (whole, merged))
    for key in ("documents_read", "documents_kept", "characters", "documents_cut"):
        assert rm[key] == rw[key]
    assert sorted(_docs_of(merged, "val")) == sorted(_docs_of(whole, "val"))
    # and the loader reads the merged folder like any other
    assert TokenDataset.open(merged).num_tokens("train") == mw["splits"]["train"]["tokens"]


def test_slice_and_merge_errors(tmp_path: Path, tok_file: Path) -> None:
    with pytest.raises(ConfigError, match="num_shards: slices must share one tokenizer"):
        PrepareConfig(inputs=["a.jsonl"], num_shards=2)
    with pytest.raises(ConfigError, match="shard_index: must be in 0 .. 1"):
        PrepareConfig(inputs=["a.jsonl"], num_shards=2, shard_index=2, tokenizer="t.json")
    inputs = _mixed_inputs(tmp_path)
    s0 = prepare(PrepareConfig(inputs=inputs, out=str(tmp_path / "s0"), tokenizer=str(tok_file),
                               num_shards=2), _console())
    with pytest.raises(UserError, match=r"missing: \[1\]"):
        merge(MergeConfig(folders=[str(s0)], out=str(tmp_path / "m")))
    other = tmp_path / "tok2.json"
    other.write_text(train_bpe(iter(_paragraphs()[:300]), 300).to_str())
    s1 = prepare(PrepareConfig(inputs=inputs, out=str(tmp_path / "s1"), tokenizer=str(other),
                               num_shards=2, shard_index=1), _console())
    with pytest.raises(UserError, match="differs from"):
        merge(MergeConfig(folders=[str(s0), str(s1)], out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- near duplicates


def test_near_duplicate_dropped_different_document_kept(tmp_path: Path, tok_file: Path) -> None:
    pytest.importorskip("datasketch")
    from lmforge.data.neardup import shingles

    paras = _paragraphs()
    original = "\n\n".join(paras[100:130])
    near = original.replace("the ", "a ", 2) + "\n\nA line added by a later scraper."
    different = "\n\n".join(paras[200:230])
    s = [shingles(t) for t in (original, near, different)]
    assert len(s[0] & s[1]) / len(s[0] | s[1]) > 0.9  # the planted copy really is near
    assert len(s[0] & s[2]) / len(s[0] | s[2]) < 0.05
    rows = [original, *paras[:50], near, different]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    for given in (str(tok_file), ""):  # replayed from the tokenizer pass, and on its own
        out = tmp_path / f"ds{bool(given)}"
        console = _console()
        prepare(PrepareConfig(inputs=[str(data)], out=str(out), tokenizer=given, vocab_size=400,
                              near_dup=0.8, split_chars=10**6, val_fraction=0.2), console)
        r = json.loads((out / "report.json").read_text())
        assert r["near_duplicates"] == 1 and r["documents_kept"] == len(rows) - 1
        [pair] = r["near_dup_examples"]
        assert pair["kept"].startswith(original[:30]) and pair["dropped"].startswith(near[:30])
        docs = _docs_of(out, "train") + _docs_of(out, "val")
        assert clean_text(original) in docs and clean_text(different) in docs
        assert clean_text(near) not in docs
        assert "near duplicate" in console.file.getvalue()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- mixtures


def test_mixture_weights_honoured_in_tokens(tmp_path: Path) -> None:
    """Source a (letters) has over 80% of the tokens; weighted 0.7 / 0.3, training sees 70%."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=5)) for _ in range(400)]
    nums = ["".join(rng.choice(list("0123456789"), size=5)) for _ in range(400)]
    (tmp_path / "a.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(words, 400))}) + "\n" for _ in range(300)))
    (tmp_path / "b.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(nums, 400))}) + "\n" for _ in range(50)))
    out = tmp_path / "mix"
    prepare(PrepareConfig(inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                          out=str(out), vocab_size=400, weights=[0.7, 0.3],
                          shard_tokens=20_000), _console())
    ds = TokenDataset.open(out)
    src = ds.manifest["sources"]
    assert [s["weight"] for s in src] == pytest.approx([0.7, 0.3])
    a_tokens, b_tokens = (s["tokens"]["train"] for s in src)
    assert a_tokens / (a_tokens + b_tokens) > 0.8  # the raw share, far from the weight
    assert a_tokens + b_tokens == ds.num_tokens("train")
    tok = Tokenizer.from_file(str(ds.tokenizer_path))
    letter_ids = np.array([any(c.isalpha() for c in tok.decode([i])) for i in range(ds.vocab_size)])
    batches = ds.random_batches("train", batch_size=16, block_size=32, seed=0)
    from_a = n = 0
    for _ in range(500):
        x, _ = next(batches)
        has_letter = letter_ids[x.numpy()].any(axis=1)
        from_a += int(has_letter.sum())
        n += x.shape[0]
    assert from_a / n == pytest.approx(0.7, abs=0.02)
    # resumable like an unweighted stream
    state = batches.state_dict()
    nxt = next(batches)[0]
    again = ds.random_batches("train", batch_size=16, block_size=32, seed=99)
    again.load_state_dict(state)
    assert np.array_equal(next(again)[0].numpy(), nxt.numpy())
    with pytest.raises(ConfigError, match="weights: 1 given for 2 inputs"):
        PrepareConfig(inputs=["a", "b"], weights=[1.0])
    # a weighted source left with no tokens (here: all duplicates of the first) is refused
    (tmp_path / "c.jsonl").write_text((tmp_path / "b.jsonl").read_text())
    with pytest.raises(UserError, match="c.jsonl has no training tokens"):
        prepare(PrepareConfig(inputs=[str(tmp_path / f) for f in ("b.jsonl", "c.jsonl")],
                              out=str(tmp_path / "x"), vocab_size=400, weights=[1, 1]))
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- encoding pipeline


def test_encode_stream_keeps_order_across_overlapped_batches(
    tok_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are encoded in a worker thread while the next is read: the order and ids must be
    exactly those of encoding each document alone, whatever the batch boundaries."""
    from lmforge.data import shards

    tok = Tokenizer.from_file(str(tok_file))
    paras = _paragraphs()[:300]
    expected = [tok.encode(p, add_special_tokens=False).ids for p in paras]
    for docs_per_batch in (1, 7, 1000):
        monkeypatch.setattr(shards, "_BATCH_DOCS", docs_per_batch)
        out = list(shards.encode_stream(tok, enumerate(paras)))
        assert [g for g, _, _ in out] == list(range(len(paras)))
        assert [t for _, t, _ in out] == paras
        assert [i for _, _, i in out] == expected


def test_encode_stream_passes_a_reader_error_and_stops(tok_file: Path) -> None:
    """A bad input found while the previous batch is being encoded surfaces as itself."""
    from lmforge.data import shards

    tok = Tokenizer.from_file(str(tok_file))

    def docs() -> Iterator[tuple[int, str]]:
        for n in range(600):
            if n == 400:
                raise UserError("corpus.jsonl:401: not valid JSON")
            yield n, f"document number {n} " * 20

    seen = []
    with pytest.raises(UserError, match="corpus.jsonl:401"):
        for n, _, _ in shards.encode_stream(tok, docs()):
            seen.append(n)
    assert seen == list(range(len(seen))) and len(seen) < 400
