import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import make_model, tiny_args
from mlxeff.models import ConfigError, ModelArgs, config_from_hf, layerwise_config, openelm_config

# Official per-layer tables of the released OpenELM models (query heads, KV heads = q/4, FFN widths).
OFFICIAL = {
    "270M": (
        [12] * 5 + [16] * 7 + [20] * 4,
        [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120],
    ),
    "450M": (
        [12] * 3 + [16] * 7 + [20] * 6 + [24] * 4,
        [768, 1024, 1280, 1536, 1792, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4352, 4608,
         5120, 5376, 5632, 5888, 6144],
    ),
    "1_1B": (
        [16] * 3 + [20] * 7 + [24] * 8 + [28] * 6 + [32] * 4,
        [1024, 1280, 1536, 1792, 2048, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4608, 4608,
         5120, 5376, 5632, 5888, 6144, 6400, 6656, 6912, 7168, 7424, 7680, 7936, 8192],
    ),
    "3B": (
        [12] * 4 + [16] * 14 + [20] * 12 + [24] * 6,
        [1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 4096, 4352, 4608, 4864, 5120, 5632, 5888,
         6144, 6400, 6656, 7168, 7424, 7680, 7936, 8192, 8704, 8960, 9216, 9472, 9728, 10240, 10496,
         10752, 11008, 11264, 11776, 12032, 12288],
    ),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_openelm_tables(name):
    args = openelm_config(name)
    q, ffn = OFFICIAL[name]
    assert args.num_query_heads == q
    assert args.num_kv_heads == [h // 4 for h in q]
    assert args.ffn_dims == ffn


def test_openelm_270m_parameter_count():
    assert openelm_config("270M").num_parameters() == 271_527_168
    # the formula agrees with the module's real parameters on a small model
    model = make_model()
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == model.args.num_parameters()


def test_bad_configs():
    with pytest.raises(ConfigError):
        openelm_config("7B")
    with pytest.raises(ConfigError, match="do not split"):
        ModelArgs(num_transformer_layers=1, num_query_heads=[6], num_kv_heads=[4], ffn_multipliers=[1.0])
    with pytest.raises(ConfigError, match="entries"):
        ModelArgs(num_transformer_layers=2, num_query_heads=[4], num_kv_heads=[4], ffn_multipliers=[1.0])
    with pytest.raises(ConfigError, match="model_type"):
        config_from_hf({"model_type": "gpt2"})


def test_llama_config_is_constant_lists():
    args = config_from_hf({"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 64,
                           "num_attention_heads": 8, "num_key_value_heads": 2,
                           "intermediate_size": 172, "vocab_size": 50, "rope_theta": 5e5})
    assert args.num_query_heads == [8] * 3 and args.num_kv_heads == [2] * 3
    assert args.ffn_dims == [172] * 3
    assert not args.normalize_qk_projections and not args.share_input_output_layers
    assert args.rope_freq_constant == 5e5


def test_matches_mlx_lm_openelm():
    from mlx_lm.models import openelm

    model = make_model()
    ref = openelm.Model(openelm.ModelArgs.from_dict(model.args.to_dict()))
    ref.load_weights(tree_flatten(model.parameters()), strict=True)
    x = mx.array([[1, 5, 9, 33, 2, 7, 64, 3]])
    np.testing.assert_allclose(np.array(model(x)), np.array(ref(x)), atol=1e-4)


def _graph_ops(tmp_path, *outputs):
    """The operations of the graph that computes ``outputs``, by name (MLX's dot export)."""
    import re
    from collections import Counter

    path = tmp_path / "graph.dot"
    mx.export_to_dot(str(path), *outputs)
    return Counter(re.findall(r'label\s*=\s*"([A-Za-z]+)', path.read_text()))


def test_decode_step_builds_mlx_lm_openelms_graph(tmp_path):
    """A plain decode step (the engine's DecodeStrategy) builds the same operations as mlx-lm's
    OpenELM step on the same weights and computes the same logits: the engine adds no kernel to
    a step (an extra elementwise product or gather per step is what cost decode parity on a GPU,
    where a step is launch-bound)."""
    from mlx_lm.models import openelm
    from mlx_lm.models.cache import make_prompt_cache

    from mlxeff.engine import DecodeStrategy

    model = make_model()
    ref = openelm.Model(openelm.ModelArgs.from_dict(model.args.to_dict()))
    ref.load_weights(tree_flatten(model.parameters()), strict=True)
    prompt, y = mx.array([[1, 5, 9, 33, 2, 7]]), mx.array([64], dtype=mx.uint32)
    ours_cache, ref_cache = model.make_cache(), make_prompt_cache(ref)
    mx.eval(model(prompt, cache=ours_cache), ref(prompt, cache=ref_cache))
    ours = DecodeStrategy()(model, y, ours_cache)[-1:]
    theirs = ref(y[None], cache=ref_cache)[:, -1, :]
    assert _graph_ops(tmp_path, ours) == _graph_ops(tmp_path, theirs)
    np.testing.assert_array_equal(np.array(ours), np.array(theirs))


@pytest.mark.parametrize("qk_norm,tied", [(True, True), (False, False)])
def test_cache_decode_equals_full_forward(qk_norm, tied):
    model = make_model(tiny_args(normalize_qk_projections=qk_norm, share_input_output_layers=tied))
    x = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    full = model(x)
    cache = model.make_cache()
    parts = [model(x[:, :4], cache=cache)]
    for i in range(4, x.shape[1]):
        parts.append(model(x[:, i : i + 1], cache=cache))
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(full), atol=1e-5)


def test_set_attention_hook_is_used_and_restored():
    model = make_model()
    x = mx.array([[1, 2, 3, 4]])
    base = model(x)
    calls = []

    def spy(q, k, v, *, scale, mask, cache=None):
        calls.append(q.shape)
        return mx.zeros_like(q)

    model.set_attention(spy)
    assert not np.allclose(np.array(model(x)), np.array(base))
    assert len(calls) == model.args.num_transformer_layers
    model.set_attention(None)
    np.testing.assert_array_equal(np.array(model(x)), np.array(base))
