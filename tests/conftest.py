"""Shared fixture for the smoke, dist and serve tests: a real-English corpus, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.data.corpora import pydoc_topics_text
from tests.smoke.helpers import lmforge


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus of real English (CPython's documentation topics) and its prepared dataset."""
    root = tmp_path_factory.mktemp("smoke")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in sorted(pydoc_topics_text().items())[:60]:
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    proc = lmforge("data", "prepare", str(corpus), "--out", "prepared", "--vocab_size", "512",
                   cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root


