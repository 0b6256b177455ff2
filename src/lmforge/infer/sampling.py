"""Choosing the next token from logits: the one sampling policy of every generator.

``SamplingParams`` says how a request samples and when it stops; ``sample`` turns logits into
token ids under it, and ``probabilities`` is the distribution ``sample`` draws from. ``generate``,
the serving engine and speculative decoding all go through these two functions, so a seeded
request draws the same tokens whichever of them runs it.

Order of operations (Hugging Face's order of logits processors and warpers): penalties on the
raw logits, then greedy argmax at temperature 0, else divide by the temperature, keep the
top-k, the top-p nucleus, tokens above min-p times the top one, and draw with the generator.

``fit_prompt`` is the one context rule of every generator (``generate``, speculative decoding,
the Python API, the engine and the server): prompt + max_tokens <= context, as in OpenAI's API,
vLLM's max_model_len and Hugging Face's max_length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.config import ConfigError

MAX_STOP = 4  # stop strings per request, as in the OpenAI API
MAX_STOP_CHARS = 256  # each is matched against the text after every token: keep that cheap


class InvalidRequest(ConfigError):
    """A sampling or request value refused: ``param`` names the field at fault (OpenAI's error
    body), and the message starts with it."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.code = param, code


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. Ranges follow the OpenAI API."""

    max_tokens: int = 16
    """Most new tokens; prompt + max_tokens must fit in the model's context (``fit_prompt``)."""
    temperature: float = 1.0
    """0 is greedy; otherwise logits are divided by it."""
    top_k: int | None = None
    """Sample among the k most likely tokens; None disables."""
    top_p: float | None = None
    """Nucleus: the smallest set of tokens whose probability reaches p, in (0, 1]."""
    min_p: float | None = None
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]."""
    repetition_penalty: float = 1.0
    """CTRL's penalty (Keskar et al. 2019) on every token seen so far, prompt included; 1 = off."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of each token already generated (-2..2)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted per earlier occurrence of a generated token (-2..2)."""
    seed: int | None = None
    """Seed of this request's own generator: the same seed gives the same text."""
    stop: tuple[str, ...] = ()
    """Strings that end the text (not included in it)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the text besides EOS (e.g. a chat template's end of turn)."""

    def check(self) -> None:
        """Raise InvalidRequest naming the first bad field."""
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequest("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        ranges = (("top_p", self.top_p, 0.0, 1.0), ("min_p", self.min_p, 0.0, 1.0),
                  ("presence_penalty", self.presence_penalty, -2.0, 2.0),
                  ("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        for name, value, lo, hi in ranges:
            if value is not None and not lo <= value <= hi:  # also rejects NaN
                raise InvalidRequest(name, f"must be between {lo:g} and {hi:g}, got {value}")
        if self.top_p is not None and self.top_p == 0.0:
            raise InvalidRequest("top_p", "must be greater than 0 (1 keeps every token)")
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise InvalidRequest("repetition_penalty",
                                 f"must be in (0, 10] (1 = off), got {self.repetition_penalty}")
        if self.max_tokens < 0:
            raise InvalidRequest("max_tokens", f"must be >= 0, got {self.max_tokens}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequest("top_k", f"must be at least 1 or null, got {self.top_k}")
        if len(self.stop) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequest("stop", f"give at most {MAX_STOP} non-empty strings of at most "
                                 f"{MAX_STOP_CHARS} characters")

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens seen so far."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def fit_prompt(ids: Sequence[int], max_tokens: int | None, context: int, *,
               truncate: bool) -> tuple[list[int], int]:
    """(prompt ids, max_tokens) of a request made to fit ``context`` positions, by one rule:
    n prompt tokens and m new ones fit when n + m <= context (so a prompt has at most
    context - 1 tokens). ``max_tokens`` None asks for all the context leaves.

    With ``truncate`` (``lmforge generate``, the Python API) m shrinks to at most
    ``context - 1`` and the prompt keeps its last ``context - m`` tokens; without it (the server,
    as OpenAI's API) a request that does not fit raises InvalidRequest (code
    context_length_exceeded) naming ``prompt`` or ``max_tokens`` and how much fits.
    An empty prompt is refused either way.
    """
    n = len(ids)
    if n == 0:
        raise InvalidRequest("prompt", "is empty; give at least one token (e.g. the tokenizer's "
                             "BOS)")
    if truncate:
        m = context - 1 if max_tokens is None else max(1, min(max_tokens, context - 1))
        return list(ids[-(context - m):]), m
    if n >= context:
        raise InvalidRequest("prompt", f"has {n} tokens but the context is {context}; shorten it",
                             "context_length_exceeded")
    room = context - n
    if max_tokens is not None and max_tokens > room:
        raise InvalidRequest(
            "max_tokens", f"the context is {context} tokens, but the prompt has {n} and "
            f"max_tokens asks for {max_tokens}; ask for at most {room}", "context_length_exceeded")
    return list(ids), room if max_tokens is None else max_tokens


# --------------------------------------------------------------------------- filters


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set all but the ``k`` largest logits of each row (B, V) to -inf; ties at the cut stay."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches ``p`` (Holtzman et al. 2019).

    A token is dropped when the mass of the tokens ranked above it already reaches ``p``;
    so the most likely token is always kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # (B, V): mass strictly before each token
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top one's (Nguyen et al. 2024)."""
    probs = logits.softmax(dim=-1)  # (B, V)
    keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))


def penalize(logits: Tensor, params: SamplingParams, prompts: Sequence[Sequence[int]],
             outputs: Sequence[Sequence[int]]) -> Tensor:
    """Logits (B, V) after the repetition (prompt + output) and presence/frequency (output)
    penalties; row b's history is ``prompts[b]`` and ``outputs[b]``."""
    logits = logits.clone()
    for row, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(output)), device=logits.device,
                                dtype=torch.long)
            picked = logits[row, seen]
            # CTRL / HF: shrink positive logits and push negative ones further down.
            logits[row, seen] = torch.where(picked > 0, picked / params.repetition_penalty,
                                            picked * params.repetition_penalty)
        if output and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(output), device=logits.device)
            counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
            logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


# --------------------------------------------------------------------------- the policy


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution (B, V), fp32, that ``sample`` draws from at a temperature above 0."""
    # fp32 so that a bf16 model's softmax and cumsum do not lose the tail of the distribution.
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p:
        logits = min_p_filter(logits, params.min_p)
    return logits.softmax(dim=-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           prompts: Sequence[Sequence[int]] | None = None,
           outputs: Sequence[Sequence[int]] | None = None) -> Tensor:
    """Next token ids (B,) from logits (B, V) under ``params``.

    ``prompts`` and ``outputs`` (one list per row) are the history the penalties need; a
    request with penalties must give them. Temperature 0 is greedy argmax (of the penalized
    logits); otherwise one draw per row from ``probabilities`` with ``generator``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if params.penalized:
        if prompts is None or outputs is None:
            raise ValueError("penalties need the prompts and outputs of every row")
        logits = penalize(logits, params, prompts, outputs)
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, params)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
