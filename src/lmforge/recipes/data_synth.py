"""Write a synthetic translation task (reverse, sort or copy word sequences) as a pairs folder.

The folder holds train.jsonl and val.jsonl ({"source": ..., "target": ...} per line), a
word-level tokenizer.json and synth.json (the options and the word list); train it with
`lmforge pretrain --objective seq2seq --data <folder>`. Validation sources never occur in
training, so the end-of-run greedy exact match is on unseen sequences.
"""

from __future__ import annotations

from rich.console import Console

from lmforge.data.synth import SynthConfig as Config
from lmforge.data.synth import write_synthetic

EXAMPLES = """
lmforge data synth --task reverse --out data/reverse
lmforge data synth --task sort --out data/sort --n_words 100 --max_len 12
lmforge pretrain --objective seq2seq --data data/reverse --run reverse
"""

__all__ = ["Config", "main"]


def main(cfg: Config) -> int:
    """Write the folder and say what is in it."""
    out = write_synthetic(cfg)
    Console().print(f"wrote {out}: {cfg.n_train:,} train and {cfg.n_val:,} val pairs "
                    f"({cfg.task}, {cfg.min_len}-{cfg.max_len} of {cfg.n_words} words)")
    return 0
