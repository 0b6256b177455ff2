"""lmforge: one readable toolkit for the whole life of a transformer language model."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``lmforge.load`` is resolved on first use, so ``import lmforge`` stays free of torch.
    if name == "load":
        from lmforge.api import load

        return load
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
