"""Continuous batching: many generation requests share one model and one KV cache.

The engine owns ``max_batch`` slots, the rows of a ``RowKVCache``. One ``step()``:

1. drops cancelled requests (queued or running), freeing their slots at once;
2. admits queued requests into free slots: each prompt is prefilled alone into its own row
   and its first token sampled, so a newcomer never waits for the running ones to finish;
3. decodes every running row together, one token each (B = running, T = 1), each row
   sampled with its own parameters and its own ``torch.Generator``;
4. lets finished requests (EOS, a stop token or string, max_tokens) leave: the last running
   row moves into the freed slot, so the running rows are always 0..n-1, a contiguous view of
   the cache (no gather per step).

Rows have their own lengths and an explicit attention mask (see ``RowKVCache``), so a request's
greedy output is the same whether it runs alone or beside others that joined at other times.

Results stream as ``Event``s: to a ``sink`` callback (the server hands them to its event loop)
or, by default, to a queue that iterating the ``Handle`` drains. ``start()`` runs the steps in
one background thread; without it, iterating a handle runs steps in the caller's thread.
"""

from __future__ import annotations

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
from lmforge.infer.sampling import InvalidRequest, SamplingParams, sample
from lmforge.infer.text import TextStream
from lmforge.models.decoder import Decoder

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
    running request needs them (doubling).
    """

    def __init__(self, model: Decoder, decode: Callable[[list[int]], str], *,
                 eos_id: int | None, stop_ids: Collection[int] = (), max_batch: int = 8,
                 max_queue: int = 64,
                 max_len: int | None = None) -> None:
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
        self.cache = model.new_row_cache(max_batch, max_len, reserve=INITIAL_POSITIONS)
        self.context = self.cache.max_len  # positions a request may use
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
        """Raise InvalidRequest unless the prompt is valid ids and prompt + max_tokens fit."""
        vocab, n = self.model.cfg.vocab_size, len(prompt_ids)
        if n == 0:
            raise InvalidRequest("prompt", "is empty; give at least one token")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequest("prompt", f"token ids must be in [0, {vocab})")
        if n >= self.context:
            raise InvalidRequest("prompt", f"has {n} tokens but the context is {self.context}; "
                                 "shorten it", "context_length_exceeded")
        if n + max_tokens > self.context:
            raise InvalidRequest(
                "max_tokens", f"the context is {self.context} tokens, but the prompt has {n} "
                f"and max_tokens asks for {max_tokens}; ask for at most {self.context - n}",
                "context_length_exceeded")

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
        while len(self._running) < self.max_batch:
            with self._cond:
                if not self._queue:
                    break
                seq = self._queue.popleft()
            row = len(self._running)
            self.cache.grow(len(seq.prompt))
            self.cache.lengths[row] = 0
            self._running.append(seq)
            idx = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)  # (1, T)
            logits = self.model(idx, self.cache.rows(row, row + 1), last=True)[:, -1]  # (1, V)
            self._accept(seq, self._choose(logits, [seq])[0])
        self._release()

    def _decode(self) -> None:
        if not self._running:
            return
        n = len(self._running)
        self.cache.grow(max(len(s.prompt) + len(s.output) for s in self._running))
        idx = torch.tensor([[s.next_token] for s in self._running], device=self.device)  # (B, 1)
        logits = self.model(idx, self.cache.rows(0, n))[:, -1]  # (B, V)
        for seq, token in zip(self._running, self._choose(logits, self._running)):
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
                self._running[i] = self._running[last]
            self._running.pop()

    def _fail_all(self, exc: Exception) -> None:
        with self._cond:
            seqs = [*self._queue, *self._running]
            self._queue.clear()
        for seq in seqs:
            self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        self._running.clear()

