"""Superposition prompting's forwards: the preamble, the document paths and the query copies
batched (the paper's path parallelisation), or the whole fork-join graph in one pass with its mask.

Every forward is the model's own (``Transformer.forward_layers`` with explicit ``positions`` and
``mask``); a batched pass hands each layer a stand-in cache (``_PathLayer``) that puts the path's
ancestors' keys and values (the preamble, and for a query copy its document) before the rows' own,
row ``b`` of the batch being path ``b``. Batches are formed from paths sorted by length, up to
``batch_tokens`` padded tokens each; padded keys are masked, padded rows discarded.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..cache import PositionedKVCache
from .superposition_cache import SegmentKV, position_array
from .superposition_graph import Layout, Segment, forkjoin_mask, positions_of, serialize


class _PathLayer:
    """A cache stand-in for one layer of a batched path forward: the ancestors' keys and values
    (B, KVH, S, D) come before the rows' own; the rows' own are kept in ``new``."""

    attend_index = None
    raw_sink = None

    def __init__(self, keys: mx.array, values: mx.array, want_scores: bool = False):
        self.prefix = (keys, values)
        self.new: Optional[Tuple[mx.array, mx.array]] = None
        self.want_scores = want_scores
        self.scores: Optional[mx.array] = None

    def update_and_fetch(self, keys, values, positions=None):
        self.new = (keys, values)
        pk, pv = self.prefix
        return mx.concatenate([pk, keys], axis=2), mx.concatenate([pv, values], axis=2)


def mean_logprob(model, hidden: mx.array, targets: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row of ``hidden`` (B, T, d): the mean log-probability the model gives ``targets``
    (B, T) over the ``valid`` (B, T) entries; 0 for a row with none."""
    B, T = targets.shape
    if T == 0:
        return np.zeros(B)
    logits = model.logits(model.transformer.norm(hidden)).astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.array(targets.astype(np.int32))[..., None], axis=-1)[..., 0]
    lp = np.array(picked - mx.logsumexp(logits, axis=-1))
    count = valid.sum(axis=1)
    return np.where(count > 0, (lp * valid).sum(axis=1) / np.maximum(count, 1), 0.0)


def _groups(order: Sequence[int], lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Consecutive runs of ``order`` (sorted by length) whose padded size fits ``budget`` tokens."""
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * max(lengths[j] for j in cur + [i]) > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def _pad(rows: Sequence[np.ndarray], width: int, fill_last: bool = True) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.asarray(rows[0]).dtype)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
        if fill_last and len(r) < width:
            out[b, len(r):] = r[-1]
    return out


def run_preamble(model, ids: Sequence[int], positions: np.ndarray) -> SegmentKV:
    """The preamble alone, as the plain path computes a prompt (it sits at 0, 1, ...)."""
    t = model.transformer
    cache = [PositionedKVCache() for _ in t.layers]
    t(mx.array(np.asarray(ids, dtype=np.uint32))[None], cache=cache)
    seg = SegmentKV.from_arrays([c.keys[..., : c.offset, :] for c in cache],
                                [c.values[..., : c.offset, :] for c in cache], positions)
    mx.eval(seg.arrays())
    return seg


def run_documents(model, preamble: SegmentKV, documents: Sequence[Sequence[int]],
                  positions: Sequence[np.ndarray], batch_tokens: int) -> List[SegmentKV]:
    """Each document after the preamble (its own path), batched; with each document's mean
    log-likelihood (token j + 1 predicted at token j, within the document)."""
    t = model.transformer
    L = len(t.layers)
    lengths = [len(d) for d in documents]
    out: List[Optional[SegmentKV]] = [None] * len(documents)
    for group in _groups(sorted(range(len(documents)), key=lambda i: lengths[i]), lengths, batch_tokens):
        B, W = len(group), max(lengths[i] for i in group)
        ids = _pad([np.asarray(documents[i], dtype=np.int64) for i in group], W)
        pos = _pad([positions[i] for i in group], W)
        layers = []
        for l in range(L):
            k, v = preamble.keys(l), preamble.values(l)
            layers.append(_PathLayer(mx.broadcast_to(k, (B, *k.shape[1:])),
                                     mx.broadcast_to(v, (B, *v.shape[1:]))))
        h = t.forward_layers(t.token_embeddings(mx.array(ids.astype(np.uint32))), 0, L, layers,
                             positions=position_array(pos), mask="causal")
        valid = np.arange(W - 1)[None, :] < (np.array([lengths[i] for i in group]) - 1)[:, None]
        ll = mean_logprob(model, h[:, :-1], ids[:, 1:], valid)
        for b, i in enumerate(group):
            n = lengths[i]
            out[i] = SegmentKV.from_arrays([c.new[0][b:b + 1, :, :n] for c in layers],
                                           [c.new[1][b:b + 1, :, :n] for c in layers],
                                           positions[i], ll[b])
        mx.eval([a for i in group for a in out[i].arrays()])
    return out


def run_queries(model, preamble: SegmentKV, documents: Sequence[SegmentKV], query: Sequence[int],
                positions: np.ndarray, batch_tokens: int, attention: bool = False):
    """A copy of the query after every document (each after the preamble and its own document),
    batched. Returns the copies' segments, their mean log-likelihoods (within the query), and with
    ``attention`` each path's attention score: the last query token's attention mass on its
    document, averaged over heads and layers."""
    t = model.transformer
    L, P, m = len(t.layers), preamble.size, len(query)
    lengths = [d.size for d in documents]
    n = len(documents)
    segs: List[Optional[SegmentKV]] = [None] * n
    ll, att = np.zeros(n), np.zeros(n)
    order = sorted(range(n), key=lambda i: lengths[i])
    per = max(1, batch_tokens // m)  # query copies per batch
    for group in [order[s:s + per] for s in range(0, n, per)]:
        B, W = len(group), max(lengths[i] for i in group)
        layers = []
        for l in range(L):
            ks, vs = [], []
            for i in group:
                pad = W - lengths[i]
                k, v = documents[i].keys(l), documents[i].values(l)
                if pad:
                    z = mx.zeros((1, k.shape[1], pad, k.shape[3]), dtype=k.dtype)
                    k, v = mx.concatenate([k, z], axis=2), mx.concatenate([v, z], axis=2)
                ks.append(k)
                vs.append(v)
            pk, pv = preamble.keys(l), preamble.values(l)
            layers.append(_PathLayer(
                mx.concatenate([mx.broadcast_to(pk, (B, *pk.shape[1:])), mx.concatenate(ks, axis=0)], axis=2),
                mx.concatenate([mx.broadcast_to(pv, (B, *pv.shape[1:])), mx.concatenate(vs, axis=0)], axis=2),
                want_scores=attention))
        seen = np.zeros((B, m, P + W + m), dtype=bool)
        for b, i in enumerate(group):
            seen[b, :, : P + lengths[i]] = True
        seen[:, :, P + W:] = np.tril(np.ones((m, m), dtype=bool))
        ids = np.tile(np.asarray(query, dtype=np.int64), (B, 1))
        h = t.forward_layers(t.token_embeddings(mx.array(ids.astype(np.uint32))), 0, L, layers,
                             positions=position_array(np.tile(positions, (B, 1))),
                             mask=mx.array(seen)[:, None])
        ll[group] = mean_logprob(model, h[:, :-1], ids[:, 1:], np.ones((B, m - 1), dtype=bool))
        if attention:
            att[group] = _document_attention(layers, seen[:, -1], P, [lengths[i] for i in group])
        for b, i in enumerate(group):
            segs[i] = SegmentKV.from_arrays([c.new[0][b:b + 1] for c in layers],
                                            [c.new[1][b:b + 1] for c in layers], positions, ll[i])
        mx.eval([a for i in group for a in segs[i].arrays()])
    return segs, ll, att


def _document_attention(layers, seen_last: np.ndarray, P: int, lengths: Sequence[int]) -> np.ndarray:
    """Mass of the last query row's attention on each path's document, renormalised over the keys
    that row may see (the softmax the cache reports runs over padded keys too; restricting a
    softmax to a subset is renormalising it), averaged over heads, then layers."""
    total = np.zeros(len(lengths))
    on_doc = np.zeros(seen_last.shape, dtype=bool)
    for b, n in enumerate(lengths):
        on_doc[b, P:P + n] = True
    for c in layers:
        s = np.array(c.scores.astype(mx.float32))  # (B, H, S)
        c.want_scores, c.scores = False, None
        visible = (s * seen_last[:, None]).sum(-1)
        total += ((s * on_doc[:, None]).sum(-1) / visible).mean(axis=1)
    return total / len(layers)


def run_single_pass(model, preamble: Sequence[int], documents: Sequence[Sequence[int]],
                    query: Sequence[int], lay: Layout):
    """The whole graph in one forward with the fork-join mask (no path caching, no batching):
    ``[preamble][doc 1][query 1] ... [doc n][query n]``. Returns the preamble's, the documents' and
    the query copies' segments (cut from the one cache), and the documents' and queries' mean
    log-likelihoods (within each segment, as the batched passes compute them)."""
    lengths = [len(d) for d in documents]
    segs = serialize(len(preamble), lengths, len(query))
    ids = np.concatenate([np.asarray(preamble)] + [np.concatenate([d, query]) for d in documents])
    pos = positions_of(segs, lay)
    cache = [PositionedKVCache() for _ in model.layers]
    t = model.transformer
    h = t(mx.array(ids.astype(np.uint32))[None], cache=cache, positions=position_array(pos)[None],
          mask=mx.array(forkjoin_mask(segs))[None, None])

    def cut(s: Segment, loglik=float("nan")) -> SegmentKV:
        return SegmentKV.from_arrays([c.keys[..., s.start:s.stop, :] for c in cache],
                                     [c.values[..., s.start:s.stop, :] for c in cache],
                                     pos[s.start:s.stop], loglik)

    def loglik(s: Segment) -> float:
        if s.size < 2:
            return 0.0
        rows = h[:, s.start:s.stop - 1]
        return float(mean_logprob(model, rows, ids[None, s.start + 1:s.stop],
                                  np.ones((1, s.size - 1), dtype=bool))[0])

    pre = cut(segs[0])
    docs = [cut(s, loglik(s)) for s in segs[1::2]]
    queries = [cut(s, loglik(s)) for s in segs[2::2]]
    mx.eval(pre.arrays(), [d.arrays() for d in docs], [q.arrays() for q in queries])
    return pre, docs, queries
