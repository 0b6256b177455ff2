"""The one training loop, its optimizer and its learning-rate schedule."""
