"""Affine-quantized models on the CPU compute from their dequantized float32 weights."""

import mlx.core as mx
import mlx.nn as nn

from conftest import make_model, tiny_args
from mlxeff.quant.affine import dequantize_affine, quantize_affine


def test_dequantized_model_computes_exactly_what_the_quantized_one_did():
    model = make_model(tiny_args(), seed=1)
    quantize_affine(model, bits=4, group_size=32, embedding_bits=8)
    x = mx.array([[5, 6, 7, 8, 9, 10]])
    before = model(x)
    assert dequantize_affine(model) == 17  # 4 layers x 4 linears, and the tied embedding
    assert model.mlxeff_meta["quantization"] == {}  # the specs follow the modules
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert model.transformer.norm.weight.dtype == mx.float32
    assert mx.array_equal(before, model(x))
    assert dequantize_affine(model) == 0


def test_compute_dtype_auto_dequantizes_on_the_cpu_and_bad_names_fail():
    import pytest

    from mlxeff.errors import MlxeffError
    from mlxeff.precision import apply_compute_dtype

    model = make_model(tiny_args(), seed=1)
    quantize_affine(model, bits=4, group_size=32, embedding_bits=8)
    model.set_dtype(mx.float16)
    x = mx.array([[5, 6, 7, 8, 9, 10]])
    if mx.default_device() != mx.cpu:
        pytest.skip("auto keeps the stored precision on a GPU")
    assert apply_compute_dtype(model, "auto") == "float32"
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert model.layers[0].attn.qkv_proj.weight.dtype == mx.float32 and model(x).dtype == mx.float32
    with pytest.raises(MlxeffError, match="--dtype must be"):
        apply_compute_dtype(model, "float64")


def test_an_explicit_compute_dtype_also_dequantizes_on_the_cpu():
    """``--dtype float32`` on an affine model must not leave the CPU on its 4-bit matmul."""
    import pytest

    from mlxeff.precision import apply_compute_dtype

    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU rule")
    model = make_model(tiny_args(), seed=1)
    x = mx.array([[5, 6, 7, 8, 9, 10]])
    quantize_affine(model, bits=4, group_size=32, embedding_bits=8)
    want = model(x)
    assert apply_compute_dtype(model, "float32") == "float32"
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    assert mx.allclose(model(x), want, atol=1e-4)


def test_training_commands_compute_a_quantized_base_dequantized(tmp_path, tiny_tokenizer, monkeypatch):
    """train-m2r2 and train-kv-prediction keep the base frozen; its affine layers must compute
    dequantized on every device (a 4-bit base made train-m2r2's validation take minutes on the
    CPU, and stall on a GPU)."""
    import pytest

    import mlxeff
    from mlxeff.techniques import artifacts, kv_prediction_train, m2r2_train
    from mlxeff.train.config import TrainConfig

    model = make_model(tiny_args(vocab_size=len(tiny_tokenizer)), seed=1)
    quantize_affine(model, bits=4, group_size=32, embedding_bits=8)
    mlxeff.save(model, tiny_tokenizer, tmp_path / "base")
    (tmp_path / "train.txt").write_text("Once upon a time there was a little cat. " * 40)
    seen = []

    class Reached(Exception):
        pass

    def record(base):
        from mlxeff.quant.affine import dequantize_affine

        assert dequantize_affine(base) > 0
        seen.append(not any(isinstance(m, nn.QuantizedLinear) for _, m in base.named_modules()))
        raise Reached

    common = dict(base_dir=tmp_path / "base", train_files=[str(tmp_path / "train.txt")],
                  valid_files=None)
    monkeypatch.setattr(artifacts, "dequantize_affine", record)  # both load their base there
    for run in (lambda: m2r2_train.run_m2r2_training(
            TrainConfig(seq_len=16), rate=2, rank=2, out=tmp_path / "m2r2", **common),
            lambda: kv_prediction_train.run_kv_training(
                TrainConfig(seq_len=16), aux_spec="layers:2", out=tmp_path / "kvp", eval_tokens=32,
                **common)):
        with pytest.raises(Reached):
            run()
    assert seen == [True, True]
