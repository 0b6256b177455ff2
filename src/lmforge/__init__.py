"""lmforge: one readable toolkit for the whole life of a transformer language model."""

__version__ = "0.1.0"
