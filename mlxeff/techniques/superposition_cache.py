"""Superposition prompting's caches: path caching (in memory and on disk) and the decode cache.

- ``SegmentKV``: one segment's keys and values in every layer -- the preamble, a document after
  the preamble, or a query copy after its document -- held as positioned caches
  (``mlxeff.cache.PositionedKVCache``, one per layer: keys, values and each slot's real-valued
  position), plus the segment's mean log-likelihood (the Bayesian path score's document term).
- ``PathCache``: the preamble's and each preamble+document segment computed once and reused by
  every later question (the paper's path caching). Keys name everything the keys and values depend
  on: the model (a fingerprint), the compute dtype, the preamble's and the document's token ids and
  the document's positions (which, under the equilibrium rule, depend on the whole document set:
  the same document collection always hits). With a directory (``--superposition-doc-cache DIR``)
  entries are also written there, one mlx-lm prompt-cache file each (``save_prompt_cache``), so
  later runs reuse them; ``manifest.json`` records the model that made them and a cache made by
  another model is refused in one line.
- ``SuperpositionLayerCache``: the engine's cache after the prefill: the preamble, the kept paths
  and the response, with their positions and (for the soft reweighting option) an additive
  attention bias per prompt slot that the response and every decoded token apply.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from ..cache import PositionedKVCache, prompt_cache_class
from ..errors import MlxeffError
from ..files import read_json

CACHE_FORMAT = "mlxeff-superposition-doc-cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"


# ---- one segment's keys and values --------------------------------------------------------------

def position_array(positions: np.ndarray) -> mx.array:
    """Positions for the model: int32 when every one is an integer (the fused integer RoPE,
    as the plain path), float32 otherwise (real-valued RoPE)."""
    p = np.asarray(positions)
    if np.all(p == np.round(p)):
        return mx.array(np.round(p).astype(np.int32))
    return mx.array(p.astype(np.float32))


def next_position_after(positions: np.ndarray) -> int:
    return int(math.floor(float(np.max(positions)))) + 1 if len(positions) else 0


@dataclass
class SegmentKV:
    """A segment's keys and values per layer as positioned caches, and its mean log-likelihood."""

    layers: List[PositionedKVCache]
    loglik: float = float("nan")

    @classmethod
    def from_arrays(cls, keys: Sequence[mx.array], values: Sequence[mx.array], positions: np.ndarray,
                    loglik: float = float("nan")) -> "SegmentKV":
        """``keys``/``values``: one (1, KVH, n, D) array per layer; ``positions`` (n,)."""
        n = len(positions)
        layers = []
        for k, v in zip(keys, values):
            c = PositionedKVCache()
            c.state = (k, v, n, position_array(positions), next_position_after(positions))
            layers.append(c)
        return cls(layers, float(loglik))

    @property
    def size(self) -> int:
        return self.layers[0].offset

    @property
    def positions(self) -> np.ndarray:
        return self.layers[0].positions

    def keys(self, layer: int) -> mx.array:
        c = self.layers[layer]
        return c.keys[..., : c.offset, :]

    def values(self, layer: int) -> mx.array:
        c = self.layers[layer]
        return c.values[..., : c.offset, :]

    def arrays(self) -> list:
        return [a for c in self.layers for a in (c.keys, c.values)]


# ---- the path cache -----------------------------------------------------------------------------

def model_fingerprint(model) -> str:
    """A digest of the model: its configuration and a strided sample (up to 4096 values, as
    float32 for floating-point tensors, so the compute dtype does not change it) of every
    parameter."""
    h = hashlib.sha256()
    args = getattr(model, "args", None)
    cfg = args.to_dict() if hasattr(args, "to_dict") else repr(args)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        flat = p.reshape(-1)
        sample = flat[:: max(1, flat.size // 4096)]
        if mx.issubdtype(sample.dtype, mx.floating):
            sample = sample.astype(mx.float32)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(np.array(sample).tobytes())
    return h.hexdigest()[:32]


def model_description(model) -> str:
    a = model.args
    return (f"{a.num_transformer_layers} layers, width {a.model_dim}, vocabulary {a.vocab_size}")


def compute_dtype(model) -> str:
    return str(model.transformer.norm.weight.dtype).replace("mlx.core.", "")


def segment_key(fingerprint: str, dtype: str, kind: str, preamble: Sequence[int],
                document: Sequence[int] = (), positions: Optional[np.ndarray] = None) -> str:
    h = hashlib.sha256()
    h.update(f"{fingerprint}|{dtype}|{kind}|".encode())
    h.update(np.asarray(preamble, dtype=np.int64).tobytes() + b"|")
    h.update(np.asarray(document, dtype=np.int64).tobytes() + b"|")
    if positions is not None:
        h.update(np.asarray(positions, dtype=np.float32).tobytes())
    return h.hexdigest()[:40]


class PathCache:
    """Segments (preamble, preamble+document) by key, in memory and optionally in ``directory``.

    ``bind(model)`` must be called before lookups: it fingerprints the model and, with a
    directory, creates it (with its manifest) or checks that its manifest names this model."""

    def __init__(self, directory=None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: Dict[str, SegmentKV] = {}
        self._bound: Optional[tuple] = None
        self.fingerprint: Optional[str] = None
        self.hits = 0
        self.misses = 0

    def bind(self, model) -> str:
        if self._bound is not None and self._bound[0] is model:
            return self.fingerprint
        self.fingerprint = model_fingerprint(model)
        if self.directory is not None:
            open_directory(self.directory, self.fingerprint, model_description(model))
        self._bound = (model,)
        return self.fingerprint

    def __len__(self) -> int:
        return len(self._memory)

    def clear_memory(self) -> None:
        self._memory.clear()

    def get(self, key: str) -> Optional[SegmentKV]:
        seg = self._memory.get(key)
        if seg is None and self.directory is not None:
            seg = self._read(key)
            if seg is not None:
                self._memory[key] = seg
        if seg is None:
            self.misses += 1
        else:
            self.hits += 1
        return seg

    def put(self, key: str, seg: SegmentKV) -> None:
        self._memory[key] = seg
        if self.directory is not None:
            self._write(key, seg)

    def _file(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _read(self, key: str) -> Optional[SegmentKV]:
        f = self._file(key)
        if not f.is_file():
            return None
        try:
            layers, meta = load_prompt_cache(str(f), return_metadata=True)
        except Exception as e:  # a truncated or foreign file
            raise MlxeffError(f"corrupt document cache entry ({e.__class__.__name__}: {e}); "
                              "delete it", f) from None
        if meta.get("model") != self.fingerprint:
            raise MlxeffError("this document cache entry was made by another model; use another "
                              "--superposition-doc-cache directory", f)
        return SegmentKV(list(layers), float(meta.get("loglik", "nan")))

    def _write(self, key: str, seg: SegmentKV) -> None:
        final = self._file(key)
        tmp = self.directory / f".{key}.{os.getpid()}.tmp.safetensors"
        try:
            save_prompt_cache(str(tmp), seg.layers, {"model": self.fingerprint, "format": CACHE_FORMAT,
                                                     "loglik": repr(seg.loglik)})
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()


def open_directory(directory: Path, fingerprint: str, description: str) -> None:
    """Create a document cache directory, or check that the existing one belongs to this model."""
    manifest = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise MlxeffError("not a directory (--superposition-doc-cache takes a directory)", directory)
    if manifest.is_file():
        info = read_json(manifest, what="manifest", expect=None)
        if not isinstance(info, dict) or info.get("format") != CACHE_FORMAT:
            raise MlxeffError("not a superposition document cache manifest", manifest)
        if info.get("version") != CACHE_VERSION:
            raise MlxeffError(f"document cache version {info.get('version')} (this mlxeff reads "
                              f"{CACHE_VERSION}); use another directory", directory)
        if info.get("model") != fingerprint:
            made_by = info.get("description") or "unknown"
            raise MlxeffError(f"this document cache was made by another model ({made_by}; this model: "
                              f"{description}); use another --superposition-doc-cache directory",
                              directory)
        return
    if directory.is_dir() and any(directory.iterdir()):
        raise MlxeffError("not a superposition document cache (no manifest.json) and not empty; "
                          "use a new or empty directory", directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "model": fingerprint,
                               "description": description}, indent=2) + "\n")
    os.replace(tmp, manifest)


# ---- the decode cache -----------------------------------------------------------------------------

@prompt_cache_class
class SuperpositionLayerCache(PositionedKVCache):
    """One layer of the cache the prefill leaves: the preamble, the kept paths (documents and their
    query copies) and the response at their positions; ``slot_bias`` (the soft reweighting
    option): an additive attention bias over the first slots, applied by every later row."""

    def __init__(self):
        super().__init__()
        self.slot_bias: Optional[mx.array] = None

    @property
    def state(self):
        return (*self.positioned_state(), self.slot_bias)

    @state.setter
    def state(self, v):
        PositionedKVCache.state.fset(self, v[:5] if len(v) == 6 else v)
        self.slot_bias = v[5] if len(v) == 6 else None

    def trim(self, n: int) -> int:
        n = super().trim(n)
        if self.slot_bias is not None and self.slot_bias.shape[0] > self.offset:
            self.slot_bias = self.slot_bias[: self.offset]
        return n

    @property
    def last_position(self) -> float:
        """The position of the latest token (every row appended after the prefill follows it)."""
        return float(np.max(self.positions)) if self.offset else -1.0


def fill(cache: Sequence[PositionedKVCache], segments: Sequence[SegmentKV],
         bias: Optional[np.ndarray] = None) -> None:
    """Set every layer of ``cache`` to the concatenation of ``segments`` (copies: mlx-lm's cache
    writes into its buffers in place, the segments stay untouched); ``bias`` per slot or None."""
    positions = np.concatenate([s.positions for s in segments])
    pos = position_array(positions)
    nxt = next_position_after(positions)
    for l, c in enumerate(cache):
        keys = mx.concatenate([s.keys(l) for s in segments], axis=2)
        values = mx.concatenate([s.values(l) for s in segments], axis=2)
        PositionedKVCache.state.fset(c, (keys, values, len(positions), pos, nxt))
        if hasattr(c, "slot_bias"):
            c.slot_bias = None if bias is None else mx.array(bias.astype(np.float32))


def response_mask(bias: Optional[mx.array], offset: int, n: int, dtype) -> object:
    """The mask for ``n`` rows appended after ``offset`` cached slots: ``"causal"`` without a bias;
    with one, an additive (1, 1, n, offset + n) array: the bias over the first slots, 0 over the
    rest of the cache, causal among the new rows."""
    if bias is None:
        return "causal"
    cached = mx.concatenate([bias, mx.zeros((offset - bias.shape[0],))]) if offset > bias.shape[0] \
        else bias[:offset]
    own = mx.where(mx.tril(mx.ones((n, n), dtype=mx.bool_)), 0.0, -mx.inf)
    mask = mx.concatenate([mx.broadcast_to(cached[None], (n, offset)), own], axis=1)
    return mask[None, None].astype(dtype)
