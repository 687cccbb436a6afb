"""LazyLLM: keep ratio 1.0 equals plain prefill and decoding exactly; pruned runs equal an
independent dense reference with per-layer masks; the cache invariants hold; bad schedules fail."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import make_model
from mlxeff.errors import MlxeffError
from mlxeff.generate import ChunkedPrefill, DecodeStrategy, generate_step
from mlxeff.models import layerwise_config
from mlxeff.models.attention import attend as default_attention
from mlxeff.techniques import lazyllm as lz
from mlxeff.models import pruned_attention as pa

VOCAB = 96


def lazy_args(layers=8):
    # GQA with 2 query heads per KV head (2..4 query heads, 1..2 KV heads), 8 layers; head_dim 32,
    # so that on a GPU the revived rows' attention runs the pruned-attention kernel.
    return layerwise_config(layers, 128, 32, num_gqa_groups=2, vocab_size=VOCAB, ffn_dim_divisor=32)


@pytest.fixture(scope="module")
def model():
    return make_model(lazy_args(), seed=3)


def prompt_ids(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.uint32))


AGGRESSIVE = lz.LazySchedule(keep_start=0.5, keep_end=0.2, start=0.25, end=0.9, stages=3, recent=0)


# ---- exactness: keep ratio 1.0 ---------------------------------------------------------------

def _openblas_loaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


# With OpenBLAS preloaded, the same product can round differently inside different graphs
# (measured: the model's own layer-0 keys differ in the last bit between the plain model call and
# the same ops evaluated alone), so bit equality is checked with MLX's bundled BLAS.
exact = pytest.mark.skipif(_openblas_loaded(), reason="OpenBLAS preloaded: products are not "
                           "bit-reproducible across graphs; run without LD_PRELOAD")


@exact
@pytest.mark.parametrize("n,step", [(1, 512), (7, 512), (200, 512), (200, 64)])
def test_keep_one_prefill_logits_identical(model, n, step):
    prompt = prompt_ids(n)
    plain_cache = model.make_cache()
    plain = ChunkedPrefill(step)(model, prompt, plain_cache)
    prefill = lz.LazyPrefill(lz.LazySchedule.full(), step)
    cache = prefill.make_cache(model)
    lazy = prefill(model, prompt, cache)
    assert mx.array_equal(plain, lazy)
    for a, b in zip(plain_cache, cache):
        assert a.offset == b.offset == n
        ka, va = a.keys_and_values()
        kb, vb = b.keys_and_values()
        assert mx.array_equal(ka, kb) and mx.array_equal(va, vb)
        assert mx.array_equal(b.positions, mx.arange(n))
    assert cache.percent_computed() == 100.0 and cache.stats()["aux_tokens"] == 0


@exact
def test_keep_one_decoding_identical(model):
    prompt = prompt_ids(150, seed=1)
    plain = list(generate_step(prompt, model, max_tokens=12))
    hooks = lz.lazy_hooks(lz.LazySchedule.full(), num_layers=len(model.layers))
    lazy = list(generate_step(prompt, model, max_tokens=12, **hooks))
    assert [t for t, _ in plain] == [t for t, _ in lazy]
    for (_, a), (_, b) in zip(plain, lazy):
        assert mx.array_equal(a, b)


# ---- building blocks ---------------------------------------------------------------------------

def test_rope_at_matches_nn_rope():
    rope = nn.RoPE(16, traditional=False, base=10000)
    x = mx.random.normal((1, 3, 40, 16), key=mx.random.key(0))
    for offset in (0, 5, 3000):
        full = rope(x, offset=offset)
        contiguous = lz.rope_at(x, mx.arange(offset, offset + 40), rope)
        assert mx.array_equal(full, contiguous)
        pick = [31, 2, 17, 39, 0]
        gathered = lz.rope_at(x[:, :, pick], mx.array([offset + p for p in pick]), rope)
        assert mx.array_equal(gathered, full[:, :, pick])


def test_importance_is_head_averaged_attention_row():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 6, 1, 8)).astype(np.float32)
    k = rng.normal(size=(1, 2, 11, 8)).astype(np.float32)
    got = np.array(lz.last_token_importance(mx.array(q), mx.array(k), 0.3))
    rows = []
    for h in range(6):
        s = 0.3 * k[0, h // 3] @ q[0, h, 0]  # GQA: query head h reads KV head h // 3
        e = np.exp(s - s.max())
        rows.append(e / e.sum())
    np.testing.assert_allclose(got, np.mean(rows, axis=0), rtol=1e-5)
    assert abs(got.sum() - 1) < 1e-5


def test_schedule_layers_and_keeps():
    s = lz.LazySchedule(keep_start=0.6, keep_end=0.3, start=0.3, end=0.9, stages=4)
    assert s.stages_for(8) == pytest.approx({2: 0.6, 4: 0.5, 5: 0.4, 7: 0.3})
    stages16 = s.stages_for(16)
    assert list(stages16) == [5, 8, 11, 14]
    one = lz.LazySchedule(keep_start=0.9, keep_end=0.4, stages=1).stages_for(10)
    assert one == {3: 0.4}
    assert lz.keep_count(0.3, 10) == 3 and lz.keep_count(0.01, 10) == 1 and lz.keep_count(1.0, 7) == 7
    # the prefill's share of computed (token, layer) pairs: 2 full layers, then 6/5/4/3 of 10
    assert lz.computed_fraction(10, 8, s.stages_for(8)) == pytest.approx((20 + 6 + 6 + 5 + 4 + 4 + 3) / 80)
    assert lz.computed_fraction(10, 8, s.stages_for(8), recent=5) == pytest.approx((20 + 6 + 6 + 5 + 5 + 5 + 5) / 80)


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep_start=0.0), "outside"),
    (dict(keep_start=1.5), "outside"),
    (dict(keep_end=-0.2), "outside"),
    (dict(keep_start=0.3, keep_end=0.5), "must not grow"),
    (dict(start=0.9, end=0.3), "pruning range"),
    (dict(stages=0), "positive"),
    (dict(recent=-1), "non-negative"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(lz.ScheduleError, match=match) as info:
        lz.LazySchedule(**kwargs)
    assert isinstance(info.value, MlxeffError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_more_stages_than_layers(model):
    with pytest.raises(lz.ScheduleError, match="9 stages but the model has only 8 layers"):
        lz.lazy_hooks(lz.LazySchedule(stages=9), num_layers=8)
    with pytest.raises(lz.ScheduleError, match="do not fit"):
        lz.LazySchedule(stages=7).stages_for(8)  # layers 2..7 hold only 6
    with pytest.raises(ValueError):
        lz.LazyPrefill(lz.LazySchedule(stages=9)).make_cache(model)


# ---- pruned runs against an independent dense reference ---------------------------------------

def run_lazy(model, prompt, schedule, feed, step=512):
    """Prefill, then decode the tokens ``feed`` (teacher forcing). Returns the logits of every
    step, the cache, and per layer the number of entries present after each step."""
    cache = lz.LazyPrefill(schedule).make_cache(model)
    logits = [lz.lazy_prefill(model, prompt, cache, step)]
    marks = [[c.offset for c in cache]]
    for t in feed:
        logits.append(lz.lazy_decode(model, mx.array([t]), cache))
        marks.append([c.offset for c in cache])
    return logits, cache, marks


def dense_reference(model, tokens, cache, marks):
    """Every token through every block, with per-layer masks reproducing what the lazy run let
    each row see: row i at layer l sees token j iff both were computed in layer l, j at the same
    step as i or earlier, and position j <= position i. Rows that layer l never computed see their
    causal past (finite values nobody reads). Captures queries and keys for the importance check."""
    L = len(model.layers)
    n = len(tokens)
    captured = []

    def capture(queries, keys, values, *, scale, mask, cache=None):
        captured.append((queries, keys))
        return default_attention(queries, keys, values, scale=scale, mask=mask, cache=cache)

    h = model.transformer.token_embeddings(mx.array(tokens)[None])
    causal = np.tril(np.ones((n, n), bool))
    model.set_attention(capture)
    try:
        for l, layer in enumerate(model.layers):
            pos = np.array(cache[l].positions)
            time = np.full(n, -1)
            for step in range(len(marks)):
                lo = 0 if step == 0 else marks[step - 1][l]
                time[pos[lo:marks[step][l]]] = step
            present = time >= 0
            mask = causal & present[None, :] & (time[None, :] <= time[:, None])
            mask = np.where(present[:, None], mask, causal)
            h = layer(h, mx.array(mask), cache=None)
    finally:
        model.set_attention(None)
    assert L == len(captured)
    return model.logits(model.transformer.norm(h))[0], captured


@pytest.mark.parametrize("schedule,step", [
    (AGGRESSIVE, 512),
    (AGGRESSIVE, 16),  # stages in chunks
    (lz.LazySchedule(keep_start=0.7, keep_end=0.4, stages=2, recent=8), 512),
    (lz.LazySchedule(keep_start=0.5, keep_end=0.2, stages=3, recent=30), 32),
])
def test_pruned_prefill_and_decode_equal_dense_reference(model, schedule, step):
    N, T = 120, 6
    prompt = prompt_ids(N, seed=2)
    feed = [int(x) for x in prompt_ids(T, seed=9)]
    logits, cache, marks = run_lazy(model, prompt, schedule, feed, step)
    tokens = [int(x) for x in prompt] + feed
    ref, captured = dense_reference(model, tokens, cache, marks)
    for step, got in enumerate(logits):
        np.testing.assert_allclose(np.array(got[0]), np.array(ref[N - 1 + step]), atol=2e-4, rtol=2e-4)
    # The prefill's selection is the top-k of the last token's head-averaged attention, computed
    # here from the reference's own queries and keys of the previous layer.
    stages = cache.stages
    prefill_sets = [np.array(cache[l].positions[: marks[0][l]]) for l in range(len(cache))]
    for l in stages:
        active = prefill_sets[l - 1]
        q, k = captured[l - 1]
        imp = np.array(lz.last_token_importance(q[:, :, N - 1:N], k[:, :, mx.array(active)], model.layers[l - 1].attn.scale))
        recent = max(1, schedule.recent)
        imp[active >= N - recent] = np.inf
        keep = min(max(lz.keep_count(stages[l], N), recent), active.size)
        expected = np.sort(active[np.argsort(-imp)[:keep]])
        assert np.array_equal(np.sort(prefill_sets[l]), expected)
    assert cache.revived > 0  # the decode steps did revive pruned tokens


def test_prefill_stage_boundaries_are_the_layers_that_prune():
    # keep ratios are fractions of the whole prompt; a layer keeping every active row is no boundary
    assert lz._prefill_keeps({6: 1.0, 10: 0.967, 15: 0.933, 19: 0.9}, 2048, 32) == \
        {10: 1981, 15: 1911, 19: 1844}
    assert lz._prefill_keeps({2: 0.5, 5: 0.35, 7: 0.2}, 120, 1) == {2: 60, 5: 42, 7: 24}
    assert lz._prefill_keeps({2: 0.5, 5: 0.35, 7: 0.2}, 120, 50) == {2: 60, 5: 50}
    assert lz._prefill_keeps({3: 1.0, 5: 1.0}, 100, 1) == {}


def test_prefill_selection_stays_on_the_device_until_decoding_reads_it(model):
    """The prefill reads no selection back: the pruned layers' positions and the Aux Cache's
    positions are still device arrays when it returns; reading them gives the nested sets."""
    N = 90
    cache = lz.LazyPrefill(AGGRESSIVE).make_cache(model)
    mx.eval(lz.lazy_prefill(model, prompt_ids(N, seed=6), cache, step_size=32))
    first = min(cache.stages)
    assert all(cache[l]._pending for l in range(first, len(cache)))
    assert not any(cache[l]._pending for l in range(first))
    assert all(not isinstance(a._positions, np.ndarray) for a in cache.aux if a is not None)
    sets = [set(np.array(c.positions).tolist()) for c in cache]
    assert all(b <= a for a, b in zip(sets, sets[1:])) and len(sets[-1]) < N
    for l, a in enumerate(cache.aux):
        if a is not None:
            assert set(a.positions.tolist()) == sets[l - 1] - sets[l]


@pytest.mark.parametrize("schedule", [AGGRESSIVE, lz.LazySchedule(0.6, 0.2, stages=4, recent=16)])
def test_invariants(model, schedule):
    N = 100
    prompt = prompt_ids(N, seed=4)
    feed = [int(x) for x in prompt_ids(8, seed=5)]
    logits, cache, marks = run_lazy(model, prompt, schedule, feed)
    L = len(cache)
    # after prefill: the active set shrinks with depth and matches the schedule's arithmetic
    prefill_counts = marks[0]
    assert all(a >= b for a, b in zip(prefill_counts, prefill_counts[1:]))
    assert prefill_counts[-1] < N
    fraction = lz.computed_fraction(N, L, cache.stages, cache.schedule.recent)
    assert sum(prefill_counts) == pytest.approx(fraction * N * L)
    sets = [np.array(c.positions) for c in cache]
    depth = cache.depth
    for l in range(L):
        assert len(np.unique(sets[l])) == sets[l].size  # no token computed twice in a layer
        if l + 1 < L:
            assert set(sets[l + 1]) <= set(sets[l])  # nested: shrinks with depth
        assert set(sets[l]) == set(np.flatnonzero(depth > l))
        aux = cache.aux[l]
        if aux is not None:  # the Aux Cache holds exactly the tokens whose next layer is l
            assert set(aux.positions) == set(np.flatnonzero(depth == l))
            assert aux.hidden.shape[1] == aux.positions.size
    assert all(cache.aux[l] is None or l in cache.stages for l in range(L))
    assert depth[N - 1] == L and np.all(depth[N:] == L)  # last prompt token and generated ones
    assert np.all(depth[N - schedule.recent:N] == L)  # the recent window is never pruned
    stats = cache.stats()
    assert 0 < stats["percent_computed"] <= 100
    prompt_entries = sum(int(np.count_nonzero(s < N)) for s in sets)
    assert stats["percent_computed"] == pytest.approx(100 * prompt_entries / (N * L))
    assert stats["aux_tokens"] == int(np.count_nonzero(depth < L))


def test_generate_with_lazy_hooks(model):
    """Through the engine: tokens come out, the cache reports what was computed."""
    prompt = prompt_ids(90, seed=6)
    hooks = lz.lazy_hooks(AGGRESSIVE, num_layers=len(model.layers))
    cache = hooks["prefill"].make_cache(model)
    out = [t for t, _ in generate_step(prompt, model, max_tokens=5, prompt_cache=cache, **hooks)]
    assert len(out) == 5 and all(0 <= t < VOCAB for t in out)
    assert cache.next_position == 90 + 5  # one token is computed ahead by the engine
    assert 0 < cache.percent_computed() < 100


def test_plain_decode_strategy_fallback(model):
    """LazyDecode on a plain KV cache behaves as the default decode strategy."""
    prompt = prompt_ids(20)
    c1, c2 = model.make_cache(), model.make_cache()
    ChunkedPrefill()(model, prompt, c1)
    ChunkedPrefill()(model, prompt, c2)
    tok = mx.array([3])
    assert mx.array_equal(lz.LazyDecode()(model, tok, c1), DecodeStrategy()(model, tok, c2))


def test_prefill_needs_lazy_cache(model):
    with pytest.raises(MlxeffError, match="LazyCache"):
        lz.LazyPrefill()(model, prompt_ids(5), model.make_cache())


# ---- command line ------------------------------------------------------------------------------

def invoke(*args):
    """The CLI in-process (typer's runner): exit code, stdout, stderr."""
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_cli_lazy(saved_dir):
    import json

    path, _ = saved_dir  # a 4-layer model: pruning layers 1..3
    prompt = "Once upon a time there was a little girl who lived in a village near the forest."
    base = ["generate", prompt, "--model", path, "--max-tokens", 6, "--json"]
    runs = [invoke(*base, *extra) for extra in (
        [], ["--lazy-keep", 1, 1],
        ["--lazy-keep", 0.8, 0.5, "--lazy-range", 0.3, 0.9, "--lazy-stages", 2],
        ["--lazy"],  # 4 stages do not fit in 4 layers: as many as fit (3)
        ["--lazy-recent", 0, "--lazy-keep", 0.5, 0.2],
    )]
    for code, out, err in runs:
        assert code == 0, err
    texts = [json.loads(out)["text"] for _, out, _ in runs]
    assert texts[1] == texts[0]  # keep ratio 1.0 generates exactly what plain generation does
    assert all(json.loads(out)["generation_tokens"] >= 1 for _, out, _ in runs)


@pytest.mark.parametrize("args,needle", [
    (["--lazy-keep", 0, 0.5], "keep ratio keep_start=0.0 is outside (0, 1]"),
    (["--lazy-keep", 0.5, 1.2], "keep ratio keep_end=1.2 is outside (0, 1]"),
    (["--lazy-stages", 9], "9 stages but the model has only 4 layers"),
    (["--lazy-stages", 4], "4 stages do not fit in layers 1..3"),
    (["--lazy-range", 0.9, 0.2], "pruning range 0.9..0.2"),
    (["--lazy-recent", -3], "recent must be a non-negative integer, got -3"),
])
def test_cli_lazy_bad_input(saved_dir, args, needle):
    path, _ = saved_dir
    code, out, err = invoke("generate", "Once upon a time", "--model", path, *args)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"error: --lazy: {err.split('error: --lazy: ')[-1].strip()}"]
    assert needle in err


def test_cli_lazy_error_is_one_line_in_a_real_process(saved_dir):
    import subprocess
    import sys

    path, _ = saved_dir
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    proc = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "generate", "x", "--model", str(path),
                           "--lazy-keep", "1.5", "0.5"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # One error line, last (loading the tokenizer may log a transformers notice before it).
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --lazy: keep ratio keep_start=1.5 is outside (0, 1]"], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]


def test_clone_decodes_independently(model):
    prompt = prompt_ids(80, seed=7)

    def prefilled():
        cache = lz.LazyPrefill(AGGRESSIVE).make_cache(model)
        mx.eval(lz.lazy_prefill(model, prompt, cache))
        return cache

    cache = prefilled()
    twin = cache.clone()
    other = [lz.lazy_decode(model, mx.array([t]), twin) for t in (9, 9, 9, 9)]
    mx.eval(other)
    got = [lz.lazy_decode(model, mx.array([t]), cache) for t in (5, 6, 7)]
    fresh = prefilled()
    want = [lz.lazy_decode(model, mx.array([t]), fresh) for t in (5, 6, 7)]
    assert all(mx.array_equal(x, y) for x, y in zip(got, want))
    assert cache.next_position == 83 and twin.next_position == 84
    assert cache.revived == fresh.revived


def test_layer_cache_in_place_view_equals_its_slices():
    # The GPU path reads the whole K/V buffers with slot positions (unfilled slots: UNFILLED); it
    # must attend over exactly what the slices returned by update_and_fetch() hold, revived tokens
    # included.
    from mlxeff.cache import UNFILLED
    from mlxeff.techniques.lazyllm_cache import LazyLayerCache

    rng = np.random.default_rng(0)
    cache = LazyLayerCache()
    chunks = [np.arange(0, 200), np.arange(300, 301), np.array([250, 210, 240]), np.arange(301, 371)]
    for pos in chunks:  # out of position order, across mlx-lm's 256-slot growth
        k = mx.array(rng.normal(size=(1, 2, len(pos), 32)).astype(np.float32))
        v = mx.array(rng.normal(size=(1, 2, len(pos), 32)).astype(np.float32))
        keys, values = cache.update_and_fetch(k, v, positions=mx.array(pos))
    assert cache.keys.shape[2] > cache.offset == 274  # an unfilled tail
    assert np.array_equal(np.array(cache.positions), np.concatenate(chunks))
    k_all, v_all, index, kpos = cache.keys, cache.values, mx.arange(cache.offset), cache.slot_position_array()
    assert kpos.shape[0] == k_all.shape[2] and int(mx.min(kpos[cache.offset:])) == UNFILLED
    q = mx.array(rng.normal(size=(1, 4, 5, 32)).astype(np.float32))
    qpos = mx.array([199, 215, 245, 300, 370])
    want = pa.pruned_attention_reference(q, keys, values, mx.arange(cache.offset), scale=0.2,
                                         q_positions=qpos, k_positions=mx.array(cache.positions))
    got = pa.pruned_attention_reference(q, k_all, v_all, index, scale=0.2, q_positions=qpos, k_positions=kpos)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6)
    # a copy has buffers of its own
    copy = cache.copy()
    copy.update_and_fetch(k[:, :, :1], v[:, :, :1], positions=mx.array([400]))
    assert cache.offset == 274 and int(cache.slot_position_array()[274]) == UNFILLED
    assert int(copy.slot_position_array()[274]) == 400


def test_prefill_chunks_benchmark_variants_compute_the_same_prefills():
    """benchmarks/prefill_chunks.py: keep 1.0 is the plain prefill; chunk lengths and asynchronous
    evaluations change the schedule of the work, not its result."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prefill_chunks.py"
    spec = importlib.util.spec_from_file_location("prefill_chunks_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = make_model(layerwise_config(10, 64, 16, vocab_size=96, ffn_dim_divisor=32))
    prompt = mx.array(np.random.default_rng(1).integers(3, 90, 700).astype(np.int32))
    out = {k: fn() for k, fn in bench.cases(model, prompt).items()}
    import mlxeff.engine as engine

    mx.eval(list(out.values()))
    assert lz.mx is mx and engine.mx is mx  # the asynchronous variants put mx.eval back
    assert mx.array_equal(out["lazy keep 1.0"], out["plain 512"])
    assert mx.array_equal(out["plain 512 async"], out["plain 512"])
    assert mx.allclose(out["plain 2048"], out["plain 512"], atol=1e-4)
    assert mx.array_equal(out["lazy 1->0.9 async"], out["lazy 1->0.9"])
    for k in ("lazy 1->0.9 p2048", "lazy 1->0.9 p4096", "lazy 1->0.9 p4096 async"):
        assert mx.allclose(out[k], out["lazy 1->0.9"], atol=1e-4), k
    assert mx.allclose(out["lazy 0.8->0.5 p4096"], out["lazy 0.8->0.5"], atol=1e-4)
