"""Engine v2: multi-token decoding (prompt lookup), the sampling rule, trimming, saving, the
technique registry and how techniques compose with each other and with weight formats."""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

import mlxeff
from conftest import make_model, tiny_args
from mlxeff.cache import trim_cache
from mlxeff.engine import DecodeStats, DecodeStrategy, generate_step
from mlxeff.sampling import SamplingConfig, SamplingError, accept_greedy, accept_sampled
from mlxeff.techniques import kv_prediction as kvp
from mlxeff.techniques import lazyllm as lz
from mlxeff.techniques.prompt_lookup import PromptLookup, find_continuation
from mlxeff.techniques.registry import TechniqueError, build_hooks, resolve, techniques

REPO = Path(__file__).resolve().parents[1]


def greedy(model, prompt, n, **hooks):
    stats = DecodeStats()
    out = [t for t, _ in generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=n,
                                       stats=stats, **hooks)]
    return out, stats


def repetitive_prompts(count, vocab, seed=0):
    """Prompts that repeat spans of themselves (so lookup drafts are proposed, accepted and
    rejected) mixed with plain random ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        base = rng.integers(3, vocab, size=rng.integers(5, 30)).tolist()
        out.append(base * rng.integers(1, 4) + base[: rng.integers(0, len(base))] if i % 4 else base)
    return out


# ---- prompt lookup ------------------------------------------------------------------------------

def test_find_continuation_takes_the_most_recent_longest_match():
    ctx = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3])
    assert find_continuation(ctx, 3, 2).tolist() == [7, 8]  # the later "1 2 3" wins
    assert find_continuation(ctx, 3, 10).tolist() == [7, 8, 1, 2, 3]
    assert find_continuation(np.array([5, 6, 7]), 3, 4).tolist() == []  # nothing repeats
    assert find_continuation(np.array([4, 4, 4]), 2, 3).tolist() == [4]  # overlap with the tail
    assert find_continuation(np.array([1, 5, 2, 5]), 3, 2).tolist() == [2, 5]  # falls back to n=1


def test_prompt_lookup_greedy_equals_plain_greedy_on_20_prompts_random_openelm():
    model = make_model(tiny_args(), seed=1)
    for prompt in repetitive_prompts(20, 96):
        plain, _ = greedy(model, prompt, 24)
        looked, stats = greedy(model, prompt, 24, drafter=PromptLookup(3, 6))
        assert looked == plain
    assert stats.forwards <= 24


def test_prompt_lookup_greedy_equals_plain_greedy_on_20_prompts_embedded_model():
    from mlxeff.precision import apply_compute_dtype

    model, tokenizer = mlxeff.load(REPO / "mlxeff" / "assets" / "default")
    # float32; on the CPU from the dequantized weights (MLX's 4-bit CPU matmul made this take 72 s)
    apply_compute_dtype(model, "float32")
    text = ("The little girl walked to the river. The little girl walked to the river and sat down. "
            "Once upon a time there was a king who had three daughters. ")
    ids = tokenizer.encode(text)
    drafted = accepted = 0
    for i in range(20):
        prompt = ids[: 6 + 2 * i] + ids[: 3 + i // 2]  # a head of the text, then its start again
        plain, _ = greedy(model, prompt, 12)
        looked, stats = greedy(model, prompt, 12, drafter=PromptLookup(3, 8))
        assert looked == plain, i
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert drafted > accepted > 0  # drafts were made, some accepted and some rejected


def test_prompt_lookup_saves_forwards_on_a_copy():
    model = make_model(tiny_args(), seed=2)
    prompt = list(range(10, 60))
    plain, _ = greedy(model, prompt, 30)
    # teach nothing: the lossless check is what matters; forwards drop when the output copies
    looked, stats = greedy(model, prompt + prompt[:5], 30, drafter=PromptLookup(3, 8))
    assert looked == greedy(model, prompt + prompt[:5], 30)[0]
    assert stats.generated == 30 and stats.forwards <= 30


def test_greedy_with_a_repetition_penalty_stays_lossless():
    from mlx_lm.sample_utils import make_repetition_penalty

    model = make_model(tiny_args(), seed=3)
    procs = [make_repetition_penalty(1.3, 8)]
    for prompt in repetitive_prompts(6, 96, seed=4):
        plain, _ = greedy(model, prompt, 16, logits_processors=procs)
        looked, _ = greedy(model, prompt, 16, logits_processors=procs, drafter=PromptLookup(2, 5))
        assert looked == plain


# ---- the acceptance rule -------------------------------------------------------------------------

def test_accept_greedy():
    assert accept_greedy([4, 5, 6], [4, 5, 9, 1]) == (2, 9)
    assert accept_greedy([4, 5], [4, 5, 7]) == (2, 7)
    assert accept_greedy([], [3]) == (0, 3)


@pytest.mark.parametrize("with_q", [False, True])
def test_speculative_sampling_keeps_the_target_distribution(with_q):
    """Drafting token 2 (point mass, or from q) and sampling by the rule yields p's distribution."""
    mx.random.seed(0)
    p = mx.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = mx.array([[0.05, 0.05, 0.8, 0.1]]) if with_q else None
    counts = np.zeros(4)
    n = 6000
    for _ in range(n):
        if with_q:
            draft = [int(mx.random.categorical(mx.log(q[0])).item())]
        else:
            draft = [2]
        accepted, nxt = accept_sampled(draft, p, q)
        counts[draft[0] if accepted else nxt] += 1
    np.testing.assert_allclose(counts / n, np.array(p[0]), atol=0.02)


def test_sampled_decoding_with_lookup_is_seeded_and_valid(tiny_tokenizer):
    model = make_model(tiny_args(vocab_size=len(tiny_tokenizer)))
    kw = dict(max_tokens=12, temp=0.8, top_p=0.9, techniques={"lookup": {}})
    a = mlxeff.generate(model, tiny_tokenizer, "Once upon a time once upon a time", seed=5, **kw)
    b = mlxeff.generate(model, tiny_tokenizer, "Once upon a time once upon a time", seed=5, **kw)
    assert a == b


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temp=-1), "--temp"), (dict(top_p=2), "--top-p"), (dict(top_p=0), "--top-p"),
    (dict(top_k=-3), "--top-k"), (dict(min_p=5), "--min-p"), (dict(temp=float("nan")), "--temp"),
])
def test_sampling_values_are_validated(kwargs, needle):
    with pytest.raises(SamplingError, match=re.escape(needle)) as info:
        SamplingConfig(**kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# ---- trimming and saving --------------------------------------------------------------------------

def lazy_model():
    from mlxeff.models import layerwise_config

    return make_model(layerwise_config(8, 128, 32, num_gqa_groups=2, vocab_size=96,
                                       ffn_dim_divisor=32), seed=3)


AGGRESSIVE = lz.LazySchedule(keep_start=0.5, keep_end=0.2, start=0.25, end=0.9, stages=3, recent=0)


def test_lazy_cache_trim_then_redecode_equals_never_having_decoded():
    model = lazy_model()
    prompt = mx.array(np.random.default_rng(2).integers(0, 96, 90).astype(np.uint32))
    prefill = lz.LazyPrefill(AGGRESSIVE)
    cache = prefill.make_cache(model)
    prefill(model, prompt, cache)
    first = [lz.lazy_decode(model, mx.array([t]), cache) for t in (5, 6)]
    mx.eval(first)
    state = (cache.next_position, cache.revived, cache.computed, [c.offset for c in cache])
    [lz.lazy_decode(model, mx.array([t]), cache) for t in (40, 41, 42)]
    assert trim_cache(cache, 3) == 3
    assert (cache.next_position, cache.revived, cache.computed, [c.offset for c in cache]) == state
    again = [lz.lazy_decode(model, mx.array([t]), cache) for t in (7, 8)]
    fresh = prefill.make_cache(model)
    prefill(model, prompt, fresh)
    want = [lz.lazy_decode(model, mx.array([t]), fresh) for t in (5, 6, 7, 8)]
    for got, ref in zip(first + again, want):
        assert mx.array_equal(got, ref)


@pytest.mark.parametrize("lazy", [False, True])
def test_prompt_cache_saved_and_reloaded_continues_with_identical_tokens(tmp_path, lazy):
    model = lazy_model()
    prompt = mx.array(np.random.default_rng(3).integers(0, 96, 70).astype(np.uint32))
    hooks = lz.lazy_hooks(AGGRESSIVE, 8) if lazy else {}
    cache = hooks["prefill"].make_cache(model) if lazy else model.make_cache()
    first = [t for t, _ in generate_step(prompt, model, max_tokens=4, prompt_cache=cache, **hooks)]
    f = str(tmp_path / "cache.safetensors")
    save_prompt_cache(f, cache)
    loaded = load_prompt_cache(f)
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    decode = hooks.get("decode") or DecodeStrategy()
    nxt = mx.array([first[-1]])
    a = decode(model, nxt, cache)
    b = decode(model, nxt, loaded)
    assert mx.array_equal(a, b)


# ---- composition -----------------------------------------------------------------------------------

def test_lazyllm_with_prompt_lookup_is_lossless_under_greedy():
    model = lazy_model()
    for prompt in repetitive_prompts(5, 96, seed=7):
        prompt = (prompt * 4)[:80]
        lazy, _ = greedy(model, prompt, 12, **lz.lazy_hooks(AGGRESSIVE, 8))
        both, stats = greedy(model, prompt, 12, drafter=PromptLookup(3, 4), **lz.lazy_hooks(AGGRESSIVE, 8))
        assert both == lazy
    assert stats.generated == 12


def _seedlm4(model):
    from mlxeff.quant import apply_quantization_spec

    specs = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("transformer.layers."):
            out, inp = module.weight.shape
            specs[name] = {"method": "seedlm", "K": 16, "C": 8, "P": 3, "bits": 4,
                           "in_features": inp, "out_features": out}
    apply_quantization_spec(model, specs)
    rng = np.random.default_rng(0)
    for name, module in model.named_modules():
        if name in specs:
            module.seeds = mx.array(rng.integers(1, 65536, module.seeds.shape).astype(np.uint16))
            module.codes = mx.array(rng.integers(0, 256, module.codes.shape).astype(np.uint8))
            module.exp_base = mx.array(-7, dtype=mx.int32)
    return model


def test_seedlm4_with_lazyllm_keep_one_equals_seedlm4_alone():
    model = _seedlm4(make_model(tiny_args(), seed=4))
    prompt = list(range(5, 45))
    alone, _ = greedy(model, prompt, 10)
    with_lazy, _ = greedy(model, prompt, 10, **build_hooks(model, {"lazy": {"keep": (1.0, 1.0)}}))
    assert with_lazy == alone


def test_affine4_with_kv_prediction_identity_equals_affine4_alone():
    base = make_model(tiny_args(), seed=6)
    aux = kvp.layer_pruned_model(base, list(range(4)))
    for m in (base, aux):
        nn.quantize(m, group_size=32, bits=4)
    pred = kvp.KVPredictor.for_models(aux, base, list(range(4)), init="identity")
    art = kvp.KVPrediction(aux, pred, {"kind": "layer_pruned", "layers": list(range(4))})
    prompt = list(range(7, 37))
    alone, _ = greedy(base, prompt, 10)
    with_kvp, _ = greedy(base, prompt, 10, prefill=art.prefill())
    assert with_kvp == alone


def test_two_prefill_techniques_refuse_each_other_and_a_drafter_composes():
    with pytest.raises(TechniqueError, match=r"--lazy and --kv-prediction both replace the prefill"):
        resolve({"lazy": {}, "kv-prediction": "somewhere"})
    assert set(resolve({"lazy": {}, "lookup": {"draft": 4}})) == {"lazy", "lookup"}


@pytest.mark.parametrize("specs,needle", [
    ({"nope": {}}, "unknown technique 'nope'"),
    ({"lookup": {"size": 3}}, "--lookup has no option 'size'"),
    ({"lookup": {"draft": 0}}, "--lookup-draft must be between 1 and 128, got 0"),
    ({"lookup": {"ngram": 2.5}}, "--lookup-ngram must be an integer"),
    ({"kv-prediction": {}}, "--kv-prediction needs a value (DIR)"),
])
def test_registry_refuses_bad_specs_in_one_line(specs, needle):
    with pytest.raises(TechniqueError) as info:
        resolve(specs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def invoke(*args):
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_generate_help_has_one_panel_per_technique():
    code, out, _ = invoke("generate", "--help")
    assert code == 0
    for t in techniques():
        assert t.title in out and t.flag in out
        for o in t.options:
            assert o.flag(t.name) in out


def test_cli_incompatible_pair_is_one_line_and_exit_1(saved_dir):
    path, _ = saved_dir
    code, out, err = invoke("generate", "Once upon a time", "--model", path, "--lazy",
                            "--kv-prediction", path)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == ["error: --lazy and --kv-prediction both replace the prefill; choose one"]


def test_cli_lookup_reports_accepted_tokens(saved_dir):
    import json

    path, _ = saved_dir
    prompt = "Once upon a time there was a girl. Once upon a time there was a girl. Once upon"
    code, out, err = invoke("generate", prompt, "--model", path, "-n", 12, "--json", "--lookup")
    assert code == 0, err
    res = json.loads(out)
    assert res["techniques"] == {"lookup": {}}
    assert res["decode_forwards"] >= 1 and 0 <= res["acceptance_rate"] <= 1
    plain = json.loads(invoke("generate", prompt, "--model", path, "-n", 12, "--json")[1])
    assert res["text"] == plain["text"]


def test_no_module_outside_models_computes_attention_rope_or_a_block():
    """The techniques call the model's attention, RoPE and blocks; they never copy them."""
    patterns = [r"scaled_dot_product_attention", r"fast\.rope", r"nn\.RoPE\(", r"\.rope\(",
                r"create_attention_mask", r"attn_norm\(", r"ffn_norm\(", r"\.qkv_proj\(",
                r"\.out_proj\(", r"mx\.softmax\(", r"\.attention_fn\("]
    offenders = []
    for folder in ("mlxeff", "cli", "convert"):
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("mlxeff/models/") or rel == "mlxeff/sampling.py":
                continue  # the model itself; the sampler's softmax is over the vocabulary
            text = path.read_text()
            offenders += [f"{rel}: {p}" for p in patterns if re.search(p, text)]
    assert offenders == []


def test_prefill_chunk_length_follows_the_device(monkeypatch):
    """No chunk length given: 512 on the CPU, 2048 on a GPU (engine.prefill_step_size); a given
    one wins; ChunkedPrefill and the technique context resolve it the same way."""
    import mlxeff.engine as engine

    class Counting(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.rows = model, []

        def __call__(self, ids, cache=None):
            self.rows.append(ids.shape[1])
            return self.inner(ids, cache=cache)

    model = Counting(make_model())
    prompt = mx.array(np.arange(600) % 90 + 3, dtype=mx.int32)
    assert engine.prefill_step_size(7) == 7
    for device, step, rows in ((mx.cpu, 512, [512, 87, 1]), (mx.gpu, 2048, [599, 1])):
        monkeypatch.setattr(engine.mx, "default_device", lambda d=device: d)
        assert engine.prefill_step_size() == step
        assert build_hooks(model.inner, {"lazy": {}})["prefill"].step_size == step
        model.rows = []
        engine.ChunkedPrefill()(model, prompt, model.inner.make_cache())
        assert model.rows == rows
