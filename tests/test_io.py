import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxeff
from conftest import make_model
from mlxeff.errors import MlxeffError


def test_save_load_exact(saved_dir):
    path, model = saved_dir
    loaded, tok = mlxeff.load(path)
    a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(loaded.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]), k
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["mlxeff"]["format_version"] == 1 and cfg["model_type"] == "openelm"
    assert tok is not None and tok.encode("Once upon") == tok.encode("Once upon")


def test_loads_in_mlx_lm_with_equal_logits(saved_dir):
    from mlx_lm import load as lm_load

    path, model = saved_dir
    ref, _ = lm_load(str(path))
    x = mx.array([[1, 4, 9, 16, 25, 36]])
    np.testing.assert_allclose(np.array(ref(x)), np.array(model(x)), atol=1e-5)


@pytest.mark.parametrize("embedding_bits", [8, None])
def test_affine_quantized_loads_in_mlx_lm_with_equal_logits(tmp_path, embedding_bits):
    from mlx_lm.utils import load_model

    from mlxeff.quant.affine import quantize_affine

    model = make_model()
    quantize_affine(model, bits=4, group_size=32, embedding_bits=embedding_bits)
    mlxeff.save(model, None, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    ref, _ = load_model(tmp_path / "q")  # mlx-lm's loader without a tokenizer
    kinds = {type(m).__name__ for _, m in ref.named_modules()}
    assert "QuantizedLinear" in kinds and ("QuantizedEmbedding" in kinds) == (embedding_bits is not None)
    ours, _ = mlxeff.load(tmp_path / "q")
    x = mx.array([[1, 4, 9, 16, 25, 36]])
    np.testing.assert_allclose(np.array(ref(x)), np.array(ours(x)), atol=1e-5)
    np.testing.assert_allclose(np.array(ours(x)), np.array(model(x)), atol=1e-6)


def test_seedlm_directory_has_no_mlx_lm_quantization(tmp_path):
    import mlxeff.io as io

    assert io._mlx_lm_quantization({"a": {"method": "seedlm", "C": 8, "P": 3}}) is None
    assert io._mlx_lm_quantization({}) is None
    mixed = io._mlx_lm_quantization({"a": {"method": "affine", "bits": 4, "group_size": 64},
                                     "b": {"method": "affine", "bits": 4, "group_size": 64},
                                     "c": {"method": "affine", "bits": 8, "group_size": 64}})
    assert mixed == {"bits": 4, "group_size": 64, "a": {"bits": 4, "group_size": 64},
                     "b": {"bits": 4, "group_size": 64}, "c": {"bits": 8, "group_size": 64}}


def test_sharded_save(tmp_path, monkeypatch, tiny_tokenizer):
    import mlxeff.io as io

    monkeypatch.setattr(io, "MAX_SHARD_BYTES", 20_000)
    model = make_model()
    mlxeff.save(model, None, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    loaded, tok = mlxeff.load(tmp_path / "m")
    assert tok is None
    x = mx.array([[1, 2, 3]])
    assert mx.array_equal(loaded(x), model(x))


def test_existing_output_refused_and_untouched(saved_dir):
    path, model = saved_dir
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(MlxeffError, match="already exists"):
        mlxeff.save(model, None, path)
    assert sorted(p.name for p in path.iterdir()) == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import mlxeff.io as io

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "write_weights", boom)
    with pytest.raises(RuntimeError):
        mlxeff.save(make_model(), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_affine_spec_roundtrip(tmp_path):
    import mlx.nn as nn

    model = make_model()
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    spec = {p: {"method": "affine", "bits": 4, "group_size": 32}
            for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    model.mlxeff_meta = {"quantization": spec}
    mlxeff.save(model, None, tmp_path / "q")
    loaded, _ = mlxeff.load(tmp_path / "q")
    x = mx.array([[5, 6, 7]])
    assert mx.array_equal(loaded(x), model(x))
