"""The linear feedback shift register behind SeedLM (arXiv 2410.10714).

SeedLM stores each block of weights as the seed of a K-bit LFSR; the C x P basis of the block is
the stream of register states that follows the seed, mapped affinely to [-1, 1].

Convention (normative; the kernels and the packed format depend on it)
-----------------------------------------------------------------------
- Fibonacci LFSR over a K-bit state ``s`` in 1 .. 2^K - 1 (0 is the lone fixed point and is
  never a valid seed).
- Next state: ``fb = XOR of the bits of s at the tap positions`` (bit 0 = least significant),
  ``next = (s >> 1) | (fb << (K - 1))``.
- ``seed_matrix(seed, C, P)``: the NEXT C*P states after the seed (the seed itself is not used),
  filled row-major, so entry (c, p) is state number ``c*P + p + 1`` after the seed.
- Normalisation (``normalize``): ``u = (s - NORM_OFFSET[K]) * NORM_SCALE[K]`` computed in float32,
  with ``NORM_OFFSET[K] = 2^(K-1)`` and ``NORM_SCALE[K] = float32(1 / (2^(K-1) - 1))``. It maps
  state 1 to exactly -1, state 2^K - 1 to exactly +1, and the mean over a full period is 0 (the
  states of a maximal LFSR are every integer in 1 .. 2^K - 1 once). A kernel reproduces it bit for
  bit with an integer subtraction, a conversion to float and one float32 multiply by the constant
  from ``kernel_defines``.

Worked example (tested): K=3, taps {0, 1}, seed 4, C=4, P=2 gives [[2,5],[6,7],[3,1],[4,2]].

The bit stream and the two-bit basis (``basis="bits"``)
--------------------------------------------------------
Each step shifts the register right and feeds the new bit in at the top, so the states are windows
of one bit stream: ``b_i = bit i of the seed`` for i < K, ``b_{K+n}`` = the new top bit of state
n + 1, and state n (counted from the seed, n = 0) is bits ``b_n .. b_{n+K-1}``. ``bit_stream``
returns ``b_0 .. b_{n-1}``. The two-bit basis reads 2*C*P consecutive stream bits per block: for
column p, C "low" bits then C "high" bits, ``lo = b[2Cp + c]``, ``hi = b[2Cp + C + c]``, and
``U[c, p] = 2*hi + lo - 1.5``, one of -1.5, -0.5, 0.5, 1.5 (exact in every float format).
``bit_bases`` builds it. Why this layout: a column's C low (or high) bits are one C-bit field of
the stream, the index of a table of subset sums of x in the matvec kernel
(``mlxeff.quant.seedlm_bits_kernels``).

Taps for K = 16
---------------
The SeedLM paper lists its tap sets in a table that could not be retrieved where this module was
written, so ``TAPS[16] = (0, 2, 3, 5)`` is our choice: it is the Fibonacci form of the primitive
polynomial x^16 + x^14 + x^13 + x^11 + 1 (tap bits 16, 14, 13, 11 counted from the output end).
That it is maximal-length (period 65535, every non-zero state visited once) is not taken on trust:
``cycle_table`` raises if the walk from state 1 returns early, and ``tests/test_lfsr.py`` checks it.
Any maximal-length tap set gives the same family of bases up to a relabelling of the seeds, so the
choice does not affect quality. The other entries of ``TAPS`` (K = 3 .. 15) are likewise checked
maximal by the tests; they exist for experiments with other register widths.

Seeds as cycle indices
----------------------
``cycle_table(K)`` returns the states in cycle order starting at state 1 and the inverse map
``index_of_state``. The C*P states after a seed of cycle index i are the contiguous window
``table[(i + 1 + j) % period]``, j = 0 .. C*P - 1 -- the encoder and the kernels use this instead of
stepping the register.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

# Tap bit positions (bit 0 = least significant) of a Fibonacci LFSR with the convention above.
# Each set is maximal-length; tests/test_lfsr.py walks every one through its full period.
TAPS: Dict[int, Tuple[int, ...]] = {
    3: (0, 1),
    4: (0, 1),
    5: (0, 2),
    6: (0, 1),
    7: (0, 1),
    8: (0, 2, 3, 4),
    9: (0, 4),
    10: (0, 3),
    11: (0, 2),
    12: (0, 1, 4, 6),
    13: (0, 1, 3, 4),
    14: (0, 1, 11, 12),
    15: (0, 1),
    16: (0, 2, 3, 5),
}

DEFAULT_K = 16


def norm_offset(K: int) -> int:
    return 1 << (K - 1)


def norm_scale(K: int) -> np.float32:
    return np.float32(1.0 / ((1 << (K - 1)) - 1))


def period(K: int) -> int:
    return (1 << K) - 1


def _taps(K: int, taps: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if taps is None:
        if K not in TAPS:
            raise ValueError(f"no default taps for K={K}; pass taps explicitly")
        return TAPS[K]
    taps = tuple(int(t) for t in taps)
    if not taps or any(t < 0 or t >= K for t in taps):
        raise ValueError(f"taps {taps} must be bit positions in 0..{K - 1}")
    return taps


def lfsr_next(state, K: int = DEFAULT_K, taps: Optional[Sequence[int]] = None):
    """One LFSR step; ``state`` may be an int or an integer numpy array (elementwise)."""
    taps = _taps(K, taps)
    fb = 0
    for t in taps:
        fb = fb ^ ((state >> t) & 1)
    return (state >> 1) | (fb << (K - 1))


def lfsr_states(seed: int, n: int, K: int = DEFAULT_K, taps: Optional[Sequence[int]] = None) -> np.ndarray:
    """The ``n`` states following ``seed`` (the seed itself excluded), as int64."""
    seed = int(seed)
    if not 0 < seed < (1 << K):
        raise ValueError(f"seed {seed} is not a valid {K}-bit LFSR state (1..{(1 << K) - 1})")
    out = np.empty(n, dtype=np.int64)
    s = seed
    for i in range(n):
        s = lfsr_next(s, K, taps)
        out[i] = s
    return out


def normalize(states, K: int = DEFAULT_K) -> np.ndarray:
    """Map integer states to [-1, 1] in float32: ``(s - 2^(K-1)) * float32(1/(2^(K-1)-1))``."""
    s = np.asarray(states, dtype=np.int64) - norm_offset(K)
    return s.astype(np.float32) * norm_scale(K)


@lru_cache(maxsize=None)
def _cycle_table(K: int, taps: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    n = period(K)
    # Walk the successor of every state, stepped at once: 19 ms for K = 16 against 218 ms for a
    # call of lfsr_next per step (the first SeedLM reconstruction in a process waits for it).
    successor = lfsr_next(np.arange(1 << K, dtype=np.int64), K, taps).tolist()
    walk = [0] * n
    s = 1
    for i in range(n):
        walk[i] = s
        s = successor[s]
        if s == 1 and i != n - 1:
            raise ValueError(f"taps {taps} are not maximal for K={K}: period {i + 1} < {n}")
    table = np.array(walk, dtype=np.int64)
    if s != 1:  # a non-maximal walk that never returns to 1 within n steps visits a state twice
        raise ValueError(f"taps {taps} are not maximal for K={K}")
    index = np.full(1 << K, -1, dtype=np.int64)
    index[table] = np.arange(n)
    if (index[1:] < 0).any():
        raise ValueError(f"taps {taps} are not maximal for K={K}: some states are never visited")
    table.setflags(write=False)
    index.setflags(write=False)
    return table, index


def cycle_table(K: int = DEFAULT_K, taps: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(table, index_of_state)``: states in cycle order from state 1, and the inverse map.

    ``table`` has shape (2^K - 1,) and ``table[0] == 1``; ``index_of_state`` has shape (2^K,) with
    ``index_of_state[table[i]] == i`` and ``index_of_state[0] == -1``. Both are read-only int64.
    Raises ValueError if the taps are not maximal-length.
    """
    return _cycle_table(K, _taps(K, taps))


def seed_windows(seeds, C: int, P: int, K: int = DEFAULT_K, taps: Optional[Sequence[int]] = None) -> np.ndarray:
    """Raw states for many seeds at once: (len(seeds), C, P) int64, via the cycle table."""
    table, index = cycle_table(K, taps)
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
    if ((seeds <= 0) | (seeds >= (1 << K))).any():
        raise ValueError(f"seeds must be valid {K}-bit LFSR states (1..{(1 << K) - 1})")
    pos = (index[seeds][:, None] + 1 + np.arange(C * P)[None, :]) % period(K)
    return table[pos].reshape(-1, C, P)


def seed_matrix(seed: int, C: int, P: int, K: int = DEFAULT_K, taps: Optional[Sequence[int]] = None,
                *, raw: bool = False) -> np.ndarray:
    """The C x P basis of ``seed``: float32 in [-1, 1], or with ``raw=True`` the integer states."""
    states = lfsr_states(seed, C * P, K, taps).reshape(C, P)
    return states if raw else normalize(states, K)


def seed_matrices(seeds, C: int, P: int, K: int = DEFAULT_K, taps: Optional[Sequence[int]] = None) -> np.ndarray:
    """Normalised bases for many seeds: (len(seeds), C, P) float32."""
    return normalize(seed_windows(seeds, C, P, K, taps), K)


def bit_stream(seeds, n: int, K: int = DEFAULT_K, taps: Optional[Sequence[int]] = None) -> np.ndarray:
    """Stream bits ``b_0 .. b_{n-1}`` of each seed (see the module docstring): (len(seeds), n) uint8.

    Read from the cycle table: ``b_i`` is bit 0 of the state i steps after the seed."""
    table, index = cycle_table(K, taps)
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
    if ((seeds <= 0) | (seeds >= (1 << K))).any():
        raise ValueError(f"seeds must be valid {K}-bit LFSR states (1..{(1 << K) - 1})")
    pos = (index[seeds][:, None] + np.arange(n)[None, :]) % period(K)
    return (table[pos] & 1).astype(np.uint8)


def bit_bases(seeds, C: int, P: int, K: int = DEFAULT_K, taps: Optional[Sequence[int]] = None) -> np.ndarray:
    """Two-bit bases for many seeds: (len(seeds), C, P) float32 with entries in {-1.5, -0.5, 0.5, 1.5},
    ``U[c, p] = 2 * b[2Cp + C + c] + b[2Cp + c] - 1.5``."""
    b = bit_stream(seeds, 2 * C * P, K, taps).reshape(-1, P, 2, C).astype(np.float32)
    return (2.0 * b[:, :, 1, :] + b[:, :, 0, :] - 1.5).transpose(0, 2, 1).copy()


BASES = ("states", "bits")


def bases(seeds, C: int, P: int, basis: str, K: int = DEFAULT_K) -> np.ndarray:
    """The (len(seeds), C, P) float32 bases of ``basis`` ("states": ``seed_matrices``; "bits":
    ``bit_bases``)."""
    if basis == "states":
        return seed_matrices(seeds, C, P, K)
    if basis == "bits":
        return bit_bases(seeds, C, P, K)
    raise ValueError(f"unknown SeedLM basis {basis!r} (one of {', '.join(BASES)})")


def kernel_defines(K: int = DEFAULT_K) -> Dict[str, str]:
    """The normalisation constants as C preprocessor values, for kernels (one source of truth)."""
    return {
        "SEEDLM_K": str(K),
        "SEEDLM_NORM_OFFSET": str(norm_offset(K)),
        # repr of a float32 value round-trips exactly through a C float literal
        "SEEDLM_NORM_SCALE": f"{float(norm_scale(K))!r}f",
    }
