"""The positioned KV cache: mlx-lm's ``KVCache`` plus the RoPE position of every slot.

One cache class serves the plain engine and every technique. It follows mlx-lm's cache protocol
(``update_and_fetch``, ``state``, ``meta_state``, ``trim``, ``is_trimmable``, ``nbytes``,
``make_mask``), so ``mlx_lm.models.cache.save_prompt_cache`` / ``load_prompt_cache`` save and
restore it, and ``mlx_lm.generate`` runs an mlxeff model with it.

Positions. While tokens are appended in order (the plain engine, speculative decoding, prompt
caches) slot ``i`` holds position ``i`` and nothing else is stored: the cache behaves exactly as
mlx-lm's. A write with explicit ``positions`` (LazyLLM's pruned and revived tokens, superposition's
paths) switches the cache to an explicit table of slot positions (kept on the host, copied to the
device when a kernel or a mask needs it). Positions given only as a device array are read back
when something first needs the table (a mask, a kernel, ``positions``, ``next_position``, trimming
or saving), not at the write: a prefill whose positions are computed on the device (LazyLLM's
selection) then runs without waiting for the device at every layer. ``next_position`` is where a
token appended without explicit positions goes: after everything cached.

Technique state lives in the cache (``mlxeff.models.attention`` reads it):
``attend_index`` (attend only these slots), ``want_scores`` / ``scores`` (the last query row's
attention weights, written by the attention), ``raw_sink`` (a list receiving the layer's keys and
values before qk-norm and RoPE). Subclasses add their own state to ``state`` so that trimming and
saving keep it consistent (``mlxeff.techniques.lazyllm``).
"""

from __future__ import annotations

import math
from typing import List, Optional

import mlx.core as mx
import mlx_lm.models.cache as _mlx_lm_cache
import numpy as np
from mlx_lm.models.cache import KVCache

UNFILLED = 2**31 - 1  # the position of a slot not written yet: later than every query


def prompt_cache_class(cls):
    """Make ``cls`` known to mlx-lm's ``load_prompt_cache`` (it looks classes up by name in its
    own module)."""
    if getattr(_mlx_lm_cache, cls.__name__, cls) is not cls:
        raise RuntimeError(f"mlx-lm already defines a cache class named {cls.__name__}")
    setattr(_mlx_lm_cache, cls.__name__, cls)
    return cls


@prompt_cache_class
class PositionedKVCache(KVCache):
    """One layer's keys and values, the position of every slot, and technique state."""

    def __init__(self):
        super().__init__()
        self._next_position = 0
        self._positions: Optional[np.ndarray] = None  # None: slot i holds position i
        self._pending: list = []  # (first slot, device positions (B, n)) not read back yet
        self._device_positions: Optional[mx.array] = None
        self.attend_index: Optional[mx.array] = None
        self.want_scores = False
        self.scores: Optional[mx.array] = None
        self.raw_sink: Optional[list] = None

    # ---- writing ----------------------------------------------------------------------------

    def update_and_fetch(self, keys, values, positions=None):
        prev = self.offset
        out = super().update_and_fetch(keys, values)
        n = keys.shape[2]
        if positions is None and self._positions is None:
            self.next_position = self.offset
            self._device_positions = None
            return out
        if positions is None:
            new = np.arange(self.next_position, self.next_position + n, dtype=self._positions.dtype)[None]
        else:  # a host copy when the caller has one (``mlxeff.models.attention.Positions``)
            host = positions if isinstance(positions, np.ndarray) else getattr(positions, "known_host", None)
            device = getattr(positions, "device", positions)
            if host is None and device.size == n:  # on the device only: read back when needed
                self._table(float_positions=mx.issubdtype(device.dtype, mx.floating))
                self._pending.append((prev, device.reshape(-1, n)))
                self._device_positions = None
                return out
            new = (np.array(device) if host is None else host).reshape(-1, n)
        self._write_positions(prev, new)
        return out

    def _write_positions(self, start: int, new: np.ndarray) -> None:
        """Slots ``start, start + 1, ...`` hold positions ``new`` (B, n)."""
        if new.shape[0] > 1 and not (new == new[:1]).all():
            raise ValueError("a positioned cache holds one position per slot for the whole batch")
        new = new[0]
        self._table(float_positions=new.dtype.kind == "f")[start:start + new.size] = new
        self._next_position = max(self._next_position, int(math.floor(float(new.max()))) + 1)
        self._device_positions = None

    def resolve_positions(self) -> None:
        """Read back the device positions written since the last call (a synchronisation; nothing
        when none are pending)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for start, device in pending:
            self._write_positions(start, np.array(device))

    @property
    def next_position(self) -> int:
        self.resolve_positions()
        return self._next_position

    @next_position.setter
    def next_position(self, value: int) -> None:
        self._next_position = value

    def _table(self, float_positions: bool = False) -> np.ndarray:
        """The host table of slot positions over the whole buffer, created or grown as needed."""
        size = self.keys.shape[2]
        table = self._positions
        dtype = np.float64 if float_positions or (table is not None and table.dtype.kind == "f") \
            else np.int64
        if table is None:
            table = np.full(size, UNFILLED, dtype=dtype)
            filled = min(self.offset, self.next_position)
            table[:filled] = np.arange(filled)
        elif table.shape[0] != size or table.dtype != dtype:
            grown = np.full(size, UNFILLED, dtype=dtype)
            grown[: min(size, table.shape[0])] = table[:size]
            table = grown
        self._positions = table
        return table

    # ---- reading ----------------------------------------------------------------------------

    @property
    def ordered(self) -> bool:
        """Whether slot i holds position i (no explicit table)."""
        return self._positions is None

    @property
    def positions(self) -> np.ndarray:
        """(offset,) the positions of the cached slots, in slot order (host copy)."""
        self.resolve_positions()
        if self._positions is None:
            return np.arange(self.offset)
        return self._positions[: self.offset].copy()

    def slot_position_array(self) -> mx.array:
        """Positions over the whole buffer (UNFILLED for unwritten slots) as a device array
        (int32, or float32 for real-valued positions); built once per change."""
        self.resolve_positions()
        if self._device_positions is None:
            if self._positions is None:
                size = 0 if self.keys is None else self.keys.shape[2]
                table = np.full(size, UNFILLED, dtype=np.int64)
                table[: self.offset] = np.arange(self.offset)
            else:
                table = self._table()
            dtype = mx.float32 if table.dtype.kind == "f" else mx.int32
            self._device_positions = mx.array(table.astype(np.float32 if dtype == mx.float32 else np.int32))
        return self._device_positions

    # ---- mlx-lm's protocol --------------------------------------------------------------------

    def trim(self, n: int) -> int:
        self.resolve_positions()
        n = min(self.offset, n)
        self.offset -= n
        self._device_positions = None
        if self._positions is None:
            self.next_position = self.offset
        else:
            self._positions[self.offset:] = UNFILLED
            filled = self._positions[: self.offset]
            self.next_position = int(math.floor(float(filled.max()))) + 1 if self.offset else 0
        return n

    @property
    def state(self):
        """mlx-lm's ``(keys, values, offset)`` while slots hold positions 0, 1, ...; with explicit
        positions also the positions of the cached slots and the next position."""
        if self._positions is None:
            return self.keys, self.values, self.offset
        return self.positioned_state()

    def positioned_state(self) -> tuple:
        self.resolve_positions()
        positions = None if self._positions is None else mx.array(self._positions[: self.offset])
        return self.keys, self.values, self.offset, positions, self.next_position

    @state.setter
    def state(self, v):
        # from_state builds the object without __init__: give it the technique slots too
        self.attend_index, self.want_scores, self.scores, self.raw_sink = None, False, None, None
        self._device_positions, self._pending = None, []
        if len(v) == 3:  # a plain KVCache's state
            self.keys, self.values, self.offset = v
            self._positions, self.next_position = None, self.offset
            return
        self.keys, self.values, self.offset, positions, self.next_position = v
        self._positions = None
        if positions is not None:
            p = np.array(positions)
            self._positions = p.astype(np.float64 if p.dtype.kind == "f" else np.int64)
            self._table()  # grow to the buffer, unwritten slots UNFILLED

    @property
    def meta_state(self):
        return ()

    @property
    def nbytes(self) -> int:
        extra = 0 if self._positions is None else self.offset * 4
        return super().nbytes + extra

    def reset_taps(self) -> None:
        """Clear every technique request (subset, scores, raw sink)."""
        self.attend_index, self.want_scores, self.scores, self.raw_sink = None, False, None, None


def make_prompt_cache(model) -> List[PositionedKVCache]:
    """A fresh positioned cache for every layer of ``model``."""
    return [PositionedKVCache() for _ in model.layers]


def cache_offset(cache) -> int:
    """Tokens in a cache list (its first layer's slot count)."""
    return cache[0].offset if cache else 0


def trim_cache(cache, n: int) -> int:
    """Remove the last ``n`` tokens from every layer (mlx-lm's ``trim_prompt_cache`` rule)."""
    if n <= 0:
        return 0
    if not all(c.is_trimmable() for c in cache):
        raise ValueError("this cache cannot be trimmed")
    return [c.trim(n) for c in cache][0]


class PassThroughCache:
    """A cache stand-in for one full-sequence forward (training): it stores nothing, hands the
    attention the keys and values it was given -- or ``replace``'s, when a technique substitutes
    its own (KV Prediction's predicted cache) -- and records the layer's raw keys and values in
    ``raw_sink`` when that is a list."""

    offset = 0
    next_position = 0
    attend_index = None
    want_scores = False

    def __init__(self, replace=None, record: bool = False):
        self.replace = replace
        self.raw_sink: Optional[list] = [] if record else None

    def update_and_fetch(self, keys, values, positions=None):
        return self.replace if self.replace is not None else (keys, values)

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        return "causal" if N > 1 else None
