"""Train/val/test split by document, so no document's text sits on both sides.

A document's split is a pure function of its cleaned text: its blake2b digest gives a phase
``phi`` in [0, 1), and the document is held out (val or test) when ``phi`` falls in the last
``val_fraction + test_fraction`` of the unit interval. The same document therefore lands in the
same split in every run, on every machine and in every ``--shard_index`` slice, whatever the
order of the inputs.

A document of a few hundred kilobytes (one play, one book in a ``.txt``) would make the held-out
share a coin toss on a corpus of few documents. A document longer than ``split_chars`` is
therefore cut into pieces of about that size at the first paragraph boundary (blank line; else
line end, sentence end, space) after each ``split_chars`` characters, and its pieces are held out
by *systematic sampling* with the document's phase: piece ``j`` is held out when the interval
``[phi + j*h, phi + (j+1)*h)`` holds an integer (``h`` = the held-out fraction). So every long
document gives the held-out splits its share of pieces (plus or minus one) spread along its
length, and a document of one piece is held out exactly when the rule above says so. Consecutive
pieces that land in the same split are joined back into one segment, so a cut costs one extra
document boundary per held-out piece.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

TRAIN, VAL, TEST = "train", "val", "test"
# Where a piece may end, best first: a paragraph, a line, a sentence, a word.
_BOUNDARIES = ("\n\n", "\n", ". ", " ")


def phase(text: str, salt: bytes = b"split") -> float:
    """A uniform number in [0, 1) fixed by the text (first 8 bytes of a keyed blake2b)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=salt).digest()
    return int.from_bytes(digest, "little") / 2**64


def cut_document(text: str, split_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at least ``split_chars`` characters at natural boundaries.

    Each piece ends just after a boundary found at or after ``split_chars`` characters into it
    (and before twice that), so ``"".join(pieces) == text``. A text of at most ``split_chars``
    characters is one piece.
    """
    assert split_chars > 0
    pieces, start = [], 0
    while len(text) - start > split_chars:
        lo, hi = start + split_chars, start + 2 * split_chars
        end = -1
        for sep in _BOUNDARIES:
            at = text.find(sep, lo, hi)
            if at >= 0:
                end = at + len(sep)
                break
        if end < 0:
            end = lo  # no boundary at all (one enormous token): cut anywhere
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


@dataclass(frozen=True)
class SplitRule:
    """Which split each piece of a document goes to (see the module docstring)."""

    val_fraction: float
    test_fraction: float = 0.0
    split_chars: int = 8192

    def __post_init__(self) -> None:
        assert self.val_fraction > 0 and self.test_fraction >= 0
        assert self.val_fraction + self.test_fraction < 1 and self.split_chars > 0

    def segments(self, text: str) -> list[tuple[str, str]]:
        """``[(split, text), ...]``: the document's pieces, same-split neighbours joined."""
        pieces = cut_document(text, self.split_chars)
        phi, psi = phase(text), phase(text, b"test")
        out: list[tuple[str, str]] = []
        for j, piece in enumerate(pieces):
            split = self._split_of_piece(phi, psi, j)
            if out and out[-1][0] == split:
                out[-1] = (split, out[-1][1] + piece)
            else:
                out.append((split, piece))
        return [(split, seg.strip()) for split, seg in out if seg.strip()]

    def _split_of_piece(self, phi: float, psi: float, j: int) -> str:
        held = self.val_fraction + self.test_fraction
        # Piece j is held out when [phi + j*held, phi + (j+1)*held) holds an integer n,
        # i.e. floor changes; n counts the held-out pieces of all documents with this phase.
        lo, hi = math.floor(phi + j * held), math.floor(phi + (j + 1) * held)
        if hi == lo:
            return TRAIN
        if self.test_fraction == 0:
            return VAL
        # Among the held-out pieces (numbered by hi), the same systematic rule with a second,
        # independent phase picks test with share test/held.
        r = self.test_fraction / held
        return TEST if math.floor(psi + (hi + 1) * r) > math.floor(psi + hi * r) else VAL
