"""KV Prediction training objective: exact at the identity, base frozen, consistency loss falls."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from conftest import make_model
from mlxeff.techniques import kv_prediction as kvp
from mlxeff.techniques.kv_prediction_train import (
    KVLossConfig, KVPredictionModel, base_ce, evaluate, kv_prediction_terms, make_loss_fn,
)


def _batch(seed=0, B=2, L=24, vocab=96):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (B, L + 1)), dtype=mx.int32)


def _wrap(base, layers, init="identity"):
    aux = kvp.layer_pruned_model(base, layers)
    lmap = kvp.pruned_layer_map(layers, base.args.num_transformer_layers)
    return KVPredictionModel(base, aux, kvp.KVPredictor.for_models(aux, base, lmap, init=init))


def test_identity_objective_equals_the_base():
    base = make_model()
    m = _wrap(base, list(range(4)))
    batch = _batch()
    t = kv_prediction_terms(m, batch)
    ref = base_ce(base, batch)
    np.testing.assert_allclose(t["ce_base"].item(), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(t["ce_aux"].item(), ref.item(), rtol=1e-5)
    assert t["k_l1"].item() < 1e-5 and t["v_l1"].item() < 1e-5


def test_only_auxiliary_and_predictor_are_trainable_and_saved():
    base = make_model()
    m = _wrap(base, [0, 2])
    names = [k for k, _ in tree_flatten(m.trainable_parameters())]
    assert names and all(k.startswith(("auxiliary.", "predictor.")) for k in names)
    assert all(k.startswith(("auxiliary.", "predictor.")) for k, _ in tree_flatten(m.parameters()))
    assert any(k.startswith("predictor.k_proj.") for k in names)


def _train(m, cfg, steps=30, lr=3e-3):
    loss_fn = make_loss_fn(cfg)
    opt = optim.Adam(learning_rate=lr)
    step = nn.value_and_grad(m, lambda model, b: loss_fn(model, b)[0])
    for i in range(steps):
        _, grads = step(m, _ramps(seed=i % 8))
        opt.update(m, grads)
        mx.eval(m.parameters(), opt.state)


def _ramps(seed=0, B=4, L=24, vocab=96):
    """Learnable sequences: (a + b*t) mod vocab."""
    r = np.random.default_rng(seed)
    a, b = r.integers(0, vocab, (B, 1)), r.integers(1, 5, (B, 1))
    return mx.array((a + b * np.arange(L + 1)) % vocab, dtype=mx.int32)


def test_consistency_loss_falls_and_the_base_stays_frozen():
    base = make_model(seed=1)
    before = {k: np.array(v) for k, v in tree_flatten(base.parameters())}
    m = _wrap(base, [0, 2], init="random")
    valid = [_ramps(seed=99)]
    first = evaluate(m, valid)
    _train(m, KVLossConfig(kv_weight=1.0, base_weight=0.0, aux_weight=0.0))
    last = evaluate(m, valid)
    assert last["kv_l1"] < 0.7 * first["kv_l1"], (first, last)
    for k, v in tree_flatten(base.parameters()):
        np.testing.assert_array_equal(np.array(v), before[k])
    assert abs(last["ce_base_own"] - first["ce_base_own"]) < 1e-6


def test_default_objective_lowers_every_term():
    base = make_model(seed=2)
    m = _wrap(base, [0, 2], init="random")
    valid = [_ramps(seed=98)]
    first = evaluate(m, valid)
    _train(m, KVLossConfig(), steps=40)
    last = evaluate(m, valid)
    for k in ("ce_base", "ce_aux", "kv_l1"):
        assert last[k] < first[k], (k, first, last)


def test_kv_weight_default_and_zero():
    base = make_model()
    m = _wrap(base, [0, 2], init="random")
    b = _batch()
    t = kv_prediction_terms(m, b)
    default, _ = make_loss_fn(KVLossConfig())(m, b)
    zero, metrics = make_loss_fn(KVLossConfig(kv_weight=0.0))(m, b)
    kv = (t["k_l1"] + t["v_l1"]).item()
    np.testing.assert_allclose(zero.item(), t["ce_base"].item() + t["ce_aux"].item(), rtol=1e-5)
    np.testing.assert_allclose(default.item(), zero.item() + kv / 4, rtol=1e-5)
    np.testing.assert_allclose(metrics["kv_l1"].item(), kv, rtol=1e-6)
