"""Text in, text out: ``TextStream`` turns generated ids into final text (the server's and the
terminal's one detokenizer), ``stream_text`` encodes a prompt and streams its continuation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console

from lmforge.infer.generate import generate
from lmforge.infer.speculative import speculative_generate
from lmforge.models.decoder import Decoder


class TextStream:
    """Incremental detokenization with stop strings: ``push`` returns only text that is final.

    Text is held back while it ends in an incomplete UTF-8 character (byte-level BPE decodes
    half a character as U+FFFD) or in the beginning of a stop string, so a client never
    receives text that has to be taken back.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode, self.stop = decode, stop
        self.text = ""  # everything sent so far

    def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """(new final text, whether a stop string ended it) for all generated ``ids``."""
        full = self.decode(ids)
        if not full.startswith(self.text):  # a tokenizer that rewrites earlier text: keep ours
            full = self.text + full[len(self.text):]
        hits = [i for i in (full.find(s, len(self.text)) for s in self.stop) if i >= 0]
        if hits:
            return self._send(full[: min(hits)]), True
        end = len(full)
        if not final:
            end = len(full.rstrip("\ufffd"))
            end -= self._partial_stop(full[:end])
        return self._send(full[: max(end, len(self.text))]), False

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _send(self, upto: str) -> str:
        delta, self.text = upto[len(self.text):], upto
        return delta


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
    stream = TextStream(tok.decode, ())
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
        piece = stream.push(out_ids, final=False)[0]  # held back while a character is cut
        if console is not None and piece:
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    piece = stream.push(out_ids, final=True)[0]
    if console is not None and piece:
        console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    return stream.text
