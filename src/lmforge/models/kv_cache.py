"""Preallocated key/value caches for decoding, and the causal mask they need.

Two caches share one interface: ``KVCache`` (rows of one length: generate) and ``RowKVCache``
(rows of their own lengths: continuous batching). Shapes: B batch, T new tokens, S attended
positions (cache length + T), G = key/value heads, D = head_dim.
"""

from __future__ import annotations

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
    """Preallocated keys and values of every layer, filled left to right.

    ``k``/``v`` are (n_layer, B, G, max_len, D); ``length`` positions are filled. The model
    writes the new tokens of each layer at [length, length+T) through ``update`` and advances
    ``length`` once after the last layer. A static buffer (as in gpt-fast) means no
    reallocation per token and fixed shapes for a later compiled decode step.
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

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new k, v (B, G, T, D) at [length, length+T); return all (B, G, S, D) so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        """Forget every position (the buffers are reused as they are)."""
        self.length = 0

    def positions(self, T: int) -> slice:
        """Positions of the next T tokens, the same in every row."""
        return slice(self.length, self.length + T)

    def attn_mask(self, T: int, window: int | None, device: torch.device) -> Tensor | None:
        """Mask of the next T queries over the cached and new keys (see ``causal_mask``)."""
        return causal_mask(T, self.length, window, device)

    def end(self, T: int) -> int:
        """Filled positions after T more tokens."""
        return self.length + T

    def advance(self, T: int) -> None:
        """Count the T tokens every layer has just written."""
        self.length += T


class RowKVCache:
    """A KV cache whose rows are independent sequences, each with its own fill length.

    For continuous batching: a request takes a free row while the others are mid-sequence.
    Row b's new tokens go to [lengths[b], lengths[b]+T), and an explicit (B, 1, T, S) mask hides
    the positions a row has not filled (stale keys of an earlier request), so rows never need
    padding or reshuffling. When every row has the same length (one row, say) it does exactly
    what ``KVCache`` does: slice writes and no mask. ``rows(start, stop)`` is a view sharing the
    buffers and lengths: a new request is prefilled alone, the active rows decode together.
    """

    batch, max_len = KVCache.batch, KVCache.max_len  # rows (of this view), positions per row

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self._span: tuple[int, int] | None = None  # per-forward memos, the same for every layer
        self._mask: Tensor | None = None

    def rows(self, start: int, stop: int) -> RowKVCache:
        """A view of rows [start, stop); writes through it land in this cache."""
        view = RowKVCache.__new__(RowKVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths = self.lengths[start:stop]  # a view too: advance() updates ours in place
        view._span, view._mask = None, None
        return view

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
        if self._mask is None:
            i = self.positions(T)[:, :, None]  # (B, T, 1) absolute query positions
            j = torch.arange(hi + T, device=device)[None, None, :]  # (1, 1, S)
            mask = j <= i
            if window is not None:
                mask &= j > i - window
            self._mask = mask[:, None]  # (B, 1, T, S), broadcast over heads
        return self._mask

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
        self._span, self._mask = None, None
