"""KV Prediction: exactness (aux = base, identity predictor), layer maps, predictor, bad input."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_model, tiny_args
from mlxeff.errors import MlxeffError
from mlxeff.generate import ChunkedPrefill, generate_step
from mlxeff.models import layerwise_config
from mlxeff.techniques import kv_prediction as kvp

PROMPT = [1, 7, 3, 55, 21, 9, 14, 2, 88, 41, 17, 60, 5, 33, 70, 12, 8, 91, 4, 26]


def _greedy(model, prompt, prefill, n=24):
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, prefill=prefill)]


def identity_kvp(base):
    """Auxiliary = all of the base's layers, identity predictor: must reproduce the base."""
    n = base.args.num_transformer_layers
    aux = kvp.layer_pruned_model(base, list(range(n)))
    pred = kvp.KVPredictor.for_models(aux, base, list(range(n)), init="identity")
    return kvp.KVPrediction(aux, pred, {"kind": "layer_pruned", "layers": list(range(n))})


@pytest.mark.parametrize("step", [4, 512])
def test_identity_generates_exactly_what_the_base_generates(step):
    base = make_model()
    art = identity_kvp(base)
    want = _greedy(base, PROMPT, ChunkedPrefill(step))
    got = _greedy(base, PROMPT, art.prefill(step_size=step))
    assert got == want


def test_identity_cache_and_logits_match_the_base():
    base = make_model(seed=3)
    art = identity_kvp(base)
    prompt = mx.array(PROMPT)
    c_ref, c_kvp = base.make_cache(), base.make_cache()
    ref = ChunkedPrefill(512)(base, prompt, c_ref)
    got = art.prefill()(base, prompt, c_kvp)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-5)
    for a, b in zip(c_ref, c_kvp):
        assert a.offset == b.offset == len(PROMPT)
        for x, y in zip(a.state, b.state):
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=1e-5)


def test_identity_without_qk_norm_matches_the_base():
    base = make_model(tiny_args(normalize_qk_projections=False), seed=5)
    art = identity_kvp(base)
    assert _greedy(base, PROMPT, art.prefill()) == _greedy(base, PROMPT, ChunkedPrefill())


def test_identity_prefill_through_stream_generate(tiny_tokenizer):
    import mlxeff

    base = make_model(tiny_args(vocab_size=len(tiny_tokenizer)))
    art = identity_kvp(base)
    prompt = "Once upon a time there was a little girl who lived in a village"
    want = mlxeff.generate(base, tiny_tokenizer, prompt, max_tokens=16)
    got = mlxeff.generate(base, tiny_tokenizer, prompt, max_tokens=16, prefill=art.prefill())
    assert got == want


# --- layer choice and maps (CoreNet's configs for OpenELM-1.1B and 3B) ---------------------------


def test_layer_choice_matches_corenet():
    assert kvp.select_layers(28, 0.25) == [0, 4, 8, 12, 16, 20, 24]
    assert kvp.select_layers(28, 0.5) == list(range(0, 28, 2))
    assert kvp.select_layers(28, 0.75) == [i for i in range(28) if i % 4 != 3]
    assert kvp.select_layers(36, 0.25) == list(range(0, 36, 4))
    assert kvp.select_layers(36, 0.75) == [i for i in range(36) if i % 4 != 3]
    assert kvp.select_layers(8, 0.5) == [0, 2, 4, 6]
    assert kvp.select_layers(8, 1.0) == list(range(8))
    with pytest.raises(MlxeffError):
        kvp.select_layers(8, 0.0)
    with pytest.raises(MlxeffError):
        kvp.select_layers(8, 1.5)


def test_layer_maps_match_corenet():
    assert kvp.pruned_layer_map(kvp.select_layers(28, 0.75), 28) == [
        0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12, 13, 14, 14, 15, 16, 17, 17, 18, 19, 20, 20]
    assert kvp.pruned_layer_map(kvp.select_layers(28, 0.25), 28) == [i // 4 for i in range(28)]
    assert kvp.pruned_layer_map(kvp.select_layers(28, 0.5), 28) == [i // 2 for i in range(28)]
    # separate auxiliary models: the earliest auxiliary layers feed the longer runs
    assert kvp.contiguous_layer_map(20, 28) == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert kvp.contiguous_layer_map(16, 28) == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 13, 14, 15]
    assert kvp.contiguous_layer_map(16, 36) == [
        0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
        12, 13, 13, 14, 14, 15, 15]
    assert kvp.contiguous_layer_map(28, 36) == [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7] + list(range(8, 28))
    with pytest.raises(MlxeffError):
        kvp.contiguous_layer_map(9, 8)


def test_layer_pruned_model_copies_the_chosen_layers():
    base = make_model()
    aux = kvp.layer_pruned_model(base, [0, 2])
    assert aux.args.num_transformer_layers == 2
    assert aux.args.num_query_heads == [base.args.num_query_heads[i] for i in (0, 2)]
    np.testing.assert_array_equal(np.array(aux.layers[1].attn.qkv_proj.weight),
                                  np.array(base.layers[2].attn.qkv_proj.weight))
    np.testing.assert_array_equal(np.array(aux.transformer.token_embeddings.weight),
                                  np.array(base.transformer.token_embeddings.weight))
    # a copy, not a view: training the auxiliary leaves the base alone
    aux.layers[0].attn.qkv_proj.weight = aux.layers[0].attn.qkv_proj.weight + 1
    assert not np.array_equal(np.array(aux.layers[0].attn.qkv_proj.weight),
                              np.array(base.layers[0].attn.qkv_proj.weight))
    with pytest.raises(MlxeffError):
        kvp.layer_pruned_model(base, [1, 2])  # must start at layer 0 (CoreNet's map needs it)
    with pytest.raises(MlxeffError):
        kvp.layer_pruned_model(base, [0, 2, 2])


def test_layer_pruned_model_of_a_quantized_base_is_quantized_alike():
    from mlxeff.quant.affine import quantize_affine

    base = make_model()
    quantize_affine(base, bits=4, group_size=32, embedding_bits=8)
    aux = kvp.layer_pruned_model(base, [0, 2])
    specs = aux.mlxeff_meta["quantization"]
    assert "transformer.layers.1.attn.qkv_proj" in specs and "transformer.token_embeddings" in specs
    assert not any(k.startswith("transformer.layers.2.") for k in specs)
    for name in ("weight", "scales", "biases"):
        np.testing.assert_array_equal(np.array(getattr(aux.layers[1].attn.qkv_proj, name)),
                                      np.array(getattr(base.layers[2].attn.qkv_proj, name)))
    # the one-layer auxiliary computes what the base's first layer computes
    one = kvp.layer_pruned_model(base, [0])
    ids = mx.array([[3, 1, 4, 1, 5]])
    h_base = base.layers[0](base.transformer.token_embeddings(ids), mask="causal")
    h_one = one.layers[0](one.transformer.token_embeddings(ids), mask="causal")
    np.testing.assert_array_equal(np.array(h_base), np.array(h_one))


def test_predictor_shapes_merged_heads():
    base = make_model()
    aux = kvp.layer_pruned_model(base, [0, 2])
    lmap = kvp.pruned_layer_map([0, 2], base.args.num_transformer_layers)
    pred = kvp.KVPredictor.for_models(aux, base, lmap, init="random")
    hd = base.args.head_dim
    for i, (k, v) in enumerate(zip(pred.k_proj, pred.v_proj)):
        a = aux.args.num_kv_heads[lmap[i]] * hd
        b = base.args.num_kv_heads[i] * hd
        assert k.weight.shape == (b, a) and k.bias.shape == (b,)
        assert v.weight.shape == (b, a) and v.bias.shape == (b,)
    keys = [mx.random.normal((1, aux.args.num_kv_heads[j], 5, hd)) for j in range(2)]
    pk, pv = pred(keys, keys)
    assert [tuple(k.shape) for k in pk] == [(1, h, 5, hd) for h in base.args.num_kv_heads]


# --- bad input ---------------------------------------------------------------------------------


def test_predictor_for_another_base_is_refused():
    base = make_model()
    other = make_model(layerwise_config(4, 128, 32, vocab_size=96, ffn_dim_divisor=32))
    art = identity_kvp(base)
    with pytest.raises(MlxeffError, match="predictor"):
        art.check(other)
    with pytest.raises(MlxeffError):
        _greedy(other, PROMPT, art.prefill())
    deeper = make_model(layerwise_config(6, 64, 16, vocab_size=96, ffn_dim_divisor=32))
    with pytest.raises(MlxeffError, match="layers"):
        art.check(deeper)


def test_one_token_prompt_falls_back_to_plain_prefill():
    base = make_model()
    art = identity_kvp(base)
    assert _greedy(base, [7], art.prefill()) == _greedy(base, [7], ChunkedPrefill())
    with pytest.raises(MlxeffError, match="one-token"):
        _greedy(base, [7], art.prefill(short_prompt="error"))


# --- the artifact directory ----------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path):
    base = make_model()
    aux = kvp.layer_pruned_model(base, [0, 2])
    lmap = kvp.pruned_layer_map([0, 2], 4)
    art = kvp.KVPrediction(aux, kvp.KVPredictor.for_models(aux, base, lmap, init="random"),
                           {"auxiliary": {"kind": "layer_pruned", "layers": [0, 2]}})
    art.save(tmp_path / "kvp", base=base)
    again = kvp.KVPrediction.load(tmp_path / "kvp", base=base)
    assert again.predictor.layer_map == lmap and again.info["auxiliary"]["layers"] == [0, 2]
    assert _greedy(base, PROMPT, again.prefill()) == _greedy(base, PROMPT, art.prefill())
    # the stored base signature suffices without the base
    assert kvp.KVPrediction.load(tmp_path / "kvp").predictor.layer_map == lmap
    with pytest.raises(MlxeffError, match="exists"):
        art.save(tmp_path / "kvp", base=base)
    # a bare name resolves against MODEL/kv_prediction/
    assert kvp.resolve_dir("kvp", tmp_path.parent / "nowhere") == kvp.resolve_dir("kvp")


def test_load_refuses_damaged_or_foreign_directories(tmp_path):
    base = make_model()
    art = identity_kvp(base)
    d = art.save(tmp_path / "kvp", base=base)
    with pytest.raises(MlxeffError, match="no such"):
        kvp.KVPrediction.load(tmp_path / "missing")
    other = make_model(layerwise_config(6, 64, 16, vocab_size=96, ffn_dim_divisor=32))
    with pytest.raises(MlxeffError, match="layers"):
        kvp.KVPrediction.load(d, base=other)
    # predictor weights of the wrong shape name the tensor
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    w = mx.load(str(bad / kvp.PREDICTOR_FILE))
    w["k_proj.1.weight"] = mx.zeros((3, 3))
    mx.save_safetensors(str(bad / kvp.PREDICTOR_FILE), w)
    with pytest.raises(MlxeffError, match="k_proj.1.weight"):
        kvp.KVPrediction.load(bad, base=base)
    (bad / kvp.PREDICTOR_FILE).write_bytes(b"garbage")
    with pytest.raises(MlxeffError, match="corrupt"):
        kvp.KVPrediction.load(bad, base=base)
    (bad / kvp.META_FILE).write_text("{not json")
    with pytest.raises(MlxeffError, match="invalid JSON"):
        kvp.KVPrediction.load(bad, base=base)
    (bad / kvp.META_FILE).write_text('{"mlxeff_artifact": "other"}')
    with pytest.raises(MlxeffError, match="not a KV prediction"):
        kvp.KVPrediction.load(bad, base=base)


def test_auxiliary_from_spec():
    base = make_model()
    aux, lmap, info = kvp.auxiliary_from_spec(base, "lp-0.5")
    assert info["layers"] == [0, 2] and lmap == [0, 0, 1, 1] and aux.args.num_transformer_layers == 2
    aux, lmap, info = kvp.auxiliary_from_spec(base, "layers:0,3")
    assert lmap == [0, 0, 0, 1]
    for bad in ("lp-x", "lp-0", "layers:1,2", "layers:a"):
        with pytest.raises(MlxeffError):
            kvp.auxiliary_from_spec(base, bad)
