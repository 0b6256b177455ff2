"""Preallocated key/value caches for decoding, and the causal masks they need.

Two caches share one interface: ``KVCache`` (rows of one length: generate) and ``RowKVCache``
(rows of their own lengths: continuous batching). Shapes: B batch, T new tokens, S attended
positions, G = key/value heads, D = head_dim; each layer has its own (B, G, S, D) buffers.

A sliding-window layer (Mistral's ``sliding_window``, Gemma's ``local_layers``) keeps at most
``window + rollback`` positions: a ring buffer where position p lives in slot p % size
(transformers' ``StaticSlidingWindowLayer`` keeps the same bound by rolling its buffer instead).
A sequence writes its positions in order from 0, so the position a slot holds follows from the
position of the last write (``ring_positions``): the masks need no Python state and the
one-token decode step keeps fixed shapes, as torch.compile wants. A chunk of T > 1
new tokens would overwrite keys its own first queries still need, so it attends over the ring
as it was followed by the chunk, then writes the chunk's last positions into the ring (as
transformers does for a prefill past the window). ``rollback`` is how many positions a caller
may cut back (speculative decoding): the ring keeps that many more, so a cut never loses a key
the window still needs. Full-attention layers keep every position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def causal_mask(T: int, past: int, window: int | None, device: torch.device) -> Tensor | None:
    """Boolean (T, past+T) mask letting query i see keys 0..past+i, or None when not needed.

    SDPA's ``is_causal`` aligns the triangle to the top-left corner, which is wrong once there
    are cached keys (query 0 must see all ``past`` of them), so chunks after a prefill need an
    explicit bottom-right-aligned mask. A single new token may see everything. A sliding
    ``window`` also hides keys window or more positions back (HF Mistral: j > i - window).
    """
    n_keys = past + T
    if window is None or n_keys <= window:  # the window cuts nothing off
        if past == 0 or T == 1:
            return None
        return torch.ones(T, n_keys, dtype=torch.bool, device=device).tril(diagonal=past)
    i = torch.arange(past, n_keys, device=device)[:, None]  # (T, 1) absolute query positions
    j = torch.arange(n_keys, device=device)[None, :]  # (1, S) key positions
    return (j <= i) & (j > i - window)  # (T, S)


def ring_positions(last: Tensor, size: int, slots: int) -> Tensor:
    """The position each slot 0..slots-1 of a ring of ``size`` holds once position ``last``
    (...,) has been written, (..., slots); negative where nothing was written yet."""
    s = torch.arange(slots, device=last.device)
    return last[..., None] - torch.remainder(last[..., None] - s, size)


def visible(keys: Tensor, queries: Tensor, window: int | None) -> Tensor:
    """Bool (..., T, S): which key positions (..., S) each query position (..., T) attends to
    (written, not after it, and inside the window)."""
    j, i = keys[..., None, :], queries[..., :, None]
    mask = (j >= 0) & (j <= i)
    if window is not None:
        mask = mask & (j > i - window)
    return mask


def ring_size(window: int | None, max_len: int, rollback: int) -> int:
    """Positions a layer keeps: all ``max_len`` for full attention, else the window and the
    positions a caller may roll back (never more than ``max_len``)."""
    return max_len if window is None else min(max_len, window + rollback)


def _layer_windows(n_layer: int, windows: Sequence[int | None] | None) -> list[int | None]:
    if windows is None:
        return [None] * n_layer
    assert len(windows) == n_layer, (len(windows), n_layer)
    return list(windows)


def _ring_sizes(windows: Sequence[int | None], max_len: int, rollback: int) -> dict[int | None, int]:
    """Slots per row for each window the layers have (a window no layer has: max_len)."""
    return {w: ring_size(w, max_len, rollback) for w in windows}


class KVCache:
    """Static keys and values of every layer, written at explicit positions (gpt-fast's cache).

    ``k[layer]``/``v[layer]`` are (B, G, size, D): size = max_len for a full-attention layer,
    at most window + rollback for a sliding one (``ring_size``). The model writes the new tokens
    of each layer at their positions ``input_pos`` (T,) and attends over the whole buffer under
    a (T, S) mask (``mask``), so every decode step has the same shapes and can be compiled.
    Slots nobody wrote hold zeros and are masked out. ``length`` counts the filled positions for
    callers that let the model continue where the cache ends (no ``input_pos``); rolling it back
    by up to ``rollback`` positions (speculative decoding) is enough to forget tokens, as a query
    never sees keys after its own position.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        windows: Sequence[int | None] | None = None,
        rollback: int = 0,
    ) -> None:
        self.max_len = max_len
        layer_windows = _layer_windows(n_layer, windows)
        self.sizes = _ring_sizes(layer_windows, max_len, rollback)
        self.k = [torch.zeros((batch, n_kv_head, self.sizes[w], head_dim), dtype=dtype,
                              device=device) for w in layer_windows]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.length = 0

    @property
    def batch(self) -> int:
        """Batch size the cache was allocated for."""
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the keys and values of all layers."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def update(self, layer: int, k: Tensor, v: Tensor,
               input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Write new k, v (B, G, T, D) at positions ``input_pos`` (T,); return the keys and
        values (B, G, S, D) the layer attends to, in the order of ``mask``'s columns."""
        keys, values = self.k[layer], self.v[layer]
        size, T = keys.shape[2], k.shape[2]
        if size == self.max_len:  # nothing wraps: slot = position
            keys.index_copy_(2, input_pos, k)
            values.index_copy_(2, input_pos, v)
            return keys, values
        if T == 1:
            slot = torch.remainder(input_pos, size)
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            return keys, values
        out = torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2)  # (B, G, size+T, D)
        n = min(T, size)
        slots = torch.remainder(input_pos[-n:], size)
        keys.index_copy_(2, slots, k[:, :, -n:])
        values.index_copy_(2, slots, v[:, :, -n:])
        return out

    def mask(self, input_pos: Tensor, window: int | None) -> Tensor:
        """Bool (T, S): the query at position p sees keys j <= p (and j > p - window)."""
        size, T = self.sizes.get(window, self.max_len), input_pos.shape[0]
        if size == self.max_len:
            keys = torch.arange(size, device=input_pos.device)  # (S,)
        elif T == 1:
            keys = ring_positions(input_pos[0], size, size)  # (size,) after the write
        else:  # the ring before the chunk, then the chunk
            keys = torch.cat((ring_positions(input_pos[0] - 1, size, size), input_pos))
        return visible(keys, input_pos, window)

    def reset(self) -> None:
        """Forget every position (the buffers are reused as they are)."""
        self.length = 0

    def next_positions(self, T: int) -> Tensor:
        """Positions (T,) of T tokens after the filled ones."""
        return torch.arange(self.length, self.length + T, device=self.k[0].device)

    def end(self, T: int) -> int:
        """Filled positions after T more tokens."""
        return self.length + T

    def advance(self, T: int) -> None:
        """Count the T tokens every layer has just written."""
        self.length += T


class PastKVCache(KVCache):
    """Keys and values that come in as tensors and go out as new ones, nothing written in place:
    the past/present form of an exported graph (Hugging Face Optimum's ``past_key_values``).

    ``past`` holds k, v of every layer in turn, each (B, G, P, D), or is None (no past: a plain
    forward with an explicit mask). After a forward, ``present`` holds the same list with the T
    new positions appended. The model takes it through the same code as a ``KVCache`` (the
    same forward, so ONNX export needs no copy of it); only ``update`` and ``mask`` differ.
    """

    def __init__(self, past: Sequence[Tensor] | None) -> None:
        self.past = None if past is None else list(past)
        self.present: list[Tensor] = []
        self.length = 0

    @property
    def batch(self) -> int:
        """Unknown until the keys arrive: the input decides."""
        return -1

    def update(self, layer: int, k: Tensor, v: Tensor,
               input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, G, P+T, D): the layer's past with the new (B, G, T, D) appended."""
        if self.past is not None:
            k = torch.cat((self.past[2 * layer], k), dim=2)
            v = torch.cat((self.past[2 * layer + 1], v), dim=2)
        self.present += [k, v]
        return k, v

    def mask(self, input_pos: Tensor, window: int | None) -> Tensor:
        """Bool (T, P+T), bottom-right aligned: the query at position p sees keys j <= p."""
        n_keys = input_pos.shape[0] + (0 if self.past is None else self.past[0].shape[2])
        return visible(torch.arange(n_keys, device=input_pos.device), input_pos, window)


class RowKVCache:
    """A KV cache whose rows are independent sequences, each with its own fill length.

    For continuous batching: a request takes a free row while the others are mid-sequence.
    Row b's new tokens go to [lengths[b], lengths[b]+T), and an explicit (B, 1, T, S) mask hides
    the positions a row has not filled (stale keys of an earlier request), so rows never need
    padding or reshuffling. When every row has the same length (one row, say) it does exactly
    what ``KVCache`` does: slice writes and no mask. ``rows(start, stop)`` is a view sharing the
    buffers and lengths: a new request is prefilled alone, the active rows decode together.

    The buffers start at ``reserve`` positions per row (default all ``max_len``) and ``grow``
    on demand, doubling up to ``max_len``: a server of an 8k-context model holds the positions
    its requests use, not batch x 8k from the start. A sliding layer stops growing at its ring
    size (window + rollback, see the module docstring).
    """

    nbytes = KVCache.nbytes

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 reserve: int | None = None, windows: Sequence[int | None] | None = None,
                 rollback: int = 0):
        self.max_len = max_len  # positions a row may reach
        self.windows = _layer_windows(n_layer, windows)
        self.sizes = _ring_sizes(self.windows, max_len, rollback)
        self.capacity = max_len if reserve is None else max(1, min(reserve, max_len))
        """Positions per row allocated now for full-attention layers (at most ``max_len``)."""
        self.k = [torch.zeros((batch, n_kv_head, self._slots(layer), head_dim), dtype=dtype,
                              device=device) for layer in range(n_layer)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self._span: tuple[int, int] | None = None  # per-forward memos, the same for every layer
        self._mask: dict[int | None, Tensor | None] = {}  # per sliding window (Gemma: two)

    @property
    def batch(self) -> int:
        """Rows (of this view)."""
        return self.lengths.shape[0]

    @property
    def grown_nbytes(self) -> int:
        """Bytes of keys and values once grown to ``max_len`` (sliding layers to their ring)."""
        return sum(2 * k.numel() // k.shape[2] * self._size(w) * k.element_size()
                   for k, w in zip(self.k, self.windows))

    def _size(self, window: int | None) -> int:
        return self.sizes.get(window, self.max_len)

    def _slots(self, layer: int) -> int:
        """Slots per row allocated for ``layer`` at the current capacity."""
        return min(self.capacity, self._size(self.windows[layer]))

    def rows(self, start: int, stop: int) -> RowKVCache:
        """A view of rows [start, stop); writes through it land in this cache."""
        view = RowKVCache.__new__(RowKVCache)
        view.max_len, view.windows, view.sizes = self.max_len, self.windows, self.sizes
        view.capacity = self.capacity
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.lengths = self.lengths[start:stop]  # a view too: advance() updates ours in place
        view._span, view._mask = None, {}
        return view

    def grow(self, needed: int) -> None:
        """Make room for ``needed`` positions per row (doubling, up to max_len); the filled
        positions are copied over. Call on the cache itself, before taking views of it."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ValueError(f"KV cache full: {needed} positions > max_len {self.max_len}")
        self.capacity = min(self.max_len, max(needed, 2 * self.capacity))
        for buffers in (self.k, self.v):
            for layer, old in enumerate(buffers):
                slots = self._slots(layer)
                if slots > old.shape[2]:  # a ring that reached its size is full grown
                    new = old.new_zeros((*old.shape[:2], slots, old.shape[3]))
                    new[:, :, : old.shape[2]] = old
                    buffers[layer] = new

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` (keys, values, length) into row ``dst``."""
        for buf in (*self.k, *self.v, self.lengths):  # the row is dim 0 of each
            buf[dst] = buf[src]

    def span(self) -> tuple[int, int]:
        """(shortest, longest) row length, read once per forward (one device sync)."""
        if self._span is None:
            lo, hi = torch.aminmax(self.lengths) if self.batch else (0, 0)
            self._span = (int(lo), int(hi))
        return self._span

    def positions(self, T: int) -> slice | Tensor:
        """Positions of the next T tokens: a slice if all rows agree, else (B, T)."""
        lo, hi = self.span()
        if lo == hi:
            return slice(lo, lo + T)
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def _wraps(self, T: int, size: int) -> bool:
        """Whether T new tokens pass the end of a ring of ``size`` in some row."""
        return self.span()[1] + T > size

    def attn_mask(self, T: int, window: int | None, device: torch.device) -> Tensor | None:
        """Bool (B, 1, T, S) or (T, S): query t of row b sees keys j <= lengths[b]+t (and the
        window), in the order ``update`` returns them; None when it sees them all."""
        if window in self._mask:
            return self._mask[window]
        lo, hi = self.span()
        size = self._size(window)
        uniform = self.lengths[:1] if lo == hi else self.lengths  # (1,) or (B,)
        queries = uniform[:, None] + torch.arange(T, device=device)  # (1, T) or (B, T)
        mask: Tensor | None
        if not self._wraps(T, size) and lo == hi:  # slot = position
            mask = causal_mask(T, lo, window, device)
        elif not self._wraps(T, size):
            mask = visible(torch.arange(hi + T, device=device), queries, window)[:, None]
        elif T == 1:
            if lo == hi and size <= (window or 0):
                mask = None  # a full ring of exactly the window: every slot is in view
            else:
                keys = ring_positions(uniform, size, size)  # (B, size) after the write
                mask = visible(keys, queries, window)[:, None]  # (B, 1, 1, size)
        else:  # the used part of the ring before the chunk, then the chunk
            before = ring_positions(uniform - 1, size, min(hi, size))  # (B, <=size)
            mask = visible(torch.cat((before, queries), dim=1), queries, window)[:, None]
        self._mask[window] = mask
        return mask

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new k, v (B, G, T, D) at each row's positions; return (B, G, S, D) so far."""
        keys, values = self.k[layer], self.v[layer]
        T, hi = k.shape[2], self.span()[1]
        size = self._size(self.windows[layer])
        if not self._wraps(T, size):  # slot = position
            self._write(keys, values, k, v, self.positions(T))
            return keys[:, :, : hi + T], values[:, :, : hi + T]
        if T == 1:
            self._write(keys, values, k, v, self._ring_slots(self.positions(1), size))
            return keys, values
        used = min(hi, size)
        out = (torch.cat((keys[:, :, :used], k), dim=2),  # (B, G, used+T, D)
               torch.cat((values[:, :, :used], v), dim=2))
        n = min(T, size)
        last = self.positions(T)
        last = slice(last.start + T - n, last.stop) if isinstance(last, slice) else last[:, -n:]
        self._write(keys, values, k[:, :, -n:], v[:, :, -n:], self._ring_slots(last, size))
        return out

    def _ring_slots(self, pos: slice | Tensor, size: int) -> Tensor:
        """Ring slots (T,) or (B, T) of positions given as a slice or (B, T)."""
        if isinstance(pos, slice):
            pos = torch.arange(pos.start, pos.stop, device=self.lengths.device)
        return torch.remainder(pos, size)

    @staticmethod
    def _write(keys: Tensor, values: Tensor, k: Tensor, v: Tensor, at: slice | Tensor) -> None:
        """Write k, v (B, G, T, D) into slots ``at``: a slice, (T,) for all rows, or (B, T)."""
        if isinstance(at, slice):
            keys[:, :, at], values[:, :, at] = k, v
        elif at.dim() == 1:
            keys.index_copy_(2, at, k)
            values.index_copy_(2, at, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            # Advanced indices split by a slice come first: the indexed view is (B, T, G, D).
            keys[rows, :, at] = k.transpose(1, 2)
            values[rows, :, at] = v.transpose(1, 2)

    def end(self, T: int) -> int:
        """Positions the longest row has filled after T more tokens."""
        return self.span()[1] + T

    def advance(self, T: int) -> None:
        """Count the T tokens every layer has just written, in every row."""
        self.lengths += T
        self._span, self._mask = None, {}
