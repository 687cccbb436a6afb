"""Which parts of a text also occur in another corpus: sampled fixed-width character windows.

The book corpus is split by book, but books share text: a fairy tale reprinted in two collections,
one essay in two editions. On the Gutenberg children's corpus, 20 of 200 random 80-character
snippets of ``valid.txt.gz`` (10%) and 44 of 300 random 700-character passages (15%) occur, at least
in part, verbatim in the training shards. A held-out task item built from such a passage would test
memory rather than reading, so held-out passages are checked against the training text and drawn
again when they share text with it.

Method: every ``WIDTH``-character window of a (whitespace-normalized) text gets a 64-bit polynomial
rolling hash of its code points, mixed by the splitmix64 finalizer; windows whose mixed hash is 0
modulo ``SAMPLE`` are kept (content-defined sampling, as in winnowing: Schleimer et al., SIGMOD
2003), so equal windows are kept or dropped alike in both texts. Two texts sharing a run of
``WIDTH + g`` characters share about ``g / SAMPLE`` kept windows: a shared run of 200 characters is
missed with probability (15/16)^136 < 1e-3, one of 400 with probability < 1e-7; shorter common
strings (a proverb, a line of a hymn) may or may not be caught. A hash collision (2^-64 per pair)
can only reject a passage that is in fact clean. ``shared_windows`` returns the start offsets of
the held-out text's kept windows that also occur in the other corpus; a passage ``[a, b)`` overlaps
when one of them lies inside it. Everything is numpy over code-point arrays, in chunks.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

WIDTH = 64  # characters per window
SAMPLE = 16  # keep the windows whose hash is 0 modulo SAMPLE
_BASE = 0x100000001B3  # FNV-1a's 64-bit prime: odd, so invertible modulo 2^64
_CHUNK = 1 << 22
_tables_cache = {}


def _powers(n: int, base: int) -> np.ndarray:
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    np.multiply.accumulate(out, out=out)  # uint64 arithmetic wraps modulo 2^64
    return out


def _tables():
    if not _tables_cache:
        _tables_cache["pow"] = _powers(_CHUNK + WIDTH, _BASE)
        _tables_cache["inv"] = _powers(_CHUNK + WIDTH, pow(_BASE, -1, 1 << 64))
    return _tables_cache["pow"], _tables_cache["inv"]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def window_hashes(text: str) -> np.ndarray:
    """Mixed hashes of every ``WIDTH``-character window of ``text``, in order (uint64)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n = points.size - WIDTH + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    pow_, inv = _tables()
    out = np.empty(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, n, _CHUNK):
            count = min(_CHUNK, n - start)
            seg = points[start:start + count + WIDTH - 1].astype(np.uint64)
            # prefix[i] = sum_{m < i} seg[m] * B^m; window i = (prefix[i+W] - prefix[i]) * B^-i
            prefix = np.zeros(seg.size + 1, dtype=np.uint64)
            np.cumsum(seg * pow_[:seg.size], out=prefix[1:])
            raw = prefix[WIDTH:WIDTH + count] - prefix[:count]
            out[start:start + count] = _mix(raw * inv[:count])
    return out


def _kept(hashes: np.ndarray) -> np.ndarray:
    return (hashes % np.uint64(SAMPLE)) == 0


def sampled_keys(texts: Iterable[str]) -> np.ndarray:
    """Sorted distinct kept window hashes of ``texts`` (about one per ``SAMPLE`` characters)."""
    parts = []
    for t in texts:
        h = window_hashes(t)
        parts.append(h[_kept(h)])
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def shared_windows(text: str, keys: np.ndarray) -> np.ndarray:
    """Start offsets (sorted, int64) of the kept windows of ``text`` whose hash is in ``keys``."""
    h = window_hashes(text)
    starts = np.flatnonzero(_kept(h))
    if keys.size == 0 or starts.size == 0:
        return np.zeros(0, dtype=np.int64)
    probe = h[starts]
    at = np.minimum(np.searchsorted(keys, probe), keys.size - 1)
    return starts[keys[at] == probe].astype(np.int64)


def overlaps(shared: np.ndarray, start: int, end: int) -> bool:
    """Whether a shared window (from ``shared_windows``) lies inside ``[start, end)``."""
    i = int(np.searchsorted(shared, start))
    return i < shared.size and int(shared[i]) + WIDTH <= end
