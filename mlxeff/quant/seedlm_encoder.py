"""SeedLM encoder: exhaustive seed search over all 2^K - 1 LFSR states per block (arXiv 2410.10714).

For every block ``w`` of C weights SeedLM picks the seed s, the exponent e and the P 4-bit
coefficients c minimising ``||w - 2^(e+exp_base) U_s c||`` where U_s is the C x P basis the seed
generates (``mlxeff.quant.lfsr``; the packed format and its two bases, "states" and "bits", are
described in ``mlxeff.quant.seedlm_format``; the functions here take the basis to fit).
The paper searches every seed; so do we, in two stages:

1. Search (the cost: C(C+1)/2 multiply-adds per seed per block). The unquantised least-squares
   residual of w on span(U_s) is ``||w||^2 - w^T M_s w`` with ``M_s = Q_s Q_s^T`` the orthogonal
   projector (Q_s an orthonormal basis of U_s, from a QR factorisation cached once per (C, P)).
   ``w^T M_s w`` is linear in the C(C+1)/2 products ``w_i w_j`` (i <= j), so the scores of one
   block for all seeds are one row of a single matrix product ``features(W) @ F`` with F of shape
   (C(C+1)/2, 65536): the (blocks x seeds) score matrix is written once per batch and never
   squared or summed -- three to four times less memory traffic than projecting on Q_s (C*P
   columns per seed, then squaring and summing), which is what bounds this search on every
   backend. The best ``candidates`` seeds (largest projected energy) are found exactly in two
   steps: the maxima of groups of 64 consecutive seeds, the top groups, then the top seeds among
   those groups' members (the true top-k always lies in the k groups with the largest maxima).
2. Quantisation, for the candidates only: the least-squares coefficients ``t = pinv(U_s) w``
   (pseudo-inverses cached with the tables), the exponent ``e = ceil(log2(max|t| / 7.5))`` and
   its neighbours e-1 and e+1 (``exponent_window``), and for each exponent every
   rounding of t/2^e to the floor or ceiling per coordinate (2^P codes, clipped to -8..7) -- a
   small exhaustive refit that is never worse than rounding to nearest. The reconstruction error
   of each (seed, exponent, codes) is computed directly (not by a cancelling formula) and the
   smallest wins; exact ties go to the smaller seed, then the smaller exponent, then the first
   rounding pattern, so the result does not depend on reduction order.

Per-tensor exponent base: the 4-bit exponent code covers [exp_base, exp_base + 15]. Each block is
first quantised with an unconstrained exponent (within float32's normal range, and at most
``EXP_CAP_MARGIN`` above ``ceil(log2(max|w| / 7.5))`` so that one ill-conditioned basis with huge
cancelling coefficients cannot push the whole tensor's range up); ``exp_base`` is
then the largest exponent any block chose, minus 15 (clamped to the valid range documented in
``mlxeff.quant.seedlm_format``), and blocks that wanted an exponent below the range are re-encoded with
the constraint (rare: the range spans a factor 2^15).

Partial blocks (a row length that is not a multiple of C) are searched against the first r rows of
each basis, with their own tables, so the zero padding never pulls the fit.

Distribution (``mx.distributed``): blocks are cut into batches of a fixed size on one global grid;
rank i of n encodes a contiguous run of batches, and the per-block results are combined with an
``all_sum`` of zero-initialised arrays (the exponent base with ``all_max``). Because every batch
has the same shape whatever the number of ranks, 1 and n ranks give identical results on a given
machine. Run with ``mlx.launch -n 2 --backend ring -- python script.py`` (CPU) or under NCCL.

Deviations and open choices resolved:
- Seeds are ranked by the unquantised residual and only the best ``candidates`` (default 16) are
  quantised. One candidate is not enough: the seed with the smallest unquantised residual is often
  an ill-conditioned basis whose large, cancelling coefficients do not survive 4-bit rounding
  (iid Gaussian, 4-bit: relative error 1.06 with 1 candidate -- worse than storing zeros --, 0.120
  with 4, 0.1196 with 16 and with 64; benchmarks/seedlm.py quality).
- The paper's exponent is ``floor(log2(max|t|))`` style; we use ``ceil(log2(max|t| / 7.5))`` with
  e +- 1 and a per-tensor base, because the literal rule wastes part of the 4-bit code range.
- The paper quantises by rounding; we refit the integer codes over the 2^P floor/ceil patterns.
- Blocks whose weights are all zero get seed 1, exponent code 0 and zero coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from . import lfsr
from .seedlm_format import (BASIS_LEGACY, CODE_MAX, CODE_MIN, EXP_ABS_MAX, EXP_ABS_MIN, EXP_BASE_MAX, EXP_BASE_MIN,
                            EXP_CODES, pow2)

# First pass: a block's exponent may exceed ceil(log2(max|w| / 7.5)) by at most this much. The best
# quantised fits stay within +-2 of it on Gaussian blocks; the cap only stops an ill-conditioned
# basis with huge cancelling coefficients from setting the whole tensor's exponent base.
EXP_CAP_MARGIN = 3
GROUP = 64  # seeds per group in the two-stage top-k; 2^K is a multiple of it


@dataclass(frozen=True)
class EncoderConfig:
    """Search settings. ``batch=None`` picks 8192 blocks per step on a GPU, 256 on the CPU."""

    candidates: int = 16
    exponent_window: int = 1
    batch: Optional[int] = None

    def batch_size(self) -> int:
        if self.batch is not None:
            return int(self.batch)
        return 8192 if mx.default_device() == mx.gpu else 256


@dataclass
class EncodedMatrix:
    """Unpacked result for one (out, in) matrix: seeds (out, nb) uint16, exponent codes (out, nb)
    uint8 in 0..15, coefficients (out, nb, P) int8 in -8..7, the tensor's exp_base, and the squared
    reconstruction error summed over the matrix."""

    seeds: np.ndarray
    exps: np.ndarray
    coeffs: np.ndarray
    exp_base: int
    sq_error: float
    sq_norm: float


# ----------------------------------------------------------------------------------------------
# tables (cached once per (C, P, rows, K))


class SearchTables:
    """Per-seed data for blocks of ``rows`` valid weights (rows <= C) in a (C, P) configuration.

    Index i in 0..2^K-2 is seed i + 1; index 2^K - 1 is a dummy whose score is -||w||^2 (it pads
    the seed axis to a multiple of ``GROUP`` and is never chosen).
    """

    def __init__(self, C: int, P: int, rows: int, K: int, basis: str = BASIS_LEGACY):
        self.C, self.P, self.rows, self.K, self.basis = C, P, rows, K, basis
        n = lfsr.period(K)
        U = lfsr.bases(np.arange(1, n + 1), C, P, basis, K)[:, :rows, :].astype(np.float64)
        Q, _ = np.linalg.qr(U)  # (n, rows, min(rows, P)); rank-deficient bases are ~never hit
        M = np.einsum("sik,sjk->sij", Q, Q)
        i0, i1 = np.triu_indices(rows)
        weight = np.where(i0 == i1, 1.0, 2.0)
        F = np.empty((len(i0), n + 1))
        F[:, :n] = (M[:, i0, i1] * weight).T
        F[:, n] = np.where(i0 == i1, -1.0, 0.0)  # dummy: score -||w||^2
        pinv = np.linalg.pinv(U)  # (n, P, rows)
        pad = lambda a: np.concatenate([a, np.zeros((1,) + a.shape[1:])], 0).astype(np.float32)
        self.i0 = mx.array(i0.astype(np.int32))
        self.i1 = mx.array(i1.astype(np.int32))
        self.F = mx.array(F.astype(np.float32))
        self.U = mx.array(pad(U))
        self.pinv = mx.array(pad(pinv))
        self.n_seeds = n + 1
        self.compiled = {}


@lru_cache(maxsize=8)
def search_tables(C: int, P: int, rows: int, K: int = lfsr.DEFAULT_K, basis: str = BASIS_LEGACY) -> SearchTables:
    return SearchTables(C, P, rows, K, basis)


def _combos(P: int) -> mx.array:
    grid = np.array(np.meshgrid(*[[0, 1]] * P, indexing="ij")).reshape(P, -1).T
    return mx.array(grid.astype(np.float32))  # (2^P, P), pattern 0 = all floors


# ----------------------------------------------------------------------------------------------
# the two stages on one batch (pure functions of MLX arrays)


def topk_seeds(W: mx.array, t: SearchTables, k: int) -> mx.array:
    """(B, rows) blocks -> (B, k) seed indices with the largest projected energy, ascending."""
    B = W.shape[0]
    f = W[:, t.i0] * W[:, t.i1]
    s = f @ t.F  # (B, 2^K)
    gmax = s.reshape(B, -1, GROUP).max(axis=-1)
    kg = min(k, gmax.shape[1])
    gi = mx.argpartition(-gmax, kth=kg - 1, axis=-1)[:, :kg]
    cand = (gi[:, :, None] * GROUP + mx.arange(GROUP, dtype=gi.dtype)).reshape(B, -1)
    cs = mx.take_along_axis(s, cand, axis=-1)
    ti = mx.argpartition(-cs, kth=k - 1, axis=-1)[:, :k]
    return mx.sort(mx.take_along_axis(cand, ti, axis=-1), axis=-1)


def quantise_candidates(W: mx.array, cand: mx.array, t: SearchTables, lo, hi,
                        window: int) -> Tuple[mx.array, mx.array, mx.array, mx.array]:
    """Best (seed index, absolute exponent, codes, squared error) per block among the candidates,
    with exponents restricted to [lo, hi] (scalars or (B, 1) arrays)."""
    B, k = cand.shape
    Uc = t.U[cand]  # (B, k, rows, P)
    coef = (t.pinv[cand] @ W[:, None, :, None])[..., 0]  # (B, k, P)
    m = mx.abs(coef).max(axis=-1)
    safe = mx.maximum(m, mx.array(1e-38, dtype=m.dtype))
    e0 = mx.where(m > 0, mx.ceil(mx.log2(safe / 7.5)), lo)
    combos = _combos(t.P)
    errs, exps, codes = [], [], []
    for d in range(-window, window + 1):
        e = mx.clip(e0 + d, lo, hi)  # (B, k)
        scale = pow2(e)
        fl = mx.floor(coef / scale[..., None])
        c = mx.clip(fl[:, :, None, :] + combos, CODE_MIN, CODE_MAX)  # (B, k, M, P)
        rec = (c @ Uc.swapaxes(-1, -2)) * scale[..., None, None]  # (B, k, M, rows)
        err = mx.square(rec - W[:, None, None, :]).sum(axis=-1)  # (B, k, M)
        errs.append(err)
        exps.append(mx.broadcast_to(e[..., None], err.shape))
        codes.append(c)
    # order (k, d, pattern): candidates are sorted by seed, d ascends -> lexicographic tie-break
    err = mx.stack(errs, axis=2)  # (B, k, D, M)
    err = mx.where((cand == t.n_seeds - 1)[..., None, None], mx.array(float("inf")), err)
    flat = err.reshape(B, -1)
    best = flat.min(axis=-1, keepdims=True)
    pos = mx.arange(flat.shape[1], dtype=mx.int32)
    idx = mx.where(flat == best, pos, flat.shape[1]).min(axis=-1)  # first minimum
    D, M = len(errs), combos.shape[0]
    ki, rest = idx // (D * M), idx % (D * M)
    di, mi = rest // M, rest % M
    take = lambda a, *ix: a[(mx.arange(B),) + ix]
    seed_idx = take(cand, ki)
    e_best = take(mx.stack(exps, axis=2), ki, di, mi)
    c_best = take(mx.stack(codes, axis=2), ki, di, mi)  # (B, P)
    return seed_idx, e_best.astype(mx.int32), c_best.astype(mx.int32), best[:, 0]


# ----------------------------------------------------------------------------------------------
# encoding a set of blocks (distributed) and a matrix


def _group(group):
    return group if group is not None else mx.distributed.init()


def _rank_batches(n: int, batch: int, group) -> range:
    nbatch = -(-n // batch)
    r, size = group.rank(), group.size()
    return range(nbatch * r // size, nbatch * (r + 1) // size)


def _pad_batch(blocks: np.ndarray, start: int, batch: int) -> mx.array:
    chunk = blocks[start:start + batch]
    if len(chunk) < batch:
        chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), chunk.shape[1]), chunk.dtype)])
    return mx.array(chunk)


def encode_blocks(parts, C: int, P: int, *, K: int = lfsr.DEFAULT_K,
                  config: EncoderConfig = EncoderConfig(), group=None,
                  progress=None, basis: str = BASIS_LEGACY):
    """Encode one tensor given as parts of blocks, each (n_i, rows_i) float32 with rows_i <= C, for
    ``basis`` (``mlxeff.quant.seedlm_format``: "states" or "bits").

    All parts share one exponent base. Returns ``(exp_base, [(seeds uint16 (n_i,), exps uint8
    (n_i,), coeffs int8 (n_i, P), sq_err float32 (n_i,)) per part])``, identical on every rank.
    ``progress``: a bar from ``mlxeff.progress.bar`` (or None), advanced by the blocks encoded.
    """
    group = _group(group)
    batch = config.batch_size()
    window = config.exponent_window
    states = []
    for blocks in parts:
        blocks = np.ascontiguousarray(blocks, dtype=np.float32)
        n, rows = blocks.shape
        tables = search_tables(C, P, rows, K, basis)
        k = max(1, min(config.candidates, tables.n_seeds - 1))
        states.append(_PartState(blocks, tables, k, _rank_batches(n, batch, group)))

    # 1. every block with an unconstrained exponent
    top = -1e9
    for st in states:
        for b in st.mine:
            st.run(b, batch, window, EXP_ABS_MIN, st.exp_cap)
            if progress is not None:
                _advance(progress, st.batch_len(b, batch) * group.size())
        live = [st.exp[st.slice(b, batch)][st.norms[st.slice(b, batch)] > 0] for b in st.mine]
        live = np.concatenate(live) if live else np.zeros(0, np.int32)
        if live.size:
            top = max(top, float(live.max()))
    if group.size() > 1:
        top = float(mx.distributed.all_max(mx.array(top, dtype=mx.float32), group=group).item())
    exp_base = choose_exp_base(None if top < -1e8 else int(top))
    lo, hi = exp_base, exp_base + EXP_CODES - 1

    # 2. re-encode the batches holding blocks whose exponent falls outside the tensor's range
    results = []
    for st in states:
        for b in st.mine:
            sl = st.slice(b, batch)
            redo = ((st.exp[sl] < lo) | (st.exp[sl] > hi)) & (st.norms[sl] > 0)
            if redo.any():
                st.run(b, batch, window, lo, hi, only=redo)
        results.append(st.finish(exp_base, batch, group))
    return exp_base, results


def _advance(progress, n: int) -> None:
    # Each rank advances the bar by its batch times the number of ranks (they run in step; only
    # rank 0's bar is shown), which overshoots where the last batches are short: stop at the total.
    if progress.total is not None:
        n = min(n, progress.total - progress.n)
    progress.update(max(n, 0))


class _PartState:
    """Per-part buffers of ``encode_blocks`` (absolute exponents until ``finish``)."""

    def __init__(self, blocks, tables, k, mine):
        n, P = len(blocks), tables.P
        self.blocks, self.tables, self.k, self.mine, self.P = blocks, tables, k, mine, P
        self.norms = np.square(blocks).sum(axis=1)
        peak = np.abs(blocks).max(axis=1) if blocks.shape[1] else np.zeros(n, np.float32)
        with np.errstate(divide="ignore"):
            cap = np.ceil(np.log2(peak / 7.5)) + EXP_CAP_MARGIN
        self.exp_cap = np.clip(np.nan_to_num(cap, neginf=EXP_ABS_MIN), EXP_ABS_MIN, EXP_ABS_MAX).astype(np.float32)
        self.seed = np.zeros(n, np.int32)
        self.exp = np.zeros(n, np.int32)
        self.code = np.zeros((n, P), np.int32)
        self.err = np.zeros(n, np.float32)

    def slice(self, b, batch):
        return slice(b * batch, min((b + 1) * batch, len(self.blocks)))

    def batch_len(self, b, batch):
        s = self.slice(b, batch)
        return s.stop - s.start

    def run(self, b, batch, window, lo, hi, only=None):
        """Encode batch b with exponents in [lo, hi] (scalars, or per-block arrays over all blocks)."""
        W = _pad_batch(self.blocks, b * batch, batch)
        bounds = []
        for v in (lo, hi):
            v = np.broadcast_to(np.asarray(v, np.float32), (len(self.blocks),))[b * batch:(b + 1) * batch]
            bounds.append(np.pad(v, (0, batch - len(v)), constant_values=EXP_ABS_MIN)[:, None])
        out = _search_and_quantise(W, self.tables, self.k, bounds[0], bounds[1], window)
        mx.eval(out)
        sl = self.slice(b, batch)
        m = sl.stop - sl.start
        for dst, src in zip((self.seed, self.exp, self.code, self.err), out):
            src = np.array(src)[:m]
            if only is None:
                dst[sl] = src
            else:
                dst[sl][only] = src[only]

    def finish(self, exp_base, batch, group):
        P = self.P
        code_e = np.clip(self.exp - exp_base, 0, EXP_CODES - 1)
        zero = self.norms == 0  # all-zero blocks: seed 1, zero codes
        self.seed[zero], code_e[zero], self.code[zero], self.err[zero] = 0, 0, 0, 0.0
        seed, code, err = self.seed, self.code, self.err
        if group.size() > 1:
            n = len(self.blocks)
            packed = np.zeros((n, P + 2), np.int32)
            errs = np.zeros(n, np.float32)
            for b in self.mine:
                sl = self.slice(b, batch)
                packed[sl, 0], packed[sl, 1], packed[sl, 2:] = seed[sl], code_e[sl], code[sl]
                errs[sl] = err[sl]
            packed = np.array(mx.distributed.all_sum(mx.array(packed), group=group))
            err = np.array(mx.distributed.all_sum(mx.array(errs), group=group))
            seed, code_e, code = packed[:, 0], packed[:, 1], packed[:, 2:]
        return ((seed + 1).astype(np.uint16), code_e.astype(np.uint8), code.astype(np.int8), err)


def _search_and_quantise(W, tables, k, lo, hi, window):
    # compiled once per (tables, k, window, batch shape); the tables are captured as constants
    key = (k, window, W.shape)
    fn = tables.compiled.get(key)
    if fn is None:
        def fn(W, lo, hi):
            cand = topk_seeds(W, tables, k)
            return quantise_candidates(W, cand, tables, lo, hi, window)
        fn = tables.compiled[key] = mx.compile(fn)
    return fn(W, mx.array(lo), mx.array(hi))


def choose_exp_base(top_exponent: Optional[int]) -> int:
    """The tensor's exponent base: the largest chosen exponent must be code 15 (clamped so that
    every code maps to a normal float32); 0 for an all-zero tensor."""
    if top_exponent is None:
        return 0
    return int(min(max(top_exponent - (EXP_CODES - 1), EXP_BASE_MIN), EXP_BASE_MAX))


def split_blocks(W: np.ndarray, C: int):
    """(out, in) -> full blocks (out * (in // C), C) and the row tails (out, in % C) or None."""
    out, inp = W.shape
    nf = inp // C
    full = W[:, :nf * C].reshape(out * nf, C)
    tail = W[:, nf * C:] if inp % C else None
    return full, tail


def encode_matrix(W, C: int, P: int, *, K: int = lfsr.DEFAULT_K,
                  config: EncoderConfig = EncoderConfig(), group=None,
                  progress=None, basis: str = BASIS_LEGACY) -> EncodedMatrix:
    """Encode one (out, in) weight matrix; every rank returns the same result."""
    W = np.asarray(W.astype(mx.float32) if isinstance(W, mx.array) else W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {W.shape}")
    out, inp = W.shape
    nf, nb = inp // C, -(-inp // C)
    full, tail = split_blocks(W, C)
    seeds = np.zeros((out, nb), np.uint16)
    exps = np.zeros((out, nb), np.uint8)
    coeffs = np.zeros((out, nb, P), np.int8)
    parts, where = [], []
    if nf:
        parts.append(full)
        where.append(slice(0, nf))
    if tail is not None:
        parts.append(tail)
        where.append(slice(nf, nb))
    exp_base, results = encode_blocks(parts, C, P, K=K, config=config, group=group,
                                      progress=progress, basis=basis)
    sq_err = 0.0
    for cols, (s, e, c, err) in zip(where, results):
        seeds[:, cols] = s.reshape(out, -1)
        exps[:, cols] = e.reshape(out, -1)
        coeffs[:, cols] = c.reshape(out, -1, P)
        sq_err += float(err.astype(np.float64).sum())
    return EncodedMatrix(seeds, exps, coeffs, exp_base, sq_err,
                         float(np.square(W, dtype=np.float64).sum()))
