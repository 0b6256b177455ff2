"""Join the slice folders of `data prepare --num_shards K` into one dataset (no re-encoding).

Checks that the folders share one tokenizer, split rule and list of inputs and that every
slice 0..K-1 is there once, then links their shards into one folder with one manifest and one
report that adds up the slices'.
"""

from __future__ import annotations

from lmforge.data.merge import MergeConfig as Config
from lmforge.data.merge import merge

POSITIONAL = ("folders",)

EXAMPLES = """
lmforge data merge data/web-0 data/web-1 data/web-2 data/web-3 --out data/web
lmforge data merge data/web-* --out data/web
"""

__all__ = ["Config", "main"]


def main(cfg: Config) -> int:
    """Merge; print one line."""
    merge(cfg)
    return 0
