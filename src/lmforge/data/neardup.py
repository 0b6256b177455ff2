"""Near-duplicate removal with MinHash-LSH (``datasketch``), opt-in.

Each document becomes the set of its word 5-grams (lower-cased ``\\w+`` words); its MinHash
(128 permutations, fixed seed) goes into an LSH index tuned for the Jaccard threshold. A
document whose MinHash collides with an earlier one's in some band is dropped as a near
duplicate of it (Broder 1997; the usual recipe of GPT-3, The Pile, Gopher, FineWeb). The first
of a group is kept, so the result depends on the input order, as exact de-duplication does.

The index lives in memory, about 1 KB per kept document (the band hashes plus a short key):
a few GB for a few million documents. Split a bigger corpus with ``--num_shards``; slices are
not compared with each other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from lmforge.config import UserError
from lmforge.data.clean import doc_hash

NUM_PERM = 128
SHINGLE_WORDS = 5
SEED = 1
_MAX_EXAMPLES = 5
_SNIPPET_CHARS = 80
_WORD_RE = re.compile(r"\w+")


def _datasketch() -> Any:
    try:
        import datasketch
    except ImportError:
        raise UserError(
            "--near_dup needs the 'datasketch' package: pip install 'lmforge[dedup]'"
        ) from None
    return datasketch


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[bytes]:
    """The word n-grams of ``text`` (lower case), UTF-8 encoded; a short text is one shingle."""
    words = _WORD_RE.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _SNIPPET_CHARS else flat[: _SNIPPET_CHARS - 1] + "…"


class NearDupFilter:
    """Drop documents whose estimated Jaccard similarity to a kept one is over ``threshold``.

    ``dropped`` holds the digests of the dropped documents, so a second pass over the same
    stream (encoding after tokenizer training) drops the same ones without hashing again.
    """

    def __init__(self, threshold: float) -> None:
        ds = _datasketch()
        self.threshold = threshold
        self.count = 0
        self.examples: list[dict[str, str]] = []
        self.dropped: set[bytes] = set()
        self._lsh = ds.MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._minhash = ds.MinHash
        self._kept = 0

    def is_near_dup(self, text: str) -> bool:
        """True (and recorded) if ``text`` is near an earlier kept document; else index it."""
        mh = self._minhash(num_perm=NUM_PERM, seed=SEED)
        mh.update_batch(shingles(text))
        hits = self._lsh.query(mh)
        if hits:
            self.count += 1
            self.dropped.add(doc_hash(text))
            if len(self.examples) < _MAX_EXAMPLES:
                self.examples.append({"kept": min(hits).split(" ", 1)[1],
                                      "dropped": _snippet(text)})
            return True
        # The key carries the snippet for the report; the number keeps keys unique.
        self._lsh.insert(f"{self._kept:012d} {_snippet(text)}", mh)
        self._kept += 1
        return False

    def filter(self, docs: Iterable[str]) -> Iterator[str]:
        """The documents that are not near duplicates of an earlier one (first pass)."""
        return (t for t in docs if not self.is_near_dup(t))

    def replay(self, docs: Iterable[str]) -> Iterator[str]:
        """Drop the same documents as the first pass did, by digest (later passes)."""
        if not self.dropped:
            return iter(docs)
        return (t for t in docs if doc_hash(t) not in self.dropped)
