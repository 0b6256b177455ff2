"""Evaluation: loss, perplexity and bits per byte for language models."""
