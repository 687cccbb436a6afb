"""LazyLLM's cache (arXiv 2407.14057): per layer, the tokens it computed and its Aux Cache entry.

Every token has a *depth*: the number of layers that computed it (a token pruned at layer ``l``
has depth ``l``; kept and generated tokens have depth L). Layer ``l``'s ``LazyLayerCache`` (the
positioned cache, ``mlxeff.cache``) holds the keys and values of exactly the tokens of depth > l,
in the order they were computed, with their positions; its Aux Cache entry holds the tokens whose
next layer to compute is ``l`` (depth == l): their positions and hidden states entering layer l.
Depth is therefore derived from the layers, not stored beside them.

All of LazyLLM's state lives in the layer caches -- the keep ratio of a pruning layer, the
statistics, the Aux Cache -- so mlx-lm's prompt-cache files save and restore it, and ``trim``
undoes decode steps: each step records, per layer, what it is about to change (a snapshot of
references: buffers are only appended to and Aux Cache entries are replaced, never modified),
and trimming n tokens restores the snapshot taken n steps ago. ``LazyCache`` is the list of layer
caches the engine passes around, with read-only views over them.
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx
import numpy as np

from ..cache import UNFILLED, PositionedKVCache, prompt_cache_class

MAX_HISTORY = 64  # decode steps a layer can undo (speculative drafts are far shorter)


class AuxEntry:
    """Tokens whose next layer to compute is this one: positions (m,) and hidden states (1, m, d).
    Positions chosen on the device (the prefill's selection) are read back when first asked for."""

    def __init__(self, positions, hidden: mx.array):
        self._positions = positions
        self.hidden = hidden

    @property
    def positions(self) -> np.ndarray:
        if not isinstance(self._positions, np.ndarray):
            self._positions = np.array(self._positions).astype(np.int64)
        return self._positions


@prompt_cache_class
class LazyLayerCache(PositionedKVCache):
    """One layer of LazyLLM's cache (see the module docstring)."""

    def __init__(self, keep: Optional[float] = None, recent: int = 0):
        super().__init__()
        self.keep = keep  # the keep ratio when this is a pruning layer
        self.recent = recent
        self.prompt_tokens = 0
        self.computed = 0  # prompt-token computations in this layer (prefill and revivals)
        self.revived = 0  # tokens revived from this layer's Aux Cache entry
        self.aux: Optional[AuxEntry] = None
        self._history: list = []

    # ---- undo ---------------------------------------------------------------------------------

    def snapshot(self) -> None:
        """Record the state a decode step is about to change."""
        self._history.append((self.offset, self.next_position, self.aux, self.computed, self.revived))
        del self._history[:-MAX_HISTORY]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Undo the last ``n`` decode steps (as far as they are recorded)."""
        self.resolve_positions()
        n = min(n, len(self._history))
        if n <= 0:
            return 0
        (self.offset, self.next_position, self.aux, self.computed, self.revived) = self._history[-n]
        del self._history[-n:]
        if self._positions is not None:
            self._positions[self.offset:] = UNFILLED
        self._device_positions = None
        return n

    # ---- saving -------------------------------------------------------------------------------

    @property
    def state(self):
        aux_pos = None if self.aux is None else mx.array(self.aux.positions.astype(np.int32))
        aux_hidden = None if self.aux is None else self.aux.hidden
        keep = -1.0 if self.keep is None else float(self.keep)
        return (*self.positioned_state(), aux_pos, aux_hidden, keep, self.recent,
                self.prompt_tokens, self.computed, self.revived)

    @state.setter
    def state(self, v):
        PositionedKVCache.state.fset(self, v[:5])
        aux_pos, aux_hidden, keep, self.recent, self.prompt_tokens, self.computed, self.revived = v[5:]
        self.keep = None if keep < 0 else keep
        self.aux = None if aux_pos is None else AuxEntry(np.array(aux_pos, dtype=np.int64), aux_hidden)
        self._history = []

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self.aux is None else self.aux.hidden.nbytes)

    def copy(self) -> "LazyLayerCache":
        """An independent copy (its own buffers: mlx-lm's cache writes into them in place)."""
        new = LazyLayerCache(self.keep, self.recent)
        new.state = self.state
        if self.keys is not None:
            new.keys, new.values = mx.array(self.keys), mx.array(self.values)
        return new


class LazyCache(list):
    """The layer caches (the list the engine passes around) with views over them."""

    def __init__(self, layers, schedule=None):
        super().__init__(layers)
        self.schedule = schedule

    @property
    def num_layers(self) -> int:
        return len(self)

    @property
    def stages(self) -> dict:
        return {l: c.keep for l, c in enumerate(self) if c.keep is not None}

    @property
    def prompt_tokens(self) -> int:
        return self[0].prompt_tokens

    @property
    def next_position(self) -> int:
        return max(c.next_position for c in self)

    @property
    def aux(self) -> List[Optional[AuxEntry]]:
        return [c.aux for c in self]

    @property
    def depth(self) -> np.ndarray:
        """Per position: the number of layers that computed it."""
        depth = np.full(self.next_position, len(self), dtype=np.int64)
        for l, c in enumerate(self):
            if c.aux is not None:
                depth[c.aux.positions] = l
        return depth

    @property
    def computed(self) -> List[int]:
        return [c.computed for c in self]

    @property
    def revived(self) -> int:
        return sum(c.revived for c in self)

    def percent_computed(self) -> float:
        """Prompt-token layer computations (prefill and revivals) as a percentage of N x L."""
        if self.prompt_tokens == 0:
            return 0.0
        return 100.0 * sum(self.computed) / (self.prompt_tokens * self.num_layers)

    def arrays(self) -> list:
        """Every array the cache holds (to evaluate it completely, e.g. when timing a prefill)."""
        out = [a for c in self for a in (c.keys, c.values) if a is not None]
        return out + [c.aux.hidden for c in self if c.aux is not None]

    def clone(self) -> "LazyCache":
        """An independent copy (decode continues differently from the same prefill)."""
        return LazyCache([c.copy() for c in self], self.schedule)

    def stats(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "pruning_layers": {int(k): v for k, v in self.stages.items()},
            "computed_per_layer": self.computed,
            "percent_computed": self.percent_computed(),
            "revived": self.revived,
            "aux_tokens": int(sum(len(c.aux.positions) for c in self if c.aux is not None)),
        }
