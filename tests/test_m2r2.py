"""M2R2 (arXiv 2502.02040): the fast stream's shape, exactness at r = 1 with zero adapters, the
shared-KV training forward against drafting, training (base frozen, objective falls), the artifact,
the router, and `mlxeff train-m2r2` as a user meets it."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxeff
from conftest import TEXT, make_model
from mlxeff.errors import MlxeffError
from mlxeff.models import layerwise_config
from mlxeff.techniques.early_exit import DraftLength
from mlxeff.techniques.m2r2 import (
    M2R2, FastStream, M2R2Config, M2R2Drafter, adapters_on, fast_steps, target_depths,
)
from mlxeff.techniques.m2r2_train import (
    M2R2LossConfig, M2R2Model, _SharedKV, m2r2_terms, make_loss_fn, shared_mask, slow_pass,
)
from test_kv_prediction_cli import assert_error, run_cli


def model6(seed=1):
    return make_model(layerwise_config(6, 64, 16, vocab_size=96, ffn_dim_divisor=32), seed=seed)


def batch(seed=0, B=2, L=20, vocab=96):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (B, L + 1)), dtype=mx.int32)


def randomise(stream: FastStream, seed=0, scale=0.1) -> FastStream:
    rng = np.random.default_rng(seed)
    for step in stream.steps:
        for name in ("qkv_proj", "out_proj", "proj_1", "proj_2"):
            ad = getattr(step, name)
            ad.b = mx.array(rng.normal(0, scale, ad.b.shape).astype(np.float32))
    return stream


def fast_logits(model, stream, inputs):
    states, kv, slow = slow_pass(model, inputs, stream.config.steps)
    final = stream(model, states[0], [_SharedKV(k, v) for k, v in kv],
                   mask=shared_mask(inputs.shape[1]))
    return model.logits(model.transformer.norm(final)), slow


def test_steps_and_target_depths():
    assert fast_steps(17, 2) == 9 and target_depths(17, 9) == [2, 4, 6, 8, 9, 11, 13, 15, 17]
    assert fast_steps(17, 4) == 5 and target_depths(17, 5)[-1] == 17
    assert fast_steps(12, 1) == 12 and target_depths(12, 12) == list(range(1, 13))
    assert fast_steps(12, 3) == 4 and target_depths(12, 4) == [3, 6, 9, 12]
    with pytest.raises(MlxeffError, match="at least 1"):
        fast_steps(12, 0.5)


def test_zero_adapters_at_rate_one_give_the_slow_streams_logits():
    model = model6()
    stream = FastStream(model.args, M2R2Config.for_model(model.args, 1.0, 4))
    inputs = batch()[:, :-1]
    fast, slow = fast_logits(model, stream, inputs)
    np.testing.assert_allclose(np.array(fast), np.array(slow), atol=1e-5)
    np.testing.assert_allclose(np.array(slow), np.array(model(inputs)), atol=1e-5)
    t = m2r2_terms(M2R2Model(model, stream), batch())
    assert t["align"].item() < 1e-10 and abs(t["kd"].item()) < 1e-5 and t["agree"].item() == 1.0


def test_zero_adapters_at_rate_one_draft_what_the_model_decodes():
    model = model6()
    stream = FastStream(model.args, M2R2Config.for_model(model.args, 1.0, 4))
    prompt = list(range(10, 30))
    cache = model.make_cache()
    model(mx.array([prompt]), cache=cache)
    d = M2R2Drafter(stream, 6, threshold=0.0, policy=DraftLength(6, cost=0.01, prior=0.99))
    d.start(model, prompt, cache)
    draft = d.propose(prompt + [7], 6).tokens
    ref_cache = model.make_cache()
    model(mx.array([prompt]), cache=ref_cache)
    expected, token = [], 7
    for _ in range(6):
        token = int(mx.argmax(model(mx.array([[token]]), cache=ref_cache)[0, -1]).item())
        expected.append(token)
    assert draft == expected


def test_the_training_forward_predicts_the_first_drafted_token():
    """Shared KV: the fast stream in training (slow keys before t, its own at t) gives, at every
    position, the logits drafting on the model's cache gives for that position's next token."""
    model = model6()
    stream = randomise(FastStream(model.args, M2R2Config.for_model(model.args, 2.0, 4)))
    ids = batch(seed=3, B=1, L=12)[:, :-1]
    fast, _ = fast_logits(model, stream, ids)
    t = model.transformer
    for pos in (0, 5, 11):
        cache = model.make_cache()
        if pos:
            model(ids[:, :pos], cache=cache)
        h = stream(model, t.token_embeddings(ids[:, pos:pos + 1]), cache)
        drafted = model.logits(t.norm(h))[0, -1]
        np.testing.assert_allclose(np.array(drafted), np.array(fast[0, pos]), atol=1e-4)


def test_merged_adapters_compute_what_the_adapters_beside_the_layers_compute():
    model = model6()
    stream = randomise(FastStream(model.args, M2R2Config.for_model(model.args, 2.0, 4)))
    h = model.transformer.token_embeddings(batch(seed=2)[:, :-1])
    apart = stream(model, h, mask="causal")
    merged = stream(model, h, mask="causal", merge=True)
    assert type(stream.replacements(model, merge=True)[0]["qkv_proj"]) is nn.Linear
    np.testing.assert_allclose(np.array(merged), np.array(apart), atol=1e-4)
    stream.steps[0]["proj_2"].b = stream.steps[0]["proj_2"].b * 2  # new arrays: rebuilt
    assert not np.allclose(np.array(stream(model, h, mask="causal", merge=True)), np.array(merged))
    nn.quantize(model, group_size=32, bits=4)  # quantized layers keep the adapter beside them
    assert type(stream.replacements(model, merge=True)[0]["qkv_proj"]).__name__ == "AdaptedLinear"


def test_adapters_on_restores_the_block_even_after_an_error():
    model = model6()
    block = model.layers[0]
    before = {n: id(m) for n, m in block.named_modules()}
    stream = FastStream(model.args, M2R2Config.for_model(model.args, 2.0, 4))
    with pytest.raises(RuntimeError):
        with adapters_on(block, stream.steps[0]):
            assert type(block.attn.qkv_proj).__name__ == "AdaptedLinear"
            raise RuntimeError("boom")
    assert {n: id(m) for n, m in block.named_modules()} == before


def test_only_the_fast_stream_is_trainable_and_training_lowers_the_objective():
    model = model6(seed=4)
    base_weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.random.seed(0)
    m = M2R2Model(model, FastStream(model.args, M2R2Config.for_model(model.args, 3.0, 4)))
    names = [k for k, _ in tree_flatten(m.trainable_parameters())]
    assert names and all(k.startswith("stream.") for k in names)
    assert all(k.startswith("stream.") for k, _ in tree_flatten(m.parameters()))
    # the model is random: its next-token loss on random data would pull away from it, so the
    # test trains alignment and distillation (what agreement with the model needs)
    loss_fn = make_loss_fn(M2R2LossConfig(lm_weight=0.0))
    step = nn.value_and_grad(m, lambda mm, b: loss_fn(mm, b)[0])
    opt = optim.Adam(learning_rate=1e-2)
    probe = batch(seed=100, B=4)
    first = {k: v.item() for k, v in m2r2_terms(m, probe).items()}
    for i in range(40):
        _, grads = step(m, batch(seed=i % 8, B=4))
        opt.update(m, grads)
        mx.eval(m.parameters(), opt.state)
    last = {k: v.item() for k, v in m2r2_terms(m, probe).items()}
    assert last["kd"] < 0.8 * first["kd"] and last["align"] < first["align"]
    assert last["agree"] > first["agree"]
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), base_weights[k])


def test_the_router_ends_drafts():
    model = model6()
    stream = FastStream(model.args, M2R2Config.for_model(model.args, 2.0, 4))
    stream.router.proj.bias = mx.array([-5.0])  # trusts nothing
    prompt = list(range(10, 30))
    cache = model.make_cache()
    model(mx.array([prompt]), cache=cache)
    policy = DraftLength(6, cost=0.01, prior=0.99)
    d = M2R2Drafter(stream, 6, threshold=0.5, policy=policy)
    d.start(model, prompt, cache)
    assert len(d.propose(prompt + [7], 6).tokens) == 1
    d.threshold = 0.0
    assert len(d.propose(prompt + [7], 6).tokens) == 6
    assert all(c.offset == len(prompt) for c in cache)


def test_artifact_round_trip_and_bad_input(tmp_path):
    model = model6()
    stream = randomise(FastStream(model.args, M2R2Config.for_model(model.args, 2.0, 4)))
    out = M2R2(stream, {"training": {"steps": 3}}).save(tmp_path / "a", base=model)
    art = M2R2.load(out, model)
    assert art.stream.config == stream.config and art.info["training"] == {"steps": 3}
    for (k, a), (_, b) in zip(tree_flatten(art.stream.parameters()),
                              tree_flatten(stream.parameters())):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    with pytest.raises(MlxeffError, match="already exists"):
        M2R2(stream).save(out)
    other = make_model(layerwise_config(6, 96, 16, vocab_size=96, ffn_dim_divisor=32))
    with pytest.raises(MlxeffError, match="trained for another model shape") as info:
        M2R2.load(out, other)
    assert "\n" not in str(info.value)
    with pytest.raises(MlxeffError, match="no such M2R2 directory"):
        M2R2.load(tmp_path / "nope", model)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "m2r2.json").write_text("{not json")
    with pytest.raises(MlxeffError, match="invalid JSON"):
        M2R2.load(tmp_path / "bad", model)
    (tmp_path / "bad" / "m2r2.json").write_text(json.dumps({"mlxeff_artifact": "kv_prediction"}))
    with pytest.raises(MlxeffError, match="not an M2R2 artifact"):
        M2R2.load(tmp_path / "bad", model)


# ---- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("m2r2")
    base = root / "base"
    mlxeff.save(make_model(layerwise_config(4, 64, 16, vocab_size=len(tiny_tokenizer),
                                            ffn_dim_divisor=32)), tiny_tokenizer, base)
    (root / "train.txt").write_text(TEXT * 10)
    (root / "valid.txt").write_text(TEXT * 2)
    proc = run_cli("train-m2r2", "--base", base, "--rate", 2, "--rank", 4,
                   "--train", root / "train.txt", "--valid", root / "valid.txt", "--steps", 4,
                   "--seq-len", 16, "--batch-size", 2, "--eval-every", 2, "--eval-tokens", 32,
                   "--warmup", 1, "--lr", 1e-2, "--json")
    assert proc.returncode == 0, proc.stderr
    return root, base, json.loads(proc.stdout)


def test_train_m2r2_saves_a_loadable_artifact_beside_the_model(trained):
    root, base, summary = trained
    out = base / "m2r2" / "r2-rank4"
    assert summary["out"] == str(out) and summary["steps"] == 2 and summary["targets"] == [2, 4]
    assert [h["step"] for h in summary["history"]["valid"]] == [2, 4]
    assert summary["valid_final"]["kd"] != summary["valid_initial"]["kd"]
    art = M2R2.load(out, mlxeff.load(base)[0])
    assert art.stream.config.rank == 4 and art.info["training"]["rate"] == 2.0
    assert not (base / "m2r2" / ".r2-rank4.train" / "checkpoints").exists()
    assert_error(run_cli("train-m2r2", "--base", base, "--rank", 4, "--train", root / "train.txt",
                         "--steps", 1, "--seq-len", 16), "already exists")


def test_generate_with_m2r2_by_name_equals_plain(trained):
    _, base, _ = trained
    prompt = "Once upon a time there was a little girl"
    plain = run_cli("generate", prompt, "--model", base, "-n", 12, "--json")
    for where in ("r2-rank4", base / "m2r2" / "r2-rank4"):
        proc = run_cli("generate", prompt, "--model", base, "--m2r2", where, "-n", 12, "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["text"] == json.loads(plain.stdout)["text"]
        assert out["decode_forwards"] >= 1 and "tokens_per_forward" in out


def test_train_m2r2_bad_input_is_one_line(trained):
    root, base, _ = trained
    assert_error(run_cli("train-m2r2", "--base", base, "--rate", 0.5, "--train", root / "train.txt"),
                 "--rate must be at least 1")
    assert_error(run_cli("train-m2r2", "--base", base, "--train", root / "nothing-*.txt",
                         "--out", root / "x"), "nothing-")
    assert_error(run_cli("generate", "Once", "--model", base, "--m2r2", "missing"),
                 "no such M2R2 directory")
