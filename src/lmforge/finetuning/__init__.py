"""Fine-tuning: its options (``options``), what chat and classification share (``common``),
the two tasks (``chat``, ``classify``) and the entry point (``main``). ``lmforge finetune`` is a
thin recipe over it; the training-side pieces (adaptation, resumable checkpoints) are in
``lmforge.train.finetune``.
"""
