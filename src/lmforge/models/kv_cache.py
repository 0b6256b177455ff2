"""Preallocated key/value caches for decoding, and the causal mask they need.

Two caches share one interface: ``KVCache`` (rows of one length: generate) and ``RowKVCache``
(rows of their own lengths: continuous batching). Shapes: B batch, T new tokens, S attended
positions (cache length + T), G = key/value heads, D = head_dim.
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
    ``window`` also hides keys window or more positions back (HF Mistral: j > i - window);
    the cache still holds them, which wastes memory but keeps one cache layout for all models.
    """
    n_keys = past + T
    if window is None or n_keys <= window:  # the window cuts nothing off
        if past == 0 or T == 1:
            return None
        return torch.ones(T, n_keys, dtype=torch.bool, device=device).tril(diagonal=past)
    i = torch.arange(past, n_keys, device=device)[:, None]  # (T, 1) absolute query positions
    j = torch.arange(n_keys, device=device)[None, :]  # (1, S) key positions
    return (j <= i) & (j > i - window)  # (T, S)


class KVCache:
    """Static keys and values of every layer, written at explicit positions (gpt-fast's cache).

    ``k``/``v`` are (n_layer, B, G, max_len, D). The model writes the new tokens of each layer
    at their positions ``input_pos`` (T,) with ``index_copy_`` and attends over the whole
    buffer under a (T, max_len) mask (``mask``), so every decode step has the same shapes and
    can be compiled. Positions nobody wrote hold zeros and are masked out. ``length`` counts
    the filled positions for callers that let the model continue where the cache ends (no
    ``input_pos``); rolling it back (speculative decoding) is enough to forget tokens, as a
    query never sees keys after its own position.
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
    ) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        """Batch size the cache was allocated for."""
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        """Number of positions the cache can hold."""
        return self.k.shape[3]

    def update(self, layer: int, k: Tensor, v: Tensor,
               input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Write new k, v (B, G, T, D) at positions ``input_pos`` (T,); return the whole
        buffers (B, G, max_len, D) of the layer."""
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(2, input_pos, k)
        values.index_copy_(2, input_pos, v)
        return keys, values

    def mask(self, input_pos: Tensor, window: int | None) -> Tensor:
        """Bool (T, max_len): the query at position p sees keys j <= p (and j > p - window)."""
        j = torch.arange(self.max_len, device=input_pos.device)[None, :]  # (1, S)
        i = input_pos[:, None]  # (T, 1)
        mask = j <= i
        if window is not None:
            mask = mask & (j > i - window)
        return mask

    def reset(self) -> None:
        """Forget every position (the buffers are reused as they are)."""
        self.length = 0

    def next_positions(self, T: int) -> Tensor:
        """Positions (T,) of T tokens after the filled ones."""
        return torch.arange(self.length, self.length + T, device=self.k.device)

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
        j = torch.arange(n_keys, device=input_pos.device)[None, :]  # (1, S)
        i = input_pos[:, None]  # (T, 1)
        mask = j <= i
        if window is not None:
            mask = mask & (j > i - window)
        return mask


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
    its requests use, not batch x 8k from the start.
    """

    batch = KVCache.batch  # rows (of this view)

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 reserve: int | None = None):
        self.max_len = max_len  # positions a row may reach
        capacity = max_len if reserve is None else max(1, min(reserve, max_len))
        shape = (n_layer, batch, n_kv_head, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self._span: tuple[int, int] | None = None  # per-forward memos, the same for every layer
        self._mask: dict[int | None, Tensor] = {}  # per sliding window (Gemma: two)

    def rows(self, start: int, stop: int) -> RowKVCache:
        """A view of rows [start, stop); writes through it land in this cache."""
        view = RowKVCache.__new__(RowKVCache)
        view.max_len = self.max_len
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths = self.lengths[start:stop]  # a view too: advance() updates ours in place
        view._span, view._mask = None, {}
        return view

    @property
    def capacity(self) -> int:
        """Positions per row allocated now (at most ``max_len``)."""
        return self.k.shape[3]

    def grow(self, needed: int) -> None:
        """Make room for ``needed`` positions per row (doubling, up to max_len); the filled
        positions are copied over. Call on the cache itself, before taking views of it."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ValueError(f"KV cache full: {needed} positions > max_len {self.max_len}")
        capacity = min(self.max_len, max(needed, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], capacity, old.shape[4]))
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` (keys, values, length) into row ``dst``."""
        for buf in (self.k, self.v, self.lengths[None]):  # the row is dim 1 of each
            buf[:, dst] = buf[:, src]

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

    def attn_mask(self, T: int, window: int | None, device: torch.device) -> Tensor | None:
        """Bool (B, 1, T, S): query t of row b sees keys j <= lengths[b]+t (and the window)."""
        lo, hi = self.span()
        if lo == hi:
            return causal_mask(T, lo, window, device)
        if window not in self._mask:
            i = self.positions(T)[:, :, None]  # (B, T, 1) absolute query positions
            j = torch.arange(hi + T, device=device)[None, None, :]  # (1, 1, S)
            mask = j <= i
            if window is not None:
                mask &= j > i - window
            self._mask[window] = mask[:, None]  # (B, 1, T, S), broadcast over heads
        return self._mask[window]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new k, v (B, G, T, D) at each row's positions; return (B, G, S, D) so far."""
        B, T = k.shape[0], k.shape[2]
        lo, hi = self.span()
        if lo == hi:
            self.k[layer, :, :, lo : lo + T] = k
            self.v[layer, :, :, lo : lo + T] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
            pos = self.positions(T)  # (B, T)
            # Advanced indices split by a slice come first: the indexed view is (B, T, G, D).
            self.k[layer][rows, :, pos] = k.transpose(1, 2)
            self.v[layer][rows, :, pos] = v.transpose(1, 2)
        return self.k[layer, :, :, : hi + T], self.v[layer, :, :, : hi + T]

    def end(self, T: int) -> int:
        """Positions the longest row has filled after T more tokens."""
        return self.span()[1] + T

    def advance(self, T: int) -> None:
        """Count the T tokens every layer has just written, in every row."""
        self.lengths += T
        self._span, self._mask = None, {}
