"""Pretraining: its options (``options``), what each objective brings (``objectives``) and
the run itself (``main``). ``lmforge pretrain`` and ``lmforge sweep`` are thin recipes over it.
"""
