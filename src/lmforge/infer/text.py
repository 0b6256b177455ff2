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

    Each push decodes a small window of the newest ids, not the whole output (which made
    streaming quadratic in its length): the window starts a few tokens back (``_prefix``), at
    the token that ended the last complete text (``_read``), and the new text is the window's
    decoding minus that of its head, as in TGI's ``decode_token`` and vLLM's
    ``detokenize_incrementally``. Decoding the head along with the new tokens keeps what
    depends on context right: a SentencePiece space, a character split across tokens.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode, self.stop = decode, stop
        self._sent: list[str] = []  # every piece returned so far
        self._held = ""  # final text held back: it may begin a stop string
        self._prefix = self._read = 0  # window start; end of the ids whose text is out
        self._ahead = 0  # characters after the head's text already out (before a cut char)

    @property
    def text(self) -> str:
        """Everything sent so far."""
        return "".join(self._sent)

    def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """(new final text, whether a stop string ended it) for all generated ``ids`` (the
        same growing list each time: only the ids since the last push are new)."""
        held = self._held + self._new_text(ids, final)
        hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self._send(held[: min(hits)], ""), True
        keep = 0 if final else self._partial_stop(held)
        return self._send(held[: len(held) - keep], held[len(held) - keep:]), False

    def _new_text(self, ids: list[int], final: bool) -> str:
        """Text of ``ids`` not returned before, up to the last complete character (all of it
        when ``final``); decodes ids[_prefix:] only."""
        assert len(ids) >= self._read, "push the same growing list of ids"
        head = self.decode(ids[self._prefix : self._read])
        window = self.decode(ids[self._prefix :])
        start = len(head) + self._ahead
        if not final and window.endswith("\ufffd"):  # a character still cut: send up to it
            end = max(len(window.rstrip("\ufffd")), start)
            self._ahead += end - start
            return window[start:end]
        self._prefix, self._read, self._ahead = self._read, len(ids), 0
        return window[start:]

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _send(self, out: str, held: str) -> str:
        self._held = held
        if out:
            self._sent.append(out)
        return out


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
