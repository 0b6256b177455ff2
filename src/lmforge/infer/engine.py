"""Continuous batching: many generation requests share one model and one KV cache.

The engine owns ``max_batch`` slots, the rows of a ``RowKVCache``. One ``step()``:

1. drops cancelled requests (queued or running), freeing their slots at once;
2. admits queued requests into free slots: each prompt is prefilled into its own row (those
   of one length together) and its first token sampled, so a newcomer never waits for the
   running ones to finish;
3. decodes every running row together, one token each (B = running, T = 1), each row
   sampled with its own parameters and its own ``torch.Generator``;
4. lets finished requests (EOS, a stop token or string, max_tokens) leave: the last running
   row moves into the freed slot, so the running rows are always 0..n-1, a contiguous view of
   the cache (no gather per step).

Rows have their own lengths and an explicit attention mask (see ``RowKVCache``), so a request's
greedy output is the same whether it runs alone or beside others that joined at other times.

With a ``draft`` model (speculative decoding), step 3 is one ``speculate_rows`` round instead:
the draft proposes up to ``draft_tokens`` tokens for every running row, the target checks all
rows in one forward, and each row keeps its own accepted prefix plus one token (1 to k+1
tokens per step). The draft keeps a ``RowKVCache`` of its own, row for row beside the target's.
Greedy output is the target's greedy output; sampled output has the target's distribution.
Penalties depend on every earlier token and are refused with a draft.

Results stream as ``Event``s: to a ``sink`` callback (the server hands them to its event loop)
or, by default, to a queue that iterating the ``Handle`` drains. ``start()`` runs the steps in
one background thread; without it, iterating a handle runs steps in the caller's thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.config import UserError
from lmforge.infer.sampling import InvalidRequest, SamplingParams, fit_prompt, sample
from lmforge.infer.speculative import SpecStats, check_draft, speculate_rows
from lmforge.infer.text import TextStream
from lmforge.models.decoder import Decoder
from lmforge.models.kv_cache import RowKVCache

log = logging.getLogger(__name__)
INITIAL_POSITIONS = 256  # KV positions per slot allocated at the start; more as requests need


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``; the caller should retry later (HTTP 429)."""


def check_request(params: SamplingParams) -> None:
    """``params.check()`` and the OpenAI API's narrower limits: temperature <= 2, a token."""
    params.check()
    if params.temperature > 2.0:
        raise InvalidRequest("temperature", f"must be between 0 and 2, got {params.temperature}")
    if params.max_tokens < 1:
        raise InvalidRequest("max_tokens", f"must be at least 1, got {params.max_tokens}")


@dataclass
class Event:
    """What one request produced since its last event; the last one has a finish_reason."""

    text: str
    """New text (may be empty while a character or a possible stop string is incomplete)."""
    token_ids: list[int]
    """New token ids (EOS and stop tokens excluded)."""
    finish_reason: str | None = None
    """None while running, then "stop", "length", "cancelled" or "error"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens generated so far, the one that stopped it included."""
    error: str | None = None
    """What went wrong, when finish_reason is "error"."""


@dataclass
class Completion:
    """A finished request, collected from its events."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


# --------------------------------------------------------------------------- requests


class Handle:
    """A submitted request: iterate it for its events, or ``cancel()`` it (frees its slot)."""

    def __init__(self, engine: Engine, request_id: str, prompt_tokens: int,
                 sink: Callable[[Event], None] | None) -> None:
        self.id, self.prompt_tokens, self._engine = request_id, prompt_tokens, engine
        self._events: queue.Queue[Event] | None = queue.Queue() if sink is None else None
        self._sink = sink if sink is not None else self._events.put  # type: ignore[union-attr]
        self.cancelled = False

    def cancel(self) -> None:
        """Stop this request at the next step; its last event says "cancelled"."""
        self.cancelled = True
        self._engine.wake()

    def emit(self, event: Event) -> None:
        """Deliver one event (called by the engine); a failing sink cancels the request."""
        try:
            self._sink(event)
        except Exception:  # e.g. the server's event loop is gone: nobody is listening any more
            log.debug("sink of request %s failed; cancelling it", self.id, exc_info=True)
            self.cancelled = True

    def __iter__(self) -> Iterator[Event]:
        if self._events is None:
            raise TypeError("this request streams to its sink; it cannot be iterated")
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                if self._engine.running:
                    event = self._events.get()
                else:  # no engine thread: drive the engine from here
                    self._engine.step()
                    continue
            yield event
            if event.finish_reason is not None:
                return

    def result(self) -> Completion:
        """Wait for the end and collect the text, tokens and finish reason."""
        texts: list[str] = []
        ids: list[int] = []
        for event in self:
            texts.append(event.text)
            ids += event.token_ids
            if event.finish_reason == "error":
                raise RuntimeError(f"generation failed: {event.error}")
        return Completion("".join(texts), ids, event.finish_reason or "", self.prompt_tokens,
                          event.completion_tokens)


@dataclass
class _Seq:
    """Engine-side state of one request."""

    handle: Handle
    prompt: list[int]
    params: SamplingParams
    text: TextStream
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    next_token: int = -1  # sampled, not yet fed to the model
    finished: str | None = None


# --------------------------------------------------------------------------- engine


class Engine:
    """A continuous-batching scheduler over ``max_batch`` slots of one preallocated KV cache.

    Each slot holds up to ``max_len`` positions (prompt + answer; default the model's
    block_size): at most max_batch x max_len x n_layer x 2 x n_kv_head x head_dim values, of
    which ``INITIAL_POSITIONS`` per slot are allocated at the start and the rest as the longest
    running request needs them (doubling). ``draft`` (same tokenizer) turns on speculative
    decoding with ``draft_tokens`` proposals per row and step; ``spec`` counts them.
    """

    def __init__(self, model: Decoder, decode: Callable[[list[int]], str], *,
                 eos_id: int | None, stop_ids: Collection[int] = (), max_batch: int = 8,
                 max_queue: int = 64, max_len: int | None = None,
                 draft: Decoder | None = None, draft_tokens: int = 4) -> None:
        if model.training:
            raise ValueError("call model.eval() before serving")
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, "
                            f"{max_queue}")
        self.model, self.decode, self.eos_id = model, decode, eos_id
        self.stop_ids = frozenset(stop_ids)  # the model's other EOS ids (Llama 3 has several)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.tok_emb.weight.device
        # Positions grow on demand (doubling): no batch x context preallocation up front.
        rollback = 0 if draft is None else draft_tokens  # a round cuts back up to k positions
        self.cache = model.new_row_cache(max_batch, max_len, reserve=INITIAL_POSITIONS,
                                         rollback=rollback)
        self.context = self.cache.max_len  # positions a request may use
        self.draft, self.draft_tokens, self.spec = draft, draft_tokens, SpecStats()
        self.draft_cache: RowKVCache | None = None
        if draft is not None:
            check_draft(model, draft, draft_tokens)
            self.draft_cache = draft.new_row_cache(max_batch, self.context,
                                                   reserve=INITIAL_POSITIONS, rollback=rollback)
            self.context = self.draft_cache.max_len  # the smaller of the two contexts
        self._queue: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # index = cache row; touched only by the stepping thread
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ----------------------------------------------------------------- public

    @property
    def running(self) -> bool:
        """Whether a background thread is stepping the engine."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._queue)

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return len(self._running)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[Event], None] | None = None,
               request_id: str | None = None) -> Handle:
        """Queue a request; raise InvalidRequest for bad input, QueueFull when the queue is full."""
        check_request(params)
        if self.draft is not None and params.penalized:
            name = next(n for n, off in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                                         ("frequency_penalty", 0.0)) if getattr(params, n) != off)
            raise InvalidRequest(name, "penalties are not supported by a server with a draft "
                                 "model (speculative decoding); leave it at its default",
                                 "unsupported")
        self.check_prompt(prompt_ids, params.max_tokens)
        handle = Handle(self, request_id or uuid.uuid4().hex, len(prompt_ids), sink)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed % 2**64)
        seq = _Seq(handle, list(prompt_ids), params, TextStream(self.decode, params.stop),
                   generator)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine has been stopped")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting; retry later")
            self._queue.append(seq)
            self._cond.notify()
        return handle

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Raise InvalidRequest unless the prompt is valid ids and prompt + max_tokens fit
        (``fit_prompt`` without truncation: a request is served as sent or refused)."""
        fit_prompt(prompt_ids, max_tokens, self.context, truncate=False)
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest("prompt", f"token ids must be in [0, {vocab})")

    def start(self) -> None:
        """Run the scheduler in a background thread until ``stop()``."""
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; requests still queued or running end "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in [*self._queue, *self._running]:
            self._finish(seq, "cancelled")
        self._queue.clear()
        self._running.clear()

    def wake(self) -> None:
        """Have a waiting scheduler look at its requests again (after a cancel)."""
        with self._cond:
            self._cond.notify_all()

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler iteration; True while requests are queued or running."""
        self._drop_cancelled()
        self._admit()
        self._decode()
        return bool(self._running or self._queue)

    # ----------------------------------------------------------------- scheduling

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._queue or self._running):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # one bad step must not take the server down with it
                log.exception("engine step failed; failing the requests it held")
                self._fail_all(e)

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = [s for s in self._queue if s.handle.cancelled]
            for seq in dropped:
                self._queue.remove(seq)
        for seq in dropped + [s for s in self._running if s.handle.cancelled]:
            self._finish(seq, "cancelled")
        self._release()

    def _admit(self) -> None:
        """Give queued requests the free slots; prefill them, newcomers of one prompt length in
        one forward (rows of equal lengths need no mask), and sample each one's first token."""
        new: list[_Seq] = []
        with self._cond:
            while self._queue and len(self._running) + len(new) < self.max_batch:
                new.append(self._queue.popleft())
        if not new:
            return
        new.sort(key=lambda s: len(s.prompt))
        start = len(self._running)
        self._running += new
        self._grow(len(new[-1].prompt))
        for _, same in itertools.groupby(new, key=lambda s: len(s.prompt)):
            seqs = list(same)
            stop = start + len(seqs)
            idx = torch.tensor([s.prompt for s in seqs], device=self.device)  # (G, T)
            self.cache.lengths[start:stop] = 0
            logits = self.model(idx, self.cache.rows(start, stop), last=True)[:, -1]  # (G, V)
            if self.draft is not None and self.draft_cache is not None:  # keys only, no head
                self.draft_cache.lengths[start:stop] = 0
                self.draft(idx, self.draft_cache.rows(start, stop), last=True, hidden=True)
            for seq, token in zip(seqs, self._choose(logits, seqs)):
                self._accept(seq, token)
            start = stop
        self._release()

    def _grow(self, needed: int) -> None:
        """Room for ``needed`` positions per row in the KV cache(s)."""
        self.cache.grow(needed)
        if self.draft_cache is not None:
            self.draft_cache.grow(needed)

    def _decode(self) -> None:
        if not self._running:
            return
        if self.draft is not None:
            self._speculate()
            return
        n = len(self._running)
        self._grow(max(len(s.prompt) + len(s.output) for s in self._running))
        idx = torch.tensor([[s.next_token] for s in self._running], device=self.device)  # (B, 1)
        logits = self.model(idx, self.cache.rows(0, n))[:, -1]  # (B, V)
        for seq, token in zip(self._running, self._choose(logits, self._running)):
            self._accept(seq, token)
        self._release()

    def _speculate(self) -> None:
        """A decode step by speculation: 1 to k+1 tokens for every running row."""
        assert self.draft is not None and self.draft_cache is not None
        seqs, n = self._running, len(self._running)
        ends = [len(s.prompt) + len(s.output) for s in seqs]  # positions after the last token
        k = max(0, min(self.draft_tokens, self.context - max(ends)))  # all k+1 fed must fit
        self._grow(max(ends) + k)
        news = speculate_rows(self.model, self.draft, self.cache.rows(0, n),
                              self.draft_cache.rows(0, n), [s.next_token for s in seqs], k,
                              [s.params for s in seqs], [s.generator for s in seqs], self.spec)
        for seq, tokens in zip(seqs, news):
            for token in tokens:
                if seq.finished is None:
                    self._accept(seq, token)
        self._release()

    def _choose(self, logits: Tensor, seqs: list[_Seq]) -> list[int]:
        """Next token of every row of ``logits`` (B, V), each with its request's parameters."""
        greedy = logits.argmax(dim=-1).tolist()  # one batched argmax for the common case
        tokens = []
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.temperature == 0.0 and not p.penalized:
                tokens.append(greedy[row])
                continue
            token = sample(logits[row : row + 1], p, seq.generator, [seq.prompt], [seq.output])
            tokens.append(int(token))
        return tokens

    def _accept(self, seq: _Seq, token: int) -> None:
        """Record a sampled token: stream its text, or finish the request."""
        p = seq.params
        if token == self.eos_id or token in self.stop_ids or token in p.stop_token_ids:
            self._finish(seq, "stop", counted=1)
            return
        seq.output.append(token)
        text, hit = seq.text.push(seq.output, final=False)
        if hit:
            self._finish(seq, "stop", text=text, ids=[token])
        elif len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) > self.context:
            rest = seq.text.push(seq.output, final=True)[0]  # nothing more will come: flush
            self._finish(seq, "length", text=text + rest, ids=[token])
        else:
            seq.next_token = token
            seq.handle.emit(Event(text, [token], None, len(seq.prompt), len(seq.output)))

    def _finish(self, seq: _Seq, reason: str, *, text: str | None = None,
                ids: list[int] | None = None, counted: int = 0, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = reason
        if text is None:  # flush what was held back for a possible stop string
            text = seq.text.push(seq.output, final=True)[0] if seq.output else ""
        seq.handle.emit(Event(text, ids or [], reason, len(seq.prompt),
                              len(seq.output) + counted, error))

    def _release(self) -> None:
        """Free the slots of finished requests, moving the last running row into each hole."""
        i = 0
        while i < len(self._running):
            if self._running[i].finished is None:
                i += 1
                continue
            last = len(self._running) - 1
            if i != last:
                self.cache.move_row(last, i)
                if self.draft_cache is not None:
                    self.draft_cache.move_row(last, i)
                self._running[i] = self._running[last]
            self._running.pop()

    def _fail_all(self, exc: Exception) -> None:
        with self._cond:
            seqs = [*self._queue, *self._running]
            self._queue.clear()
        for seq in seqs:
            self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        self._running.clear()

