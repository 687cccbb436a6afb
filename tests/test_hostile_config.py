"""config.json from a stranger: every named failure of the mutation campaign is one MlxeffError
naming the file and the field, fast, and nothing loads that computes NaN."""

import json
import math
import os
import shutil
import time

import pytest

import mlxeff
from hostile import logits_finite, mlxeff_dir
from mlxeff.errors import MlxeffError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return mlxeff_dir(tmp_path_factory.mktemp("cfg") / "tiny")


@pytest.fixture
def model_dir(base, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(base, d)
    return d


def edit(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def refused(d, match):
    with pytest.raises(MlxeffError, match=match) as e:
        mlxeff.load(d)
    assert str(d / "config.json") in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def put(key, value):
    def fn(cfg):
        cfg[key] = value
    return fn


def put_layer(key, i, value):
    def fn(cfg):
        cfg[key][i] = value
    return fn


@pytest.mark.parametrize("fn,match", [
    (put_layer("num_query_heads", 1, "4"), r"num_query_heads\[1\] must be an integer"),
    (put_layer("num_query_heads", 2, 4.0), r"num_query_heads\[2\] must be an integer"),
    (put_layer("num_kv_heads", 0, None), r"num_kv_heads\[0\] must be an integer"),
    (put_layer("num_kv_heads", 0, True), r"num_kv_heads\[0\] must be an integer"),
    (put_layer("ffn_multipliers", 3, "2.0"), r"ffn_multipliers\[3\] must be a number"),
    (put_layer("ffn_multipliers", 3, [1.0]), r"ffn_multipliers\[3\] must be a number"),
    (put_layer("ffn_multipliers", 0, 0.0), r"ffn_multipliers\[0\] must be a finite number"),
    (put("ffn_dim_divisor", 0), r"ffn_dim_divisor must be in \[1, 65536\]"),
    (put("model_dim", 2 ** 31), r"model_dim must be in"),
    (put("vocab_size", 2 ** 40), r"vocab_size must be in"),
    (put("head_dim", 2 ** 31 + 2), r"head_dim must be in"),
    (put("num_transformer_layers", -1), r"num_transformer_layers must be in"),
    (put("max_context_length", 0), r"max_context_length must be in"),
    (put("rms_norm_eps", 0.0), r"rms_norm_eps must be a finite number in \(0, 1\]"),
    (put("rms_norm_eps", -1e-6), r"rms_norm_eps"),
    (put("rope_freq_constant", 0.0), r"rope_freq_constant must be a finite number in \[1, 1e\+10\]"),
    (put("rope_freq_constant", -10000.0), r"rope_freq_constant"),
    (put("rope_freq_constant", 1e300), r"rope_freq_constant"),
    (put("normalize_qk_projections", "yes"), r"normalize_qk_projections must be true or false"),
    (put("share_input_output_layers", 1), r"share_input_output_layers must be true or false"),
    (put("eos_token_id", -2), r"eos_token_id must be in"),
    (put("model_type", ["openelm"]), r"unknown model_type"),
    (put("num_query_heads", {"0": 4}), r"num_query_heads must be a list"),
    (put("mlxeff", [1]), r"mlxeff must be an object"),
    (put("mlxeff", "v1"), r"mlxeff must be an object"),
    (lambda c: c["mlxeff"].update(quantization=[]), r"mlxeff.quantization must be an object"),
    (lambda c: c["mlxeff"].update(quantization={"x": 4}), r"mlxeff.quantization\['x'\] must be an object"),
    (lambda c: c["mlxeff"].update(quantization={"transformer.layers.0.attn.qkv_proj": {
        "method": "affine", "bits": 4, "group_size": 10 ** 30}}), r"group_size must be one of"),
    (lambda c: c["mlxeff"].update(artifacts=7), r"mlxeff.artifacts must be an object"),
    (lambda c: c["mlxeff"].update(format_version=2), r"mlxeff.format_version 2 is not supported"),
    (lambda c: c["mlxeff"].update(format_version="1"), r"format_version '1' is not supported"),
    (lambda c: c["mlxeff"].pop("format_version"), r"format_version None is not supported"),
])
def test_typed_and_ranged_fields(model_dir, fn, match):
    edit(model_dir, fn)
    refused(model_dir, match)


@pytest.mark.parametrize("text,match", [
    ('"rms_norm_eps": NaN', r"NaN is not valid JSON"),
    ('"rope_freq_constant": Infinity', r"Infinity is not valid JSON"),
    ('"rope_freq_constant": -Infinity', r"-Infinity is not valid JSON"),
    ('"rope_freq_constant": 1e400', r"out of range"),
    ('"vocab_size": ' + "9" * 4301, r"invalid JSON"),
    ('"vocab_size": ' + "9" * 4000, r"vocab_size must be in .* got an integer of"),
])
def test_non_json_numbers_and_huge_integers(model_dir, text, match):
    cfg = (model_dir / "config.json").read_text()
    key = text.split(":")[0]
    start = cfg.index(key)
    end = cfg.index(",", start) if cfg.find(",", start) != -1 else cfg.index("}", start)
    (model_dir / "config.json").write_text(cfg[:start] + text + cfg[end:])
    refused(model_dir, match)


def test_deep_nesting(model_dir):
    cfg = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(cfg[:-1] + ', "x": ' + "[" * 1000 + "]" * 1000 + "}")
    refused(model_dir, r"nested too deeply|nested deeper")
    (model_dir / "config.json").write_text(cfg[:-1] + ', "x": ' + "[" * 100 + "]" * 100 + "}")
    refused(model_dir, r"nested deeper than 64")


def test_duplicate_keys_and_bom(model_dir):
    cfg = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text('{"vocab_size": 5, ' + cfg[1:])
    refused(model_dir, r"duplicate key 'vocab_size'")
    (model_dir / "config.json").write_bytes(b"\xef\xbb\xbf" + cfg.encode())
    refused(model_dir, r"byte-order mark")


@pytest.mark.parametrize("layers", [10 ** 4, 10 ** 6])
def test_many_layers_with_consistent_lists_fail_at_once(model_dir, layers):
    def fn(cfg):
        cfg["num_transformer_layers"] = layers
        for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            cfg[k] = [cfg[k][0]] * layers
    edit(model_dir, fn)
    t = time.perf_counter()
    refused(model_dir, r"num_query_heads has \d+ entries, more than the limit of 1024 layers")
    assert time.perf_counter() - t < 5


def test_more_model_than_the_weights_hold_fails_before_building(model_dir):
    # 1024 layers is within the limits; the weight files cannot hold them: refused before any module
    def fn(cfg):
        cfg["num_transformer_layers"] = 1024
        for k in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            cfg[k] = [cfg[k][0]] * 1024
    edit(model_dir, fn)
    t = time.perf_counter()
    refused(model_dir, r"describes 1024 layers but the weight files hold \d+ tensors")
    assert time.perf_counter() - t < 5
    edit(model_dir, lambda c: c.update(num_transformer_layers=4, num_query_heads=[4] * 4,
                                       num_kv_heads=[1] * 4, ffn_multipliers=[1.0] * 4, model_dim=4096,
                                       head_dim=16))
    refused(model_dir, r"describes [\d,]+ parameters \(at least [\d,]+ bytes\) but the weight files hold")


def test_config_is_a_special_file(model_dir):
    (model_dir / "config.json").unlink()
    os.symlink("/dev/zero", model_dir / "config.json")
    refused(model_dir, r"expected a regular file, found a character device")
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")
    refused(model_dir, r"expected a regular file, found a FIFO")


@pytest.mark.parametrize("key,value", [("rope_freq_constant", 1.0), ("rope_freq_constant", 1e10),
                                       ("rms_norm_eps", 1.0), ("rms_norm_eps", 1e-30)])
def test_extreme_accepted_values_give_finite_logits(model_dir, key, value):
    edit(model_dir, put(key, value))
    model, _ = mlxeff.load(model_dir)
    assert logits_finite(model)


def test_llama_config_fields_typed():
    from mlxeff.models import ConfigError, config_from_hf

    good = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 32}
    assert config_from_hf(good).num_transformer_layers == 2
    for change, match in [({"num_attention_heads": 0}, "num_attention_heads must be in"),
                          ({"hidden_size": 65}, "not a multiple of num_attention_heads"),
                          ({"intermediate_size": 1.5}, "intermediate_size must be an integer"),
                          ({"rope_theta": float("nan")}, "rope_theta must be a finite number"),
                          ({"eos_token_id": [2, "x"]}, r"eos_token_id\[1\] must be an integer"),
                          ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false")]:
        with pytest.raises(ConfigError, match=match):
            config_from_hf({**good, **change})
    assert not math.isnan(config_from_hf({**good, "rope_theta": 5e5}).rope_freq_constant)
