"""Text in, text out over ``generate``: encode a prompt, stream the decoded continuation."""

from __future__ import annotations

from typing import Any, Protocol

from rich.console import Console

from lmforge.infer.generate import generate
from lmforge.infer.speculative import speculative_generate
from lmforge.models.decoder import Decoder


class HasDecoder(Protocol):
    """Anything holding a decoder and its tokenizer (``lmforge.run.LoadedModel``)."""

    model: Decoder
    tokenizer: Any  # tokenizers.Tokenizer
    eos_ids: list[int]


def stream_text(loaded: HasDecoder, prompt: str, console: Console | None, *,
                max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None, seed: int | None, eos_id: int | None,
                compile: bool = False, draft: Decoder | None = None) -> str:
    """Generate from ``prompt``; print text as it is made (if a console is given); return it.

    With a ``draft`` model (same tokenizer) the tokens come from speculative decoding.
    """
    tok = loaded.tokenizer
    ids = tok.encode(prompt).ids if prompt else []
    if not ids and eos_id is not None:
        ids = [eos_id]  # an empty prompt starts a fresh document, as in training
    out_ids: list[int] = []
    shown = ""
    stops = {*loaded.eos_ids, *([] if eos_id is None else [eos_id])}  # any of them ends it
    if draft is None:
        tokens = generate(loaded.model, ids, max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, eos_id=stops, seed=seed, compile=compile)
    else:
        tokens = speculative_generate(loaded.model, draft, ids, max_new_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      eos_id=stops, seed=seed)
    for token in tokens:
        out_ids.append(token)
        text = tok.decode(out_ids)
        # A byte-level BPE token can end mid-character; wait for the rest of it.
        if console is not None and not text.endswith("\ufffd"):
            console.print(text[len(shown):], end="", markup=False, highlight=False, soft_wrap=True)
            shown = text
    text = tok.decode(out_ids)
    if console is not None and len(text) > len(shown):
        console.print(text[len(shown):], end="", markup=False, highlight=False, soft_wrap=True)
    return text
