"""lmforge.serve: the OpenAI-compatible HTTP server (``app.py``, imported only when serving)."""
