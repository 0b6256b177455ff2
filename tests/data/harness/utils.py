"""Rows of the lmforge_mc harness task, read from the JSONL files beside this file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load(**kwargs: Any) -> Any:
    """{"train": 5 rows (few-shot examples), "test": 20 rows} as a datasets.DatasetDict."""
    import datasets

    here = Path(__file__).parent
    splits = {}
    for split in ("train", "test"):
        lines = (here / f"lmforge_mc_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        splits[split] = datasets.Dataset.from_list([json.loads(x) for x in lines if x.strip()])
    return datasets.DatasetDict(splits)
