"""Speculative drafters (early exit, draft model, M2R2, prompt lookup): lossless under greedy on 50
prompts each, the target distribution kept under sampling, the cache left as the engine expects,
the draft-length policy, composition with SeedLM-4 / affine-4 weights and LazyLLM prefill, and the
command line."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxeff
from conftest import make_model, tiny_args
from mlxeff.engine import DecodeStats, generate_step
from mlxeff.models import layerwise_config
from mlxeff.sampling import SamplingConfig
from mlxeff.techniques import lazyllm as lz
from mlxeff.techniques.draft_model import DraftModelDrafter
from mlxeff.techniques.early_exit import (
    DraftLength, LayerDrafter, best_draft_length, expected_tokens, weight_share,
)
from mlxeff.techniques.kv_prediction import layer_pruned_model
from mlxeff.techniques.m2r2 import M2R2, FastStream, M2R2Config, M2R2Drafter
from mlxeff.techniques.prompt_lookup import PromptLookup
from mlxeff.techniques.registry import TechniqueError, build_hooks, resolve
from test_engine import _seedlm4, invoke, repetitive_prompts


def run(model, prompt, n, **hooks):
    stats = DecodeStats()
    out = [t for t, _ in generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=n,
                                       stats=stats, **hooks)]
    return out, stats


def deep_model(seed=11, vocab=96):
    """6 layers, so that a few of them draft imperfectly (drafts are accepted and rejected)."""
    return make_model(layerwise_config(6, 64, 16, vocab_size=vocab, ffn_dim_divisor=32), seed=seed)


def trained_like(stream: FastStream, seed=0, scale=0.05) -> FastStream:
    """Adapters moved away from zero (what training does), and a router that sometimes stops."""
    rng = np.random.default_rng(seed)
    for step in stream.steps:
        for name in ("qkv_proj", "out_proj", "proj_1", "proj_2"):
            ad = getattr(step, name)
            ad.b = mx.array(rng.normal(0, scale, ad.b.shape).astype(np.float32))
    stream.router.proj.weight = mx.array(rng.normal(0, 0.5, stream.router.proj.weight.shape)
                                         .astype(np.float32))
    return stream


def drafters(model):
    """Every drafter, fresh (they keep per-generation state)."""
    args = model.args
    return {
        "early-exit-1": lambda: LayerDrafter(1, 6),
        "early-exit-3": lambda: LayerDrafter(3, 4),
        "draft-model": lambda: DraftModelDrafter(layer_pruned_model(model, [0, 3]), 5),
        "m2r2-untrained": lambda: M2R2Drafter(FastStream(args, M2R2Config.for_model(args, 2.0, 4)), 6),
        "m2r2-r1": lambda: M2R2Drafter(FastStream(args, M2R2Config.for_model(args, 1.0, 4)), 6,
                                       policy=DraftLength(6, cost=0.1)),
        "m2r2-trained": lambda: M2R2Drafter(
            trained_like(FastStream(args, M2R2Config.for_model(args, 3.0, 4))), 6),
        "lookup": lambda: PromptLookup(3, 6),
    }


PROMPTS = repetitive_prompts(50, 96, seed=5)
GREEDY_TOKENS = 10


@pytest.fixture(scope="module")
def greedy_reference():
    model = deep_model()
    return model, [run(model, p, GREEDY_TOKENS)[0] for p in PROMPTS]


@pytest.mark.parametrize("name", list(drafters(deep_model())))
def test_every_drafter_is_lossless_under_greedy_on_50_prompts(greedy_reference, name):
    model, reference = greedy_reference
    make = drafters(model)[name]
    total = DecodeStats()
    for prompt, plain in zip(PROMPTS, reference):
        out, stats = run(model, prompt, GREEDY_TOKENS, drafter=make())
        assert out == plain, prompt
        total.drafted += stats.drafted
        total.accepted += stats.accepted
    assert total.accepted > 0
    if name == "m2r2-r1":  # drafting with every layer and untrained adapters: every draft is right
        assert total.accepted == total.drafted
    else:
        assert total.drafted > total.accepted  # some drafts were rejected (the cache was trimmed)


@pytest.mark.parametrize("which", ["early-exit", "m2r2"])
def test_drafting_leaves_the_cache_as_it_was(which):
    model = deep_model()
    prompt = mx.array(list(range(5, 40)), dtype=mx.uint32)
    cache = model.make_cache()
    model(prompt[None], cache=cache)
    before = [(c.offset, c.next_position, np.array(c.keys[..., :c.offset, :])) for c in cache]
    args = model.args
    d = LayerDrafter(4, 6) if which == "early-exit" else \
        M2R2Drafter(trained_like(FastStream(args, M2R2Config.for_model(args, 2.0, 4))), 6,
                    threshold=0.0)
    d.policy = DraftLength(6, cost=0.01, prior=0.99)
    d.start(model, prompt.tolist(), cache)
    draft = d.propose(prompt.tolist() + [7], 5)
    assert len(draft.tokens) == 5
    for c, (offset, nxt, keys) in zip(cache, before):
        assert (c.offset, c.next_position) == (offset, nxt)
        np.testing.assert_array_equal(np.array(c.keys[..., :c.offset, :]), keys)


def test_lazy_cache_is_left_as_it_was_by_drafting():
    model = lz_model()
    prompt = mx.array(np.random.default_rng(2).integers(0, 96, 60).astype(np.uint32))
    prefill = lz.LazyPrefill(AGGRESSIVE)
    cache = prefill.make_cache(model)
    prefill(model, prompt, cache)
    before = [(c.offset, c.next_position, c.positions.tolist(), len(c._history)) for c in cache]
    d = LayerDrafter(5, 4, policy=DraftLength(4, cost=0.01, prior=0.99))
    d.start(model, prompt.tolist(), cache)
    assert len(d.propose(prompt.tolist() + [3], 4).tokens) == 4
    assert [(c.offset, c.next_position, c.positions.tolist(), len(c._history))
            for c in cache] == before


def test_sampling_with_draft_probabilities_keeps_the_target_distribution():
    """The second token's distribution with a sampling draft model (q far from p) equals plain
    sampling's; accepting every draft would give q's instead (the test can tell them apart)."""
    vocab = 6
    args = layerwise_config(2, 32, 16, vocab_size=vocab, ffn_dim_divisor=16)
    model, draft = make_model(args, seed=3), make_model(args, seed=99)
    sampling = SamplingConfig(temp=1.0)
    prompt = [1, 5, 2]

    def second_token(m):
        probs = lambda ids: np.array(sampling.probabilities(m(mx.array([ids]))[0, -1:])[0])
        return sum(p1 * probs(prompt + [t1]) for t1, p1 in enumerate(probs(prompt)))

    exact = second_token(model)
    assert 0.5 * np.abs(second_token(draft) - exact).sum() > 0.2
    mx.random.seed(0)
    n, counts, accepted = 600, np.zeros(vocab), 0
    for _ in range(n):
        stats = DecodeStats()
        d = DraftModelDrafter(draft, 1, sampling=sampling, policy=DraftLength(1, cost=0.0))
        out = [t for t, _ in generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=3,
                                           sampling=sampling, drafter=d, stats=stats)]
        counts[out[1]] += 1
        accepted += stats.accepted
    assert 0.1 * n < accepted < 0.9 * n  # drafts were accepted and rejected
    assert 0.5 * np.abs(counts / n - exact).sum() < 0.06


@pytest.mark.parametrize("kind", ["early-exit", "draft-model", "m2r2"])
def test_sampling_drafters_return_their_distribution(kind):
    model = deep_model()
    args = model.args
    sampling = SamplingConfig(temp=0.7, top_p=0.9)
    stream = FastStream(args, M2R2Config.for_model(args, 2.0, 4))
    draft_model = layer_pruned_model(model, [0, 2])
    make = {"early-exit": lambda p: LayerDrafter(2, 4, sampling=sampling, policy=p),
            "draft-model": lambda p: DraftModelDrafter(draft_model, 4, sampling=sampling, policy=p),
            "m2r2": lambda p: M2R2Drafter(stream, 4, threshold=0.0, sampling=sampling, policy=p),
            }[kind]
    d = make(DraftLength(4, cost=0.01, prior=0.99))
    prompt = list(range(3, 20))
    cache = model.make_cache()
    model(mx.array([prompt]), cache=cache)
    d.start(model, prompt, cache)
    draft = d.propose(prompt + [4], 4)
    assert draft.probs is not None and draft.probs.shape == (4, 96)
    np.testing.assert_allclose(np.array(draft.probs.sum(axis=-1)), 1.0, rtol=1e-5)
    assert all(draft.probs[i, t].item() > 0 for i, t in enumerate(draft.tokens))
    runs = []
    for _ in range(2):
        mx.random.seed(4)
        runs.append([t for t, _ in generate_step(mx.array(prompt, dtype=mx.uint32), model,
                                                 max_tokens=12, sampling=sampling,
                                                 drafter=make(DraftLength(4, cost=0.1)))])
    assert runs[0] == runs[1] and len(runs[0]) == 12


@pytest.mark.parametrize("kind", ["early-exit", "draft-model"])
def test_the_engine_gives_drafters_its_sampling_settings(kind):
    """A drafter built without sampling settings proposes under the engine's (its proposals carry
    their distribution) and goes back to the argmax when the engine decodes greedily."""
    model = deep_model()
    sampling = SamplingConfig(temp=0.7, top_k=20)
    make = {"early-exit": lambda: LayerDrafter(2, 4, policy=DraftLength(4, cost=0.01, prior=0.99)),
            "draft-model": lambda: DraftModelDrafter(layer_pruned_model(model, [0, 2]), 4,
                                                     policy=DraftLength(4, cost=0.01, prior=0.99))}[kind]
    for config, sampled in ((sampling, True), (SamplingConfig(), False)):
        d = make()
        if not sampled:
            d.sampling = sampling  # greedy decoding overrides a drafter's own settings
        seen = []
        propose = d.propose
        d.propose = lambda context, k: seen.append(propose(context, k)) or seen[-1]
        mx.random.seed(2)
        out, _ = run(model, list(range(3, 20)), 10, sampling=config, drafter=d)
        assert len(out) == 10 and any(x.tokens for x in seen)
        assert all((x.probs is not None) == sampled for x in seen if x.tokens)
        assert d.sampling == (sampling if sampled else None)


# ---- the draft-length policy ---------------------------------------------------------------------

def test_expected_tokens_and_best_length():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert best_draft_length(0.0, 0.2, 8) == 0  # nothing is ever accepted: do not draft
    assert best_draft_length(0.999, 0.01, 8) == 8  # almost free and almost always right
    lengths = [best_draft_length(a, 0.25, 8) for a in np.linspace(0, 0.99, 12)]
    assert lengths == sorted(lengths)  # drafts grow with the acceptance rate ...
    assert best_draft_length(0.8, 0.1, 8) >= best_draft_length(0.8, 0.5, 8)  # ... and cheapness


def test_draft_length_adapts_and_probes():
    p = DraftLength(max_draft=8, cost=0.2)
    start = p.length()
    for _ in range(10):
        p.update(p.length(), p.length())  # everything accepted
    assert p.length() > start and p.alpha > 0.9
    seen = []
    for _ in range(40):
        k = p.length()
        seen.append(k)
        p.update(k, 0)  # everything rejected
    assert seen[0] == 8 and seen[-16:].count(0) == 14 and seen[-16:].count(1) == 2  # probes
    assert p.alpha < 0.25


def test_draft_cost_is_the_slope_of_verify_time_over_drafted_rows():
    """Steps drafted at different lengths (no undrafted step at all) give the per-row cost as
    the slope of a line through (rows, verify time), and the one-row forward as its intercept."""
    p = DraftLength(max_draft=8, prior_cost=0.9)
    for _ in range(10):
        p.timed(2, 0.0, 0.012)  # 8 ms for one row + 2 ms per extra row
        p.timed(6, 0.0, 0.020)
    assert p.draft_cost == pytest.approx(0.002 / 0.008)
    p.reset()
    for _ in range(10):
        p.timed(4, 0.004, 0.018)  # one length only: the extra rows cannot be told apart ...
    assert p.draft_cost == pytest.approx(0.001 / 0.018)  # ... drafting time over verify time


def test_prompt_lookup_shortens_drafts_that_are_rejected():
    """With every draft rejected the adaptive lookup proposes less and less (down to a probe now
    and then); fixed, it proposes everything the match offers each time."""
    context = list(range(20)) * 5
    for adaptive, expect in ((True, "shrinks"), (False, "stays")):
        d = PromptLookup(3, 8, adaptive=adaptive)
        d.start(None, context, None)
        lengths = []
        for _ in range(30):
            draft = d.propose(context, 8)
            lengths.append(len(draft.tokens))
            d.feedback(len(draft.tokens), 0)
        if expect == "shrinks":
            assert lengths[0] >= 2 and max(lengths[-10:]) <= 1 and 0 in lengths[-10:]
        else:
            assert lengths == [8] * 30


def test_draft_cost_is_measured_from_the_prior_on():
    p = DraftLength(max_draft=8, prior_cost=0.3, prior=0.9)
    assert p.draft_cost == 0.3
    long = p.length()
    for _ in range(20):
        p.timed(2, 0.04, 0.01)  # a drafted token costs twice a verify forward
    assert p.draft_cost == pytest.approx(2.0) and p.length() == 0 < long
    p.reset()
    for _ in range(20):
        p.timed(2, 0.002, 0.014)  # 1 ms per drafted token, 14 ms to verify three rows ...
        p.timed(0, 0.0, 0.010)  # ... 10 ms for one row: 2 ms per extra row
    assert p.draft_cost == pytest.approx((0.001 + 0.002) / 0.010)
    assert DraftLength(cost=0.1, prior_cost=0.9).draft_cost == 0.1  # a fixed cost stays
    p.reset()
    assert p.draft_cost == 0.3 and p.length() == long


def test_weight_share_counts_layers_and_head():
    args = layerwise_config(6, 64, 16, vocab_size=96, ffn_dim_divisor=32)
    shares = [weight_share(args, n) for n in range(7)]
    assert shares == sorted(shares) and shares[-1] == pytest.approx(1.0) and shares[0] > 0


# ---- composition -------------------------------------------------------------------------------------

def lz_model():
    return make_model(layerwise_config(8, 128, 32, num_gqa_groups=2, vocab_size=96,
                                       ffn_dim_divisor=32), seed=3)


AGGRESSIVE = lz.LazySchedule(keep_start=0.5, keep_end=0.2, start=0.25, end=0.9, stages=3, recent=0)


def artifacts(model, tmp_path):
    """A saved model directory with an M2R2 artifact and a draft model beside it."""
    mlxeff.save(model, None, tmp_path / "model")
    args = model.args
    stream = trained_like(FastStream(args, M2R2Config.for_model(args, 2.0, 4)))
    M2R2(stream).save(tmp_path / "model" / "m2r2" / "r2", base=model)
    mlxeff.save(layer_pruned_model(model, [0, 2]), None, tmp_path / "draft")
    return tmp_path / "model"


SPECS = lambda tmp_path: {"early-exit": {"layers": 2}, "draft-model": {"path": tmp_path / "draft"},
                          "m2r2": {"path": "r2"}, "lookup": {}}


@pytest.mark.parametrize("weights", ["seedlm4", "affine4"])
def test_drafters_with_quantized_weights_equal_the_quantized_model_alone(weights, tmp_path):
    model = make_model(tiny_args(), seed=4)
    model_dir = artifacts(model, tmp_path)  # adapters and the draft model fit the float model
    if weights == "seedlm4":
        _seedlm4(model)
    else:
        nn.quantize(model, group_size=32, bits=4)
    for prompt in repetitive_prompts(4, 96, seed=9):
        alone, _ = run(model, prompt, 10)
        for name, opts in SPECS(tmp_path).items():
            hooks = build_hooks(model, {name: opts}, model_dir=model_dir)
            out, _ = run(model, prompt, 10, **hooks)
            assert out == alone, (weights, name)


def test_drafters_with_lazyllm_prefill_equal_lazyllm_alone(tmp_path):
    model = lz_model()
    model_dir = artifacts(model, tmp_path)
    lazy = {"keep": (0.5, 0.2), "range": (0.25, 0.9), "stages": 3, "recent": 0}
    for prompt in repetitive_prompts(3, 96, seed=7):
        prompt = (prompt * 4)[:70]
        alone, _ = run(model, prompt, 10, **build_hooks(model, {"lazy": lazy}))
        for name, opts in SPECS(tmp_path).items():
            hooks = build_hooks(model, {"lazy": lazy, name: opts}, model_dir=model_dir)
            assert set(hooks) == {"prefill", "decode", "drafter"}
            out, stats = run(model, prompt, 10, **hooks)
            assert out == alone, name


def test_two_drafters_refuse_each_other_in_one_line():
    with pytest.raises(TechniqueError, match=r"--early-exit and --m2r2 both replace the drafter"):
        resolve({"early-exit": 2, "m2r2": "x"})
    with pytest.raises(TechniqueError, match=r"--lookup and --draft-model both replace the drafter"):
        resolve({"lookup": {}, "draft-model": "x"})
    assert set(resolve({"lazy": {}, "early-exit": 3})) == {"lazy", "early-exit"}


def test_bad_drafter_options_are_one_line_errors(tmp_path, tiny_tokenizer):
    model = make_model(tiny_args(), seed=1)
    with pytest.raises(TechniqueError, match=r"--early-exit 9: the model has only 4 layers"):
        build_hooks(model, {"early-exit": 9})
    with pytest.raises(TechniqueError, match=r"--early-exit must be between 1 and"):
        resolve({"early-exit": 0})
    other = make_model(tiny_args(vocab_size=64))
    mlxeff.save(other, None, tmp_path / "other")
    with pytest.raises(mlxeff.MlxeffError) as info:
        build_hooks(model, {"draft-model": tmp_path / "other"})
    assert "vocabulary (64 tokens) differs from the model's (96)" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(mlxeff.MlxeffError, match="no such draft model directory"):
        build_hooks(model, {"draft-model": tmp_path / "nowhere"})
    mlxeff.save(model, tiny_tokenizer, tmp_path / "a")
    mlxeff.save(layer_pruned_model(model, [0]), tiny_tokenizer, tmp_path / "b")
    assert set(build_hooks(model, {"draft-model": tmp_path / "b"}, model_dir=tmp_path / "a")) == \
        {"drafter"}
    tok = tmp_path / "b" / "tokenizer.json"
    tok.write_text(tok.read_text() + " ")
    with pytest.raises(mlxeff.MlxeffError, match="tokenizer.json differs from the model's"):
        build_hooks(model, {"draft-model": tmp_path / "b"}, model_dir=tmp_path / "a")


# ---- the command line ----------------------------------------------------------------------------

@pytest.fixture
def cli_model(tmp_path, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    model = make_model(layerwise_config(6, 64, 16, vocab_size=vocab, ffn_dim_divisor=32), seed=2)
    mlxeff.save(model, tiny_tokenizer, tmp_path / "model")
    args = model.args
    M2R2(trained_like(FastStream(args, M2R2Config.for_model(args, 2.0, 4)))).save(
        tmp_path / "model" / "m2r2" / "r2", base=model)
    mlxeff.save(layer_pruned_model(model, [0, 3]), tiny_tokenizer, tmp_path / "draft")
    return tmp_path


@pytest.mark.parametrize("flags", [["--early-exit", 2], ["--m2r2", "r2"], ["--draft-model", "draft"]])
def test_cli_generate_with_a_drafter_reports_tokens_per_forward(cli_model, flags):
    if flags[0] == "--draft-model":
        flags = [flags[0], cli_model / "draft"]
    path = cli_model / "model"
    prompt = "Once upon a time there was a little girl who lived in a village"
    code, out, err = invoke("generate", prompt, "--model", path, "-n", 16, "--json", *flags)
    assert code == 0, err
    res = json.loads(out)
    plain = json.loads(invoke("generate", prompt, "--model", path, "-n", 16, "--json")[1])
    assert res["text"] == plain["text"]
    assert res["decode_forwards"] < plain["decode_forwards"] or res["drafted_tokens"] > 0
    assert res["tokens_per_forward"] >= 1.0 and 0 <= res["acceptance_rate"] <= 1
    code, out, err = invoke("generate", prompt, "--model", path, "-n", 16, *flags)
    assert code == 0 and "tokens per forward" in out and "Generation:" in out


def test_benchmark_runs_end_to_end(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import SHARED_DATA

    if not (SHARED_DATA / "gutenberg-children" / "valid.txt.gz").is_file():
        pytest.skip(f"no held-out books at {SHARED_DATA}")
    repo = Path(__file__).resolve().parents[1]
    model, _ = mlxeff.load(repo / "mlxeff" / "assets" / "default")
    M2R2(FastStream(model.args, M2R2Config.for_model(model.args, 4.0, 4))).save(
        tmp_path / "m2r2", base=model)
    env = dict(os.environ)
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "speculative.py"), "--devices", "cpu",
         "--tasks", "copy", "story", "--prompts", "1", "--max-tokens", "8", "--trials", "1",
         "--warmup", "0", "--early-exit", "3", "--m2r2", str(tmp_path / "m2r2"), "--json"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["runs"][0]["results"]
    methods = {r["method"] for r in rows}
    assert {"plain", "lookup", "early-exit 3", "m2r2 m2r2"} <= methods
    assert any(m.startswith("draft-model") for m in methods)
    assert {r["task"] for r in rows} == {"copy", "story"}
    assert all(r["identical_to_plain"] for r in rows)
    assert all(r["speedup"] == 1.0 for r in rows if r["method"] == "plain")


def test_benchmark_names_a_missing_prompt_source(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speculative.py"
    spec = importlib.util.spec_from_file_location("speculative_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.TASK_DATA, "qa", tmp_path / "nq-open-oracle.jsonl.gz")
    with pytest.raises(SystemExit, match=r"nq-open-oracle.jsonl.gz: not found \(the qa prompts"):
        bench.check_task_data(["story", "qa"])
    bench.TASK_DATA["qa"].write_bytes(b"")
    bench.check_task_data(["qa"])  # present: no error


def test_verify_cost_benchmark_times_every_row_count(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    from mlxeff.io import save

    from conftest import make_model, make_tokenizer

    save(make_model(), make_tokenizer(), tmp_path / "m")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "verify_cost.py"
    spec = importlib.util.spec_from_file_location("verify_cost_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", str(tmp_path / "m"), "--steps", "18", "--prompt-tokens", "8",
                "--prefill-lengths", "5,7", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["prefill"]["lengths"] == [5, 7] and len(out["prefill"]["again_ms"]) == 2
    for bad in (["--prefill-lengths", "5,x"], ["--steps", "0"], ["--model", str(tmp_path / "none")]):
        with pytest.raises(SystemExit) as e:
            bench.main(bad)
        assert e.value.code  # a non-zero exit, one line, no traceback
    assert len(out["passes"]) == 2
    for p in out["passes"]:
        assert sorted(map(int, p["median_ms"])) == list(range(1, 10))
        assert all(v > 0 for v in p["median_ms"].values()) and p["prefill_s"] > 0
