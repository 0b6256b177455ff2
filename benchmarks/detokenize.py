"""Streaming detokenization: ``TextStream`` against decoding the whole output at every token.

A streamed completion of N tokens pushes N times. ``TextStream`` decodes a window of a few
ids per push; the peer decodes every id generated so far at every push (what lmforge did
before, and the simplest correct way), which costs O(N^2) in all. Both run on the same ids
(a run's tokenizer on pydoc text, multi-byte characters included), alternating, and must
produce the same text; CPU time per whole stream, median of the rounds.

    python benchmarks/detokenize.py --run runs/smollm2      # its tokenizer.json
"""

from __future__ import annotations

import argparse
import time

from common import Section, load_average, median
from tokenizers import Tokenizer

from lmforge.data.corpora import pydoc_topics_text
from lmforge.infer.text import TextStream

EXTRA = " 東京 café 🙂👍🏽 Ελληνικά "


def streamed(tok: Tokenizer, ids: list[int]) -> str:
    """The text ``TextStream`` sends when ``ids`` arrive one at a time."""
    s = TextStream(tok.decode, ())
    out: list[int] = []  # one growing list, as the engine keeps a request's output
    for token in ids:
        out.append(token)
        s.push(out, final=False)
    s.push(out, final=True)
    return s.text


def whole_each_time(tok: Tokenizer, ids: list[int]) -> str:
    """The peer: decode everything so far at every token, send what is new."""
    sent = ""
    for i in range(len(ids)):
        full = tok.decode(ids[: i + 1])
        end = len(full.rstrip("\ufffd"))  # hold a cut character back
        if end > len(sent):
            sent = full[:end]
    return tok.decode(ids)  # the final flush


def run(tokenizer: str, lengths: tuple[int, ...], rounds: int) -> Section:
    """The table: CPU ms per stream of each length, both ways, and the ratio."""
    tok = Tokenizer.from_file(tokenizer)
    text = EXTRA.join(t for _, t in sorted(pydoc_topics_text().items()))
    all_ids = tok.encode(text).ids
    section = Section(
        "Streaming detokenization: TextStream vs decoding the whole output per token",
        f"`{tokenizer}`; N ids of pydoc text (with CJK, accents and emoji) pushed one at a time; "
        f"CPU ms per whole stream, median of {rounds} alternating rounds.",
        ["tokens", "TextStream", "whole output per token", "speed-up"])
    before = load_average()
    for n in lengths:
        ids = all_ids[:n]
        assert streamed(tok, ids) == whole_each_time(tok, ids) == tok.decode(ids)
        got: dict[str, list[float]] = {"ours": [], "peer": []}
        for r in range(rounds):
            order = (("ours", streamed), ("peer", whole_each_time))
            for key, fn in order if r % 2 == 0 else order[::-1]:
                t = time.thread_time()
                fn(tok, ids)
                got[key].append((time.thread_time() - t) * 1e3)
        ours, peer = median(got["ours"]), median(got["peer"])
        section.rows.append([str(n), f"{ours:,.1f} ms", f"{peer:,.1f} ms", f"**{peer / ours:.1f}x**"])
        print(" | ".join(section.rows[-1]), flush=True)
    section.notes.append(f"load average (1/5/15 min) {before} before, {load_average()} after")
    return section


def main() -> None:
    """Print the table as markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run folder (its tokenizer.json)")
    ap.add_argument("--lengths", default="256,1024,4096")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    lengths = tuple(int(n) for n in args.lengths.split(","))
    print(run(f"{args.run}/tokenizer.json", lengths, args.rounds).markdown())


if __name__ == "__main__":
    main()
