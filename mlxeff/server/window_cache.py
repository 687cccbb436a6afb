"""``--max-kv-size``: a bounded attention window on the positioned cache.

mlx-lm bounds the cache with a ``RotatingKVCache``: it keeps the first ``keep`` (4) tokens and the
most recent ones, ``max_size`` in all, and every query attends to at most that many keys (the
StreamingLLM layout, arXiv 2309.17453: the first tokens act as attention sinks). mlxeff's cache
keeps one RoPE position per slot (``mlxeff.cache.PositionedKVCache``), so the same window is
built by eviction instead of a ring buffer:

- before ``n`` new tokens are written, the oldest tokens after the first ``keep`` are evicted
  until ``max_size - 1`` old tokens remain (the survivors are copied into a fresh buffer; slots
  then carry explicit positions, so RoPE and masks stay exact);
- a chunk of ``n > 1`` tokens (prompt processing) gets a mask in which the token at position
  ``p`` sees the first ``keep`` tokens and the tokens at positions ``p - (max_size - keep) + 1 .. p``:
  every query attends to at most ``max_size`` keys, as with mlx-lm's rotating cache.

Memory therefore stays at ``max_size - 1 + n`` tokens per layer. Choices and costs: the eviction
copies the kept tokens once per decode step after the window fills (a ring buffer would avoid the
copy, but would break the slot order the plain attention path relies on); techniques that manage
their own cache (LazyLLM, KV Prediction) are refused with ``--max-kv-size``, a drafter works
(rejected drafts are trimmed as usual).
"""

from __future__ import annotations

from typing import List

import mlx.core as mx
import numpy as np

from ..cache import PositionedKVCache, prompt_cache_class

SINK_TOKENS = 4  # mlx-lm's RotatingKVCache keeps the first 4 tokens


@prompt_cache_class
class WindowedKVCache(PositionedKVCache):
    """A positioned cache that never holds more than ``max_size - 1`` tokens before a write."""

    def __init__(self, max_size: int, keep: int = SINK_TOKENS):
        super().__init__()
        if max_size < keep + 2:
            raise ValueError(f"the window ({max_size}) must exceed the {keep} kept tokens by 2")
        self.max_size = max_size
        self.keep = keep
        self.evicted = 0

    def _evict(self) -> None:
        extra = self.offset - (self.max_size - 1)
        if extra <= 0:
            return
        positions = self.positions
        survivors = np.concatenate([np.arange(self.keep), np.arange(self.keep + extra, self.offset)])
        index = mx.array(survivors.astype(np.int32))
        keys = mx.take(self.keys[..., : self.offset, :], index, axis=2)
        values = mx.take(self.values[..., : self.offset, :], index, axis=2)
        next_position = self.next_position
        self.keys, self.values, self.offset = keys, values, len(survivors)
        table = positions[survivors].astype(np.int64)
        self._positions = table
        self._table()  # the table now covers the new buffer exactly
        self.next_position = next_position
        self._device_positions = None
        self.evicted += extra

    def update_and_fetch(self, keys, values, positions=None):
        if positions is not None:
            raise ValueError("--max-kv-size keeps tokens in order; explicit positions are not supported")
        self._evict()
        return super().update_and_fetch(keys, values)

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """The mask for ``N`` tokens about to be written (see the module docstring)."""
        kept_old = min(self.offset, self.max_size - 1)
        if N == 1:
            return None  # one token after at most max_size - 1 others sees them all
        old = self.positions
        if self.offset > kept_old:  # the positions that survive the coming eviction
            old = np.concatenate([old[: self.keep], old[self.offset - (kept_old - self.keep):]])
        q = np.arange(self.next_position, self.next_position + N)
        k = np.concatenate([old, q])
        width = self.max_size - self.keep
        visible = (k[None] <= q[:, None]) & ((k[None] > q[:, None] - width) | (k[None] < self.keep))
        return mx.array(visible)

    @property
    def state(self):
        return self.positioned_state()

    @state.setter
    def state(self, v):
        PositionedKVCache.state.fset(self, v)

    @property
    def meta_state(self):
        return (str(self.max_size), str(self.keep))

    @meta_state.setter
    def meta_state(self, v):
        self.max_size, self.keep = int(v[0]), int(v[1])
        self.evicted = 0


def make_window_cache(model, max_size: int) -> List[WindowedKVCache]:
    """A windowed cache for every layer of ``model``."""
    return [WindowedKVCache(max_size) for _ in model.layers]
