"""Training objective for KV Prediction (arXiv 2410.08391): base frozen, auxiliary + predictor learn.

For a batch of packed token sequences (inputs ``x``, next-token targets ``y``):

1. the auxiliary model reads ``x``: its logits give ``CE_aux`` and its raw keys and values (before
   k_norm/RoPE) go through the predictor, giving a predicted KV cache for every base layer;
2. the base model reads ``x`` with its attention's keys and values *replaced* by the prediction
   (base k_norm and RoPE applied to the predicted keys): every base query at position ``t`` attends
   to the predicted keys/values at positions ``0..t``. Its cross-entropy is ``CE_base`` — the loss
   of generating from the predicted cache. Gradients reach the predictor and the auxiliary model
   through the predicted cache only; the base's weights are frozen;
3. the base model also reads ``x`` normally (no gradient) for its own cache; the consistency loss
   is, per base layer, the mean absolute error of the predicted keys (after the base's k_norm,
   before RoPE) and of the predicted values against the base's own, summed over layers.

``loss = CE_base + CE_aux + lambda * sum_layers (L1_K + L1_V)``, ``lambda = 1 / n_base_layers``
by default (configurable; 0 switches the consistency loss off, which is the ablation).

Matches CoreNet's ``KVPredictionLLM`` training forward (``concat_kvs=False``: the base uses only
predicted KVs, including at the query's own position) and ``CrossEntropyForKVPrediction``.
Deviations: no z-loss (CoreNet's configs add one with weight 1e-4), no label smoothing, and no
ignore-index (packed sequences have no padding). CoreNet's released configs weight the
consistency term with 1 rather than ``1/n_layers``; ``--kv-weight 1`` reproduces that.
At inference the base's last prompt position uses its own KV, not a predicted one (as in CoreNet).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..models import Model
from .kv_prediction import KVPrediction, KVPredictor, base_view_keys, capture_kv, raw_kv


class _Ref:
    """Holds the frozen base outside the module tree: its weights are neither trained nor saved."""

    def __init__(self, model):
        self.model = model


class KVPredictionModel(nn.Module):
    """Auxiliary model + predictor (trainable) with a reference to the frozen base."""

    def __init__(self, base: Model, auxiliary: Model, predictor: KVPredictor):
        super().__init__()
        base.freeze()
        self._ref = _Ref(base)
        self.auxiliary = auxiliary
        self.predictor = predictor

    @property
    def base(self) -> Model:
        return self._ref.model

    def artifact(self, info: Optional[dict] = None) -> KVPrediction:
        return KVPrediction(self.auxiliary, self.predictor, dict(info or {}))


@dataclass
class KVLossConfig:
    kv_weight: Optional[float] = None  # lambda; None -> 1 / number of base layers
    base_weight: float = 1.0
    aux_weight: float = 1.0

    def resolved_kv_weight(self, num_base_layers: int) -> float:
        return 1.0 / num_base_layers if self.kv_weight is None else float(self.kv_weight)


@contextmanager
def predicted_attention(base: Model, keys: Sequence[mx.array], values: Sequence[mx.array]):
    """Make every base attention use the given keys (base view, before RoPE) and values."""
    saved = []
    for layer, k, v in zip(base.layers, keys, values):
        attn = layer.attn
        prev = attn.attention_fn
        k_rot = attn.rope(k)

        def fn(q, _k, _v, *, scale, mask, cache=None, k_=k_rot, v_=v, prev_=prev):
            return prev_(q, k_, v_.astype(q.dtype), scale=scale, mask=mask, cache=cache)

        attn.attention_fn = fn
        saved.append((attn, prev))
    try:
        yield
    finally:
        for attn, prev in saved:
            attn.attention_fn = prev


def base_kv(base: Model, inputs: mx.array) -> Tuple[List[mx.array], List[mx.array]]:
    """The base's own keys (after k_norm, before RoPE) and values, without gradient."""
    with capture_kv(base) as sinks:
        h = base.transformer(inputs)
    keys, values = raw_kv(sinks)
    keys = base_view_keys(base, keys)
    del h
    return [mx.stop_gradient(k) for k in keys], [mx.stop_gradient(v) for v in values]


def _ce(logits: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


def kv_prediction_terms(model: KVPredictionModel, batch: mx.array) -> Dict[str, mx.array]:
    """All loss terms for ``batch`` (B, L+1): ce_base, ce_aux, k_l1, v_l1 (sums over layers)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    base, aux = model.base, model.auxiliary
    true_k, true_v = base_kv(base, inputs)
    with capture_kv(aux) as sinks:
        aux_logits = aux(inputs)
    aux_k, aux_v = raw_kv(sinks)
    pred_k, pred_v = model.predictor(aux_k, aux_v)
    pred_k = base_view_keys(base, pred_k)
    with predicted_attention(base, pred_k, pred_v):
        base_logits = base(inputs)
    k_l1 = sum(mx.abs(p.astype(mx.float32) - t.astype(mx.float32)).mean()
               for p, t in zip(pred_k, true_k))
    v_l1 = sum(mx.abs(p.astype(mx.float32) - t.astype(mx.float32)).mean()
               for p, t in zip(pred_v, true_v))
    return {"ce_base": _ce(base_logits, targets), "ce_aux": _ce(aux_logits, targets),
            "k_l1": k_l1, "v_l1": v_l1}


def make_loss_fn(cfg: KVLossConfig) -> Callable[[KVPredictionModel, mx.array], tuple]:
    """``loss_fn(model, batch) -> (loss, metrics)`` for the training loop."""

    def loss_fn(model: KVPredictionModel, batch: mx.array):
        t = kv_prediction_terms(model, batch)
        lam = cfg.resolved_kv_weight(model.base.args.num_transformer_layers)
        kv = t["k_l1"] + t["v_l1"]
        loss = cfg.base_weight * t["ce_base"] + cfg.aux_weight * t["ce_aux"] + lam * kv
        return loss, {**t, "kv_l1": kv}

    return loss_fn


def base_ce(base: Model, batch: mx.array) -> mx.array:
    """The base's own cross-entropy on ``batch`` (the floor ``ce_base`` approaches)."""
    return _ce(base(batch[:, :-1]), batch[:, 1:])


def evaluate(model: KVPredictionModel, batches: Sequence[mx.array]) -> Dict[str, float]:
    """Mean loss terms over ``batches`` plus the base's own cross-entropy."""
    sums: Dict[str, float] = {}
    for b in batches:
        t = kv_prediction_terms(model, b)
        t["kv_l1"] = t["k_l1"] + t["v_l1"]
        t["ce_base_own"] = base_ce(model.base, b)
        mx.eval(t)
        for k, v in t.items():
            sums[k] = sums.get(k, 0.0) + v.item()
    return {k: v / max(len(batches), 1) for k, v in sums.items()}
