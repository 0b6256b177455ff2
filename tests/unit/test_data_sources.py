"""Sources (txt / jsonl / parquet / folders / hf:) and cleaning + de-duplication."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config import UserError
from lmforge.data.clean import CleanOptions, DocStats, clean_documents, clean_text, doc_hash
from lmforge.data.sources import Corpus

# --------------------------------------------------------------------------- cleaning


def test_nfkc_folds_compatibility_characters() -> None:
    # ligature fi, fullwidth letters, non-breaking space, superscript two
    assert clean_text("\ufb01ne \uff21\uff22\u00a0x\u00b2") == "fine AB x2"


def test_zero_width_characters_are_dropped() -> None:
    assert clean_text("\ufeffze\u200bro\u200c wi\u200ddth\u2060!") == "zero width!"


def test_whitespace_and_line_endings() -> None:
    raw = "  To be,\t\tor   not\r\nto be:  \rthat is\n\n\n\n\n\nthe question.  \n"
    # CRLF and CR become LF; runs of spaces/tabs collapse; trailing spaces go; 5 blank lines
    # become 2; the ends are stripped; newlines survive.
    assert clean_text(raw) == "To be, or not\nto be:\nthat is\n\n\nthe question."


def test_two_blank_lines_are_kept_and_options_can_disable_steps() -> None:
    assert clean_text("a\n\n\nb") == "a\n\n\nb"
    opts = CleanOptions(collapse_spaces=False, max_blank_lines=-1)
    assert clean_text("a  b\n\n\n\n\nc", opts) == "a  b\n\n\n\n\nc"


def test_clean_documents_counts_empty_and_duplicates() -> None:
    docs = ["Hello  world", "Hello world", " \u200b\n\t", "Other", "hello world", "Other\r\n"]
    stats = DocStats()
    kept = list(clean_documents(docs, stats))
    assert kept == ["Hello world", "Other", "hello world"]
    assert (stats.read, stats.kept, stats.empty, stats.duplicates) == (6, 3, 1, 2)
    assert stats.chars == sum(map(len, kept))
    stats = DocStats()
    assert len(list(clean_documents(docs, stats, dedup=False))) == 5
    assert stats.duplicates == 0
    assert len(doc_hash("x")) == 16


# --------------------------------------------------------------------------- jsonl


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_field_and_skips_blank_lines(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "a.jsonl", ['{"text": "one"}', "", '{"text": "two", "n": 1}'])
    assert list(Corpus([str(f)])) == ["one", "two"]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "a.jsonl", ['{"text": "one"}', "", '{"text": "tw'])
    with pytest.raises(UserError, match=r"a\.jsonl:3: not a valid JSON line.*--skip_bad"):
        list(Corpus([str(f)]))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"body": "x"}', "no 'text' field"),
        ('{"text": 3}', "field 'text' is int, not a string"),
        ("[1]", "no 'text'"),
    ],
)
def test_jsonl_wrong_field(tmp_path: Path, line: str, problem: str) -> None:
    f = _write_jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', line])
    with pytest.raises(UserError, match=rf"a\.jsonl:2: {problem}"):
        list(Corpus([str(f)]))


def test_jsonl_skip_bad_counts_rows(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "a.jsonl", ['{"text": "one"}', "{oops", '{"text": null}', '{"text": "two"}']
    )
    corpus = Corpus([str(f)], skip_bad=True)
    assert list(corpus) == ["one", "two"]
    assert corpus.bad_rows == 2
    assert corpus.bad_examples[0].endswith(
        "a.jsonl:2: not a valid JSON line (Expecting property name enclosed in double quotes)"
    )
    # a second pass starts its counts afresh
    assert list(corpus) == ["one", "two"] and corpus.bad_rows == 2


def test_jsonl_custom_text_field(tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"content": "é 🎉"})])
    assert list(Corpus([str(f)], text_field="content")) == ["é 🎉"]


# --------------------------------------------------------------------------- parquet


def test_parquet_reads_all_row_groups(tmp_path: Path) -> None:
    f = tmp_path / "a.parquet"
    texts = [f"doc {i}" for i in range(2500)]
    pq.write_table(pa.table({"id": list(range(2500)), "text": texts}), f, row_group_size=700)
    assert list(Corpus([str(f)])) == texts


def test_parquet_missing_column_lists_columns(tmp_path: Path) -> None:
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), f)
    with pytest.raises(UserError, match=r"no column 'text' \(columns: id, body\).*--text_field"):
        list(Corpus([str(f)]))


def test_parquet_null_row_is_bad(tmp_path: Path) -> None:
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b"]}), f)
    with pytest.raises(UserError, match=r"a\.parquet: row 2"):
        list(Corpus([str(f)]))
    corpus = Corpus([str(f)], skip_bad=True)
    assert list(corpus) == ["a", "b"] and corpus.bad_rows == 1


# --------------------------------------------------------------------------- txt and folders


def test_txt_decode_error_names_offset_and_fix(tmp_path: Path) -> None:
    f = tmp_path / "old.txt"
    f.write_bytes("Caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(
        UserError, match=r"old\.txt: not valid utf-8 at byte offset 3.*--encoding latin-1"
    ):
        list(Corpus([str(f)]))
    assert list(Corpus([str(f)], encoding="latin-1")) == ["Café au lait"]
    corpus = Corpus([str(f)], skip_bad=True)
    assert list(corpus) == [] and corpus.bad_rows == 1


def test_folder_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b" / "m.jsonl").write_text('{"text": "m"}\n')
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden" / "h.txt").write_text("ignored")
    assert list(Corpus([str(tmp_path)])) == ["a", "m", "z"]


def test_missing_unsupported_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="input not found: .*nope.txt"):
        Corpus([str(tmp_path / "nope.txt")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match=r"unsupported file type '\.csv'"):
        Corpus([str(tmp_path / "x.csv")])
    with pytest.raises(UserError, match="has no .txt/.jsonl/.parquet files"):
        Corpus([str(tmp_path)])
    with pytest.raises(UserError, match="no inputs"):
        Corpus([])


def test_hf_input_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    corpus = Corpus(["hf:someone/tiny:validation"])
    with pytest.raises(UserError, match="pip install datasets"):
        list(corpus)
    with pytest.raises(UserError, match="hf:NAME"):
        Corpus(["hf:"])
