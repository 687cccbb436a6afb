"""Conversion is exact: CoreNet, HF OpenELM and HF Llama checkpoints give the logits of the model
built directly from the same weights; outputs load in mlxeff and mlx-lm; quantized outputs rebuild."""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxeff
from conftest import SHARED_DATA, make_model, tiny_args, write_corenet, write_hf_openelm
from mlxeff.convert import convert
from mlxeff.convert.corenet import NAMED, gpt_args, infer_name
from mlxeff.convert.tensors import TensorRef
from mlxeff.errors import MlxeffError
from mlxeff.models import Model, layerwise_config, llama_config, openelm_config

TOKENS = mx.array([[1, 5, 9, 17, 33, 2, 64, 80, 7]])

TINY_YAML = """
model:
  language_modeling:
    name: "general_gpt"
    general_gpt:
      num_transformer_layers: 4
      model_dim: 64
      head_dim: 16
      num_gqa_groups: 4
      qkv_multipliers: [0.5, 1.0]
      ffn_multipliers: [0.5, 4.0]
      ffn_dim_divisor: 32
      normalize_qk_projections: true
      share_input_output_layers: {shared}
      vocab_size: 128
      max_context_length: 2048
"""


def logits(model, tokens=TOKENS):
    return np.array(model(tokens % model.args.vocab_size).astype(mx.float32))


def assert_same_logits(a, b, atol=1e-5):
    np.testing.assert_allclose(logits(a), logits(b), atol=atol, rtol=0)


def yaml_file(tmp_path, shared=True):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_YAML.format(shared=str(shared).lower()))
    return p


# --- architecture from CoreNet configs ----------------------------------------------------

@pytest.mark.parametrize("size", ["270M", "450M", "1_1B", "3B"])
def test_corenet_rule_reproduces_official_configs(size):
    assert gpt_args(NAMED[f"OpenELM-{size}"], 32000) == openelm_config(size)


def test_infer_official_size_from_shapes():
    def ref(shape):
        return TensorRef("x", "float16", shape, None, None)

    refs = {"token_embeddings.weight": ref((32128, 1280)), "layers.0.attn.q_norm.weight": ref((64,))}
    refs.update({f"layers.{i}.attn_norm.weight": ref((1280,)) for i in range(16)})
    assert infer_name(refs, "x.pt") == "OpenELM-270M"
    refs.pop("layers.15.attn_norm.weight")
    with pytest.raises(MlxeffError, match="pass --config"):
        infer_name(refs, "x.pt")


# --- CoreNet ------------------------------------------------------------------------------

@pytest.mark.parametrize("exotic", [False, True], ids=["contiguous", "strided-offset-shared"])
def test_corenet_flat_checkpoint_exact(tmp_path, exotic):
    model = make_model(tiny_args())
    pt = write_corenet(model, tmp_path / "checkpoint_ema_best.pt", rows=128, exotic=exotic)
    s = convert(pt, tmp_path / "out", config=yaml_file(tmp_path), vocab_size=96, tokenizer=False,
                dtype="float32", progress=False)
    assert s["source_kind"] == "corenet" and s["vocab_size"] == 96
    assert s["notes"] == ["vocabulary: kept 96 of 128 embedding rows"]
    loaded, tok = mlxeff.load(tmp_path / "out")
    assert tok is None
    assert_same_logits(loaded, model, atol=0)


def test_corenet_training_checkpoint_bf16_untied(tmp_path):
    args = tiny_args(share_input_output_layers=False)
    model = make_model(args)
    pt = write_corenet(model, tmp_path / "checkpoint_last.pt", training=True, dtype="bfloat16", rows=128)
    # the reference holds the bf16-rounded weights in fp32: bf16 -> fp32 is exact
    ref = make_model(args)
    ref.update(nn.utils.tree_map(lambda p: p.astype(mx.bfloat16).astype(mx.float32), model.parameters()))
    convert(pt, tmp_path / "out", config=yaml_file(tmp_path, shared=False), vocab_size=96, tokenizer=False,
            dtype="float32", progress=False)
    loaded, _ = mlxeff.load(tmp_path / "out")
    assert "lm_head" in dict(loaded.named_modules())
    assert_same_logits(loaded, ref, atol=0)


def test_corenet_model_name_from_yaml(tmp_path):
    # CoreNet's "gpt-test" table entry; the reference args come from the foundation's rule.
    args = layerwise_config(1, 128, 64, qkv_multipliers=(0.25, 0.5), ffn_multipliers=(0.25, 0.75),
                            num_gqa_groups=1, vocab_size=64)
    model = make_model(args)
    pt = write_corenet(model, tmp_path / "c.pt")
    y = tmp_path / "gpt.yaml"
    y.write_text("model:\n  language_modeling:\n    name: general_gpt\n    general_gpt:\n"
                 "      model_name: gpt-test\n      vocab_size: 64\n      max_context_length: 2048\n")
    convert(pt, tmp_path / "out", config=y, tokenizer=False, dtype="float32", progress=False)
    loaded, _ = mlxeff.load(tmp_path / "out")
    assert loaded.args == args
    assert_same_logits(loaded, model, atol=0)


def test_corenet_config_as_model_args_and_fp16_output(tmp_path):
    model = make_model(tiny_args())
    pt = write_corenet(model, tmp_path / "c.pt", rows=128)
    s = convert(pt, tmp_path / "out", config=tiny_args(), tokenizer=False, progress=False)
    assert s["dtype"] == "float16" and abs(s["bits_per_weight"] - 16) < 1e-9
    loaded, _ = mlxeff.load(tmp_path / "out")
    assert all(v.dtype == mx.float16 for _, v in tree_flatten(loaded.parameters()))
    np.testing.assert_allclose(logits(loaded), logits(model), atol=0.05)


def test_reading_shows_a_byte_bar_on_request_only(tmp_path, capsys, monkeypatch):
    import mlxeff.progress

    monkeypatch.setattr(mlxeff.progress, "_enabled", True)  # as on a terminal
    pt = write_corenet(make_model(tiny_args()), tmp_path / "c.pt", rows=128)
    convert(pt, tmp_path / "shown", config=tiny_args(), tokenizer=False)
    err = capsys.readouterr().err
    assert "reading: 100%" in err and "B/s" in err, err
    convert(pt, tmp_path / "quiet", config=tiny_args(), tokenizer=False, progress=False)
    assert "reading" not in capsys.readouterr().err


# --- Hugging Face OpenELM -----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "untied"])
def test_hf_openelm_exact(tmp_path, layout):
    model = make_model(tiny_args(share_input_output_layers=(layout != "untied")))
    d = write_hf_openelm(model, tmp_path / "hf", fmt="bin" if layout == "bin" else "safetensors",
                         shard=layout == "sharded")
    s = convert(d, tmp_path / "out", tokenizer=False, dtype="float32", progress=False)
    assert s["source_kind"] == "hf" and "openelm" in s["description"]
    loaded, _ = mlxeff.load(tmp_path / "out")
    assert loaded.args == model.args
    assert_same_logits(loaded, model, atol=0)


# --- Hugging Face Llama -------------------------------------------------------------------

LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=96,
             num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, vocab_size=100,
             rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=False, max_position_embeddings=256,
             hidden_act="silu", bos_token_id=1, eos_token_id=2)


def llama_weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, f, v = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"], cfg["vocab_size"]

    def w(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-1]))

    def norm():
        return mx.array(1 + 0.1 * rng.standard_normal(d).astype(np.float32))

    out = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm()}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = w(v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
                    p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
                    p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                    p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": norm(),
                    p + "post_attention_layernorm.weight": norm(),
                    p + "self_attn.rotary_emb.inv_freq": mx.zeros((hd // 2,))})
    return out


def write_llama(directory, cfg, weights):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    return directory


def direct_mlxeff_llama(cfg, weights):
    """The mlxeff model built by hand from the HF weights (the mapping written out independently)."""
    model = Model(llama_config(cfg))
    W = weights
    params = {"transformer.token_embeddings.weight": W["model.embed_tokens.weight"],
              "transformer.norm.weight": W["model.norm.weight"]}
    if "lm_head.weight" in W and not cfg["tie_word_embeddings"]:
        params["lm_head.weight"] = W["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", f"transformer.layers.{i}."
        params[t + "attn.qkv_proj.weight"] = mx.concatenate(
            [W[p + "self_attn.q_proj.weight"], W[p + "self_attn.k_proj.weight"], W[p + "self_attn.v_proj.weight"]])
        params[t + "attn.out_proj.weight"] = W[p + "self_attn.o_proj.weight"]
        params[t + "ffn.proj_1.weight"] = mx.concatenate([W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"]])
        params[t + "ffn.proj_2.weight"] = W[p + "mlp.down_proj.weight"]
        params[t + "attn_norm.weight"] = W[p + "input_layernorm.weight"]
        params[t + "ffn_norm.weight"] = W[p + "post_attention_layernorm.weight"]
    model.load_weights(list(params.items()), strict=True)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama_exact_and_matches_mlx_lm(tmp_path, tied):
    from mlx_lm.models import llama

    cfg = {**LLAMA, "tie_word_embeddings": tied}
    weights = llama_weights(cfg)
    d = write_llama(tmp_path / "llama", cfg, weights)
    s = convert(d, tmp_path / "out", tokenizer=False, dtype="float32", progress=False)
    assert "llama" in s["description"]
    loaded, _ = mlxeff.load(tmp_path / "out")
    assert_same_logits(loaded, direct_mlxeff_llama(cfg, weights), atol=1e-5)
    # and an independent implementation of Llama agrees
    ref = llama.Model(llama.ModelArgs.from_dict(cfg))
    ref.load_weights(list(ref.sanitize(dict(weights)).items()), strict=True)
    np.testing.assert_allclose(logits(loaded), np.array(ref(TOKENS)), atol=1e-4, rtol=0)


STORIES = SHARED_DATA / "models" / "stories260K"


@pytest.mark.skipif(not (STORIES / "model.safetensors").exists(), reason="shared/data/models/stories260K is absent")
def test_stories260k_greedy_matches_reference(tmp_path):
    convert(STORIES, tmp_path / "out", tokenizer=False, dtype="float32", progress=False)
    model, _ = mlxeff.load(tmp_path / "out")
    ref = json.loads((STORIES / "reference_greedy.json").read_text())
    cache, y, ids = model.make_cache(), mx.array([ref["prompt_ids"]]), []
    for _ in range(len(ref["greedy_ids"])):
        nxt = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)
        ids.append(nxt.item())
        y = nxt[None]
    assert ids == ref["greedy_ids"]


# --- outputs: mlx-lm, generation, tokenizers ----------------------------------------------

def tokenizer_dir(tmp_path, tok):
    d = tmp_path / "tok"
    tok.save_pretrained(str(d))
    return d


def test_output_loads_in_mlx_lm_and_generates(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    from mlx_lm import load as lm_load

    model = make_model(tiny_args(vocab_size=len(tiny_tokenizer)))
    pt = write_corenet(model, tmp_path / "c.pt")
    s = convert(pt, tmp_path / "out", config=model.args, tokenizer=tokenizer_dir(tmp_path, tiny_tokenizer),
                dtype="float32", progress=False)
    assert s["tokenizer"] and s["tokenizer_size"] == len(tiny_tokenizer)
    ref, _ = lm_load(str(tmp_path / "out"))
    np.testing.assert_allclose(np.array(ref(TOKENS[:, :5])), logits(model, TOKENS[:, :5]), atol=1e-5)

    from mlxeff.cli.main import main

    monkeypatch.setenv("MLXEFF_NO_OPENBLAS", "1")
    monkeypatch.setattr(sys, "argv", ["mlxeff", "generate", "Once upon a time", "--model",
                                      str(tmp_path / "out"), "-n", "6", "--json"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["generation_tokens"] >= 1 and isinstance(out["text"], str)


def test_hf_source_tokenizer_is_copied(tmp_path, tiny_tokenizer):
    model = make_model(tiny_args(vocab_size=len(tiny_tokenizer)))
    d = write_hf_openelm(model, tmp_path / "hf")
    tiny_tokenizer.save_pretrained(str(d))
    convert(d, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    _, tok = mlxeff.load(tmp_path / "out")
    assert tok.encode("Once upon a time") == tiny_tokenizer.encode("Once upon a time")


def test_tokenizer_larger_than_vocabulary_refused(tmp_path, tiny_tokenizer):
    model = make_model(tiny_args(vocab_size=20))
    d = write_hf_openelm(model, tmp_path / "hf")
    with pytest.raises(MlxeffError, match=r"the tokenizer has \d+ tokens but the model's vocabulary has 20"):
        convert(d, tmp_path / "out", tokenizer=tokenizer_dir(tmp_path, tiny_tokenizer), progress=False)
    assert not (tmp_path / "out").exists()


# --- quantized outputs and mlxeff sources -------------------------------------------------

def test_affine_output_rebuilds_exactly(tmp_path):
    from mlxeff.quant.affine import quantize_affine

    model = make_model(tiny_args())
    d = write_hf_openelm(model, tmp_path / "hf")
    s = convert(d, tmp_path / "q", tokenizer=False, dtype="float32", quantize="affine", bits=4, group_size=32,
                progress=False)
    loaded, _ = mlxeff.load(tmp_path / "q")
    spec = loaded.mlxeff_meta["quantization"]
    assert spec["transformer.token_embeddings"] == {"method": "affine", "bits": 8, "group_size": 32}
    assert spec["transformer.layers.0.attn.qkv_proj"] == {"method": "affine", "bits": 4, "group_size": 32}
    assert isinstance(loaded.transformer.layers[0].ffn.proj_1, nn.QuantizedLinear)
    assert isinstance(loaded.transformer.token_embeddings, nn.QuantizedEmbedding)
    assert s["linear_bits_per_weight"] == pytest.approx(4 + 2 * 32 / 32)  # fp32 scale and bias per 32
    direct = quantize_affine(make_model(tiny_args()), bits=4, group_size=32)
    assert_same_logits(loaded, direct, atol=0)
    # the quantized model stays close to the float one
    rel = np.abs(logits(loaded) - logits(model)).mean() / np.abs(logits(model)).mean()
    assert rel < 0.2

    # compressing an already converted (float) mlxeff directory gives the same result
    convert(d, tmp_path / "f32", tokenizer=False, dtype="float32", progress=False)
    s2 = convert(tmp_path / "f32", tmp_path / "q2", tokenizer=False, dtype="float32", quantize="affine",
                 bits=4, group_size=32, progress=False)
    assert s2["source_kind"] == "mlxeff"
    again, _ = mlxeff.load(tmp_path / "q2")
    assert_same_logits(again, direct, atol=0)
    with pytest.raises(MlxeffError, match="already quantized"):
        convert(tmp_path / "q", tmp_path / "q3", tokenizer=False, quantize="affine", progress=False)


def test_affine_embedding_bits_and_bad_settings():
    from mlxeff.quant.affine import affine_spec

    model = make_model(tiny_args(share_input_output_layers=False))
    spec = affine_spec(model, bits=3, group_size=64, embedding_bits=None)
    assert "transformer.token_embeddings" not in spec and "lm_head" not in spec
    assert {v["bits"] for v in spec.values()} == {3}
    # FFN widths that 64 does not divide stay in floating point
    widths = {f"transformer.layers.{i}.ffn.proj_2": w for i, w in enumerate(model.args.ffn_dims)}
    for path, w in widths.items():
        assert (path in spec) == (w % 64 == 0)
    for bad in (dict(bits=7, group_size=64), dict(bits=4, group_size=48), dict(bits=4, group_size=64, embedding_bits=1)):
        with pytest.raises(MlxeffError, match="supports"):
            affine_spec(model, **bad)


def test_seedlm_missing_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxeff.quant.seedlm", None)
    model = make_model(tiny_args())
    d = write_hf_openelm(model, tmp_path / "hf")
    with pytest.raises(MlxeffError, match="SeedLM quantization is not available"):
        convert(d, tmp_path / "out", tokenizer=False, quantize="seedlm", progress=False)
    assert not (tmp_path / "out").exists()


def test_seedlm_is_called_with_the_model(tmp_path, monkeypatch):
    import types

    calls = []

    def quantize_model(model, bits, progress):
        calls.append((type(model).__name__, bits, progress))
        model.mlxeff_meta = {**(getattr(model, "mlxeff_meta", None) or {}), "quantization": {}}

    monkeypatch.setitem(sys.modules, "mlxeff.quant.seedlm", types.SimpleNamespace(quantize_model=quantize_model))
    model = make_model(tiny_args())
    d = write_hf_openelm(model, tmp_path / "hf")
    convert(d, tmp_path / "out", tokenizer=False, quantize="seedlm", bits=3, progress=False)
    assert calls == [("Model", 3, False)]


def test_hub_id_is_fetched_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    model = make_model(tiny_args())
    d = write_hf_openelm(model, tmp_path / "hf")
    seen = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        seen.append(repo_id)
        return str(d)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    convert("apple/OpenELM-tiny", tmp_path / "out", tokenizer=False, dtype="float32", progress=False)
    assert seen == ["apple/OpenELM-tiny"]
    loaded, _ = mlxeff.load(tmp_path / "out")
    assert_same_logits(loaded, model, atol=0)


def test_seedlm_output_round_trips(tmp_path):
    pytest.importorskip("mlxeff.quant.seedlm")
    args = layerwise_config(1, 32, 16, vocab_size=64, ffn_dim_divisor=16, num_gqa_groups=1)
    model = make_model(args)
    d = write_hf_openelm(model, tmp_path / "hf")
    s = convert(d, tmp_path / "out", tokenizer=False, dtype="float32", quantize="seedlm", bits=4, progress=False)
    loaded, _ = mlxeff.load(tmp_path / "out")
    methods = {v["method"] for v in loaded.mlxeff_meta["quantization"].values()}
    assert methods == {"seedlm"} and s["quantization"] == {"method": "seedlm", "bits": 4}
    rel = np.abs(logits(loaded) - logits(model)).mean() / np.abs(logits(model)).mean()
    assert 0 < rel < 0.5


def test_float16_overflow_is_an_error_not_inf(tmp_path):
    model = make_model(tiny_args())
    w = model.transformer.layers[0].ffn.proj_2.weight
    model.transformer.layers[0].ffn.proj_2.weight = w.at[0, 0].add(1e5)
    d = write_hf_openelm(model, tmp_path / "hf")
    with pytest.raises(MlxeffError, match="proj_2.weight has values beyond float16's range; use --dtype bfloat16"):
        convert(d, tmp_path / "out", tokenizer=False, dtype="float16", progress=False)
    assert not (tmp_path / "out").exists()
    convert(d, tmp_path / "out", tokenizer=False, dtype="bfloat16", progress=False)


def test_llama_output_loads_in_mlx_lm(tmp_path, tiny_tokenizer):
    from mlx_lm import load as lm_load

    weights = llama_weights(LLAMA, seed=3)
    d = write_llama(tmp_path / "llama", LLAMA, weights)
    convert(d, tmp_path / "out", tokenizer=tokenizer_dir(tmp_path, tiny_tokenizer), dtype="float32", progress=False)
    ours, _ = mlxeff.load(tmp_path / "out")
    ref, _ = lm_load(str(tmp_path / "out"))
    np.testing.assert_allclose(np.array(ref(TOKENS)), logits(ours), atol=1e-5, rtol=0)
