"""RefreshKV: K >= context or S = 1 decodes exactly as plain decoding; partial steps equal a dense
reference masked to the recorded subsets (keys keep their original RoPE); the subset invariants
hold under every schedule, with drafters and after trims; StreamingLLM and H2O baselines; the
per-KV-head index of the pruned-attention kernel (reference, Metal body on the CPU, CUDA twin);
options and errors."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_model, use_metal_check
from mlxeff.cache import trim_cache
from mlxeff.engine import ChunkedPrefill, Draft, Drafter, generate_step
from mlxeff.models import layerwise_config
from mlxeff.models import pruned_attention as pa
from mlxeff.models.attention import attend
from mlxeff.techniques import refreshkv as rk
from mlxeff.techniques.prompt_lookup import PromptLookup
from mlxeff.techniques.refreshkv_baselines import H2ODecode, StreamingDecode
from mlxeff.techniques.registry import TechniqueError, build_hooks
from test_pruned_attention import _case, _cuda

VOCAB = 96


def rk_args():
    # 4 layers, head_dim 32 (the pruned-attention kernel's size on a GPU), 2 query heads per KV head,
    # 1..2 KV heads per layer (OpenELM's layer-wise widths).
    return layerwise_config(4, 128, 32, num_gqa_groups=2, vocab_size=VOCAB, ffn_dim_divisor=32)


@pytest.fixture(scope="module")
def model():
    return make_model(rk_args(), seed=5)


def prompt_ids(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.uint32))


def decode_run(model, prompt, decode=None, n=24, drafter=None):
    tokens, logprobs = [], []
    for t, lp in generate_step(prompt, model, max_tokens=n, decode=decode, drafter=drafter):
        tokens.append(t)
        logprobs.append(np.array(lp))
    return tokens, np.stack(logprobs)


def _openblas_loaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


# With OpenBLAS preloaded the same product can round differently inside different graphs
# (tests/test_lazyllm.py), so bit equality is checked with MLX's bundled BLAS.
exact = pytest.mark.skipif(_openblas_loaded(), reason="OpenBLAS preloaded: products are not "
                           "bit-reproducible across graphs; run without LD_PRELOAD")


# ---- selection ---------------------------------------------------------------------------------

def test_group_max_and_pool_match_numpy():
    rng = np.random.default_rng(0)
    s = rng.random((2, 6, 11)).astype(np.float32)
    g = np.array(rk.group_max(mx.array(s), 3))
    np.testing.assert_array_equal(g, s.reshape(2, 3, 2, 11).max(axis=2))
    for w in (1, 3, 7):
        pooled = np.array(rk.max_pool(mx.array(g), w))
        h = w // 2
        want = np.stack([g[..., max(0, i - h): i + h + 1].max(axis=-1) for i in range(11)], axis=-1)
        np.testing.assert_array_equal(pooled, want)


def test_pool_reach_extends_the_window_forward():
    """With ``reach`` r, slot j takes the maximum over slots j - h - r .. j + h: a high score
    also keeps the r slots after its centred window (where a copying head reads next)."""
    rng = np.random.default_rng(2)
    g = rng.random((2, 3, 17)).astype(np.float32)
    for w, r in ((1, 2), (3, 4), (7, 9)):
        pooled = np.array(rk.max_pool(mx.array(g), w, r))
        h = w // 2
        want = np.stack([g[..., max(0, i - h - r): i + h + 1].max(axis=-1) for i in range(17)], axis=-1)
        np.testing.assert_array_equal(pooled, want)
    np.testing.assert_array_equal(np.array(rk.max_pool(mx.array(g), 5, 0)),
                                  np.array(rk.max_pool(mx.array(g), 5)))


@pytest.mark.parametrize("reach", [0, 3, 6])
def test_selection_keeps_the_slots_after_a_peak(reach):
    s = np.full((1, 1, 60), 1e-3, np.float32)
    s[0, 0, 20] = 1.0  # one slot the step attended
    top = set(np.array(rk.select_top(mx.array(s), 16, 5, reach))[0, 0].tolist())
    assert set(range(18, 23 + reach)) <= top  # the centred window (20 +- 2) and reach slots after it


@pytest.mark.parametrize("pool,reach", [(1, 0), (5, 0), (5, 4)])
def test_select_top_keeps_newest_distinct_by_ascending_score(pool, reach):
    rng = np.random.default_rng(1)
    s = mx.array(rng.random((1, 3, 40)).astype(np.float32))
    top = np.array(rk.select_top(s, 9, pool, reach))
    pooled = np.array(rk.max_pool(s, pool, reach))
    assert top.shape == (1, 3, 9) and top.dtype == np.int32
    for row, p in zip(top[0], pooled[0]):
        assert len(set(row.tolist())) == 9 and row[-1] == 39  # the newest slot, ranked last
        kept = p[row[:-1]]
        assert np.all(np.diff(kept) >= 0)  # ascending score: column j is the j-th to leave
        others = np.setdiff1d(np.arange(39), row)
        assert kept.min() >= p[others].max()  # the highest (pooled) scores were kept


def test_ring_equals_evicting_lowest_score_then_oldest():
    """The closed form equals the rule it implements, step by step: each new token joins, the
    selected slot with the lowest score leaves; once those are gone, the oldest new token."""
    K, r = 5, 30  # selection made when slot r was decoded
    base = np.array([[[3, 17, 8, 25, r]]], np.int32)  # ascending score, the newest last
    subset = [(int(s), float(i)) for i, s in enumerate(base[0, 0])]  # (slot, rank)
    for current in range(r + 1, r + 3 * K + 2):
        subset.append((current, 1e9 + current))  # a new token outranks every selected slot
        subset.remove(min(subset, key=lambda e: e[1]))
        got = np.array(rk.ring_subset(mx.array(base), mx.array([r + 1]), mx.array([current])))[0, 0]
        assert sorted(got.tolist()) == sorted(s for s, _ in subset), current


# ---- exactness ----------------------------------------------------------------------------------

@exact
@pytest.mark.parametrize("config", [
    rk.RefreshConfig(k=1000),
    rk.RefreshConfig(k=1000, threshold=0.9, check_every=2),
    rk.RefreshConfig(k=1000, grow=True, pool=1),
    rk.RefreshConfig(k=4, every=1),
    rk.RefreshConfig(k=4, every=1, grow=True),
    rk.RefreshConfig(k=1000, every=6, reach=0),
    rk.RefreshConfig(k=1000, every=6, reach=40),
    rk.RefreshConfig(k=4, every=1, reach=40),
])
def test_k_at_least_context_or_every_step_is_plain_decoding(model, config):
    prompt = prompt_ids(70)
    plain = decode_run(model, prompt)
    dec = rk.RefreshDecode(config)
    got = decode_run(model, prompt, dec)
    assert got[0] == plain[0]
    np.testing.assert_array_equal(got[1], plain[1])  # bit-identical logits
    assert dec.stats["steps"] == 24


def masked_reference(subsets):
    """An attention function: layer caches listed in ``subsets`` (id -> (1, KVH, n) slots) attend
    only those slots through a dense boolean mask; the others attend everything."""
    def fn(q, k, v, *, scale, mask, cache=None, positions=None):
        index = subsets.get(id(cache))
        if index is not None:
            B, H, _, _ = q.shape
            KVH, S = k.shape[1], k.shape[2]
            sel = np.zeros((B, KVH, S), bool)
            idx = np.broadcast_to(np.array(index), (B, KVH, np.array(index).shape[-1]))
            for b in range(B):
                for h in range(KVH):
                    sel[b, h, idx[b, h]] = True
            mask = mx.array(np.repeat(sel, H // KVH, axis=1)[:, :, None, :])
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return fn


@pytest.mark.parametrize("config", [
    rk.RefreshConfig(k=12, every=6),
    rk.RefreshConfig(k=12, every=6, reach=0),
    rk.RefreshConfig(k=12, threshold=0.97, check_every=2),
    rk.RefreshConfig(k=10, every=8, grow=True, pool=1),
])
def test_partial_steps_equal_dense_attention_masked_to_the_subset(model, config):
    """Teacher-forced: every step of RefreshKV equals the plain model whose attention is masked to
    the slots RefreshKV attended. Both read the same cached keys, rotated once at their original
    positions, and rotate the query at its own: no key is moved or re-rotated."""
    prompt, follow = prompt_ids(60, seed=2), prompt_ids(20, seed=3)
    dec = rk.RefreshDecode(config)
    cache, ref_cache = model.make_cache(), model.make_cache()
    mx.eval(ChunkedPrefill(16)(model, prompt, cache), ChunkedPrefill(16)(model, prompt, ref_cache))
    partial = 0
    for t in range(follow.size):
        token = follow[t:t + 1]
        got = dec(model, token, cache)
        subsets = {id(c): u for c, u in zip(ref_cache, dec.used) if u is not None}
        partial += len(subsets)
        previous = model.set_attention(masked_reference(subsets))
        try:
            want = model(token[None], cache=ref_cache)[0]
        finally:
            model.set_attention(previous)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    assert partial > follow.size  # most layer steps were partial
    for c in cache:  # positions were never rewritten: slot i holds position i
        assert c.ordered and c.next_position == c.offset == prompt.size + follow.size


# ---- invariants ---------------------------------------------------------------------------------

class Checked(rk.RefreshDecode):
    """RefreshDecode that checks the subset invariants after every call."""

    def __call__(self, model, tokens, cache):
        slots = [c.offset for c in cache]
        out = super().__call__(model, tokens, cache)
        self.checked = getattr(self, "checked", 0)
        for l, used in enumerate(self.used):
            if used is None:
                continue
            rows = np.array(used).reshape(-1, np.array(used).shape[-1])
            newest = slots[l]  # the token of this call
            for row in rows:
                assert len(set(row.tolist())) == row.size  # never a slot twice
                assert newest in row  # always the newest token
                assert row.min() >= 0 and row.max() <= newest
                if not self.config.grow:
                    assert row.size == self.k
                else:
                    assert row.size == self.k + newest - self._start[l] + 1
            self.checked += 1
        return out


@pytest.mark.parametrize("config", [
    rk.RefreshConfig(k=8),
    rk.RefreshConfig(k=8, every=3, pool=1),
    rk.RefreshConfig(k=5, threshold=0.95),
    rk.RefreshConfig(k=8, every=4, grow=True),
    rk.RefreshConfig(k=3, every=40),  # more new tokens than K between refreshes: the oldest leave
])
def test_subset_invariants(model, config):
    dec = Checked(config)
    decode_run(model, prompt_ids(50, seed=4), dec, n=30)
    assert dec.checked > 20


def test_default_reach_covers_the_tokens_until_the_next_refresh():
    assert rk.RefreshConfig().forward == 9  # S - 1 partial steps after a refresh
    assert rk.RefreshConfig(every=4).forward == 3
    assert rk.RefreshConfig(threshold=0.5).forward == 4  # QC - 1: until the first check
    assert rk.RefreshConfig(threshold=0.5, check_every=8).forward == 7
    assert rk.RefreshConfig(grow=True, pool=1).forward == 0  # the first version: raw top-K
    assert rk.RefreshConfig(every=4, reach=0).forward == 0
    assert rk.RefreshConfig(reach=20).forward == 20


def test_selection_passes_reach(model, monkeypatch):
    seen = []
    real = rk.select_top
    monkeypatch.setattr(rk, "select_top", lambda s, k, pool=1, reach=0:
                        seen.append((pool, reach)) or real(s, k, pool, reach))
    decode_run(model, prompt_ids(50), rk.RefreshDecode(rk.RefreshConfig(k=6, every=3, pool=3)), n=5)
    decode_run(model, prompt_ids(50), rk.RefreshDecode(rk.RefreshConfig(k=6, every=3, reach=7)), n=5)
    assert (3, 2) in seen and (7, 7) in seen


def test_default_k_is_an_eighth_of_the_context(model):
    dec = rk.RefreshDecode()
    decode_run(model, prompt_ids(95), dec, n=3)
    assert dec.k == rk.default_k(96) == 12


def _full_steps(dec, model, prompt, n):
    """The decoding steps (0 = the first after the prefill) at which each layer ran a full step."""
    fulls, last = [], 0
    cache = model.make_cache()
    mx.eval(ChunkedPrefill(64)(model, prompt, cache))
    token = prompt[-1:]
    for step in range(n):
        logits = dec(model, token, cache)
        token = mx.argmax(logits[-1:], axis=-1).astype(mx.uint32)
        if dec.stats["full_layer_steps"] > last:
            fulls.append((step, dec.stats["full_layer_steps"] - last))
        last = dec.stats["full_layer_steps"]
    return fulls


def test_fixed_schedule_refreshes_every_s_tokens(model):
    dec = rk.RefreshDecode(rk.RefreshConfig(k=6, every=4))
    assert _full_steps(dec, model, prompt_ids(40), 13) == [(s, 4) for s in (0, 4, 8, 12)]


def test_dynamic_schedule_checks_every_qc_tokens(model):
    # threshold 1: a check is never "above" it, so every check refreshes every layer
    dec = rk.RefreshDecode(rk.RefreshConfig(k=6, threshold=1.0, check_every=3))
    assert _full_steps(dec, model, prompt_ids(40), 10) == [(s, 4) for s in (0, 3, 6, 9)]
    # a lower threshold refreshes some of those layers, and only at checks (this random model's
    # query similarities at the checks are 0.4-0.84)
    dec = rk.RefreshDecode(rk.RefreshConfig(k=6, threshold=0.75, check_every=3))
    fulls = _full_steps(dec, model, prompt_ids(40), 16)
    assert fulls[0] == (0, 4) and all(s % 3 == 0 for s, _ in fulls)
    assert 4 < dec.stats["full_layer_steps"] < 4 * 6


def test_trim_below_the_refresh_makes_the_next_step_full(model):
    dec = rk.RefreshDecode(rk.RefreshConfig(k=6, every=50))
    cache = model.make_cache()
    mx.eval(ChunkedPrefill(64)(model, prompt_ids(30), cache))
    for t in range(4):
        dec(model, prompt_ids(1, seed=t), cache)
    assert dec.stats["full_layer_steps"] == 4  # the first step only
    trim_cache(cache, 2)  # still after the refresh: the subset stays
    dec(model, prompt_ids(1, seed=9), cache)
    assert dec.stats["full_layer_steps"] == 4
    trim_cache(cache, 4)  # below the refreshed token: a full step again
    dec(model, prompt_ids(1, seed=10), cache)
    assert dec.stats["full_layer_steps"] == 8


def test_a_new_prefill_on_the_same_cache_makes_the_next_step_full(model):
    dec = rk.RefreshDecode(rk.RefreshConfig(k=6, every=50))
    cache = model.make_cache()
    mx.eval(ChunkedPrefill(64)(model, prompt_ids(30), cache))
    dec(model, prompt_ids(1), cache)
    dec(model, prompt_ids(1), cache)
    model(prompt_ids(9)[None], cache=cache)  # a chat turn appended to the same cache
    dec(model, prompt_ids(1), cache)
    assert dec.stats["full_layer_steps"] == 8


class Alternating(Drafter):
    """Drafts on every other call: the next tokens of a fixed random list (mostly rejected, so the
    engine trims the cache), nothing in between (a single-token step)."""

    max_draft = 3

    def __init__(self):
        self.calls = 0
        self.rng = np.random.default_rng(0)

    def propose(self, context, k):
        self.calls += 1
        if self.calls % 2:
            return Draft([])
        return Draft([int(t) for t in self.rng.integers(0, VOCAB, k)])


def test_with_a_drafter(model):
    prompt = prompt_ids(50, seed=6)
    plain = decode_run(model, prompt, n=20)[0]
    for drafter in (Alternating(), PromptLookup(2, 4)):
        big = decode_run(model, prompt, rk.RefreshDecode(rk.RefreshConfig(k=1000)), n=20,
                         drafter=drafter)[0]
        assert big == plain  # every step plain: drafting stays lossless
    dec = Checked(rk.RefreshConfig(k=8, every=5))
    tokens = decode_run(model, prompt, dec, n=40, drafter=Alternating())[0]
    assert len(tokens) == 40 and dec.checked > 20  # partial steps between drafted calls


def test_a_bounded_cache_is_refused(model):
    from mlxeff.errors import MlxeffError
    from mlxeff.server.window_cache import make_window_cache

    for dec, flag in ((rk.RefreshDecode(), "--refreshkv"), (StreamingDecode(8), "--streaming-llm"),
                      (H2ODecode(8), "--h2o")):
        cache = make_window_cache(model, 32)
        model(prompt_ids(20)[None], cache=cache)
        with pytest.raises(MlxeffError, match=f"{flag} needs a cache that keeps every token"):
            dec(model, prompt_ids(1), cache)


# ---- baselines ----------------------------------------------------------------------------------

@exact
def test_baselines_with_k_at_least_context_are_plain_decoding(model):
    prompt = prompt_ids(40)
    plain = decode_run(model, prompt)
    for dec in (StreamingDecode(100), H2ODecode(100)):
        got = decode_run(model, prompt, dec)
        assert got[0] == plain[0]
        np.testing.assert_array_equal(got[1], plain[1])


def test_streaming_llm_attends_sinks_and_recent_window(model):
    dec = StreamingDecode(10, sinks=4)
    cache = model.make_cache()
    mx.eval(ChunkedPrefill(64)(model, prompt_ids(30), cache))
    for t in range(3):
        o = cache[0].offset
        dec(model, prompt_ids(1, seed=t), cache)
        assert np.array(dec.used).tolist() == [0, 1, 2, 3] + list(range(o - 5, o + 1))
    assert StreamingDecode(10).window(8) is None  # 9 tokens: everything


def test_h2o_heavy_hitters_and_recent_window(model):
    dec = H2ODecode(10, recent=4)
    cache = model.make_cache()
    mx.eval(ChunkedPrefill(64)(model, prompt_ids(30), cache))
    for t in range(12):
        o = cache[0].offset
        dec(model, prompt_ids(1, seed=t), cache)
        for l, used in enumerate(dec.used):
            if t == 0:
                assert used is None  # the first step attends everything
                continue
            rows = np.array(used).reshape(-1, 10)
            for row in rows:
                assert len(set(row.tolist())) == 10
                assert row[-4:].tolist() == list(range(o - 3, o + 1))  # the recent window
                assert row[:6].max() < o - 3  # heavy hitters come from before it
            assert dec.acc[l].shape[-1] == o + 1


def test_h2o_eviction_rule():
    dec = H2ODecode(4, recent=2)
    dec.k, dec.recent = 4, 2
    # slots 0..5 accumulated; heavy hitters {1, 3}; the token at slot 5 was just decoded, so slot 4
    # leaves the window [4, 5] when slot 6 comes
    acc = mx.array([[[0.5, 0.2, 0.1, 0.9, 0.3, 0.0]]])
    dec.heavy = [mx.array([[[1, 3]]], dtype=mx.int32)]
    assert np.array(dec._evict(0, acc, 5)).tolist() == [[[4, 3]]]  # 0.3 beats the weakest, 0.2
    acc = mx.array([[[0.5, 0.2, 0.1, 0.9, 0.1, 0.0]]])
    assert np.array(dec._evict(0, acc, 5)).tolist() == [[[1, 3]]]  # 0.1 does not
    dec.heavy = [None]  # the first time: the best two outside the next window [5, 6]
    assert sorted(np.array(dec._evict(0, acc, 5))[0, 0].tolist()) == [0, 3]


# ---- registry, command line, errors ---------------------------------------------------------

@pytest.mark.parametrize("kw,needle", [
    (dict(k=0), "--refreshkv-k must be at least 1, got 0"),
    (dict(every=0), "--refreshkv-every must be at least 1, got 0"),
    (dict(threshold=0.0), "--refreshkv-threshold must be in (0, 1], got 0.0"),
    (dict(threshold=1.5), "--refreshkv-threshold must be in (0, 1], got 1.5"),
    (dict(every=5, threshold=0.9), "exclude each other"),
    (dict(check_every=3), "--refreshkv-check-every needs --refreshkv-threshold"),
    (dict(pool=4), "--refreshkv-pool must be an odd number >= 1, got 4"),
    (dict(reach=-1), "--refreshkv-reach must be at least 0, got -1"),
])
def test_config_errors(kw, needle):
    with pytest.raises(rk.RefreshError) as e:
        rk.RefreshConfig(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_registry_builds_and_composes(model):
    hooks = build_hooks(model, {"refreshkv": {"k": 16, "threshold": 0.9}, "lookup": {}})
    assert isinstance(hooks["decode"], rk.RefreshDecode) and hooks["decode"].config.dynamic
    assert hooks["decode"].config.stride == 5 and "drafter" in hooks
    assert build_hooks(model, {"refreshkv": {}})["decode"].config.stride == 10
    for other in ("lazy", "streaming-llm", "h2o"):
        with pytest.raises(TechniqueError, match="both replace the decode"):
            build_hooks(model, {"refreshkv": {}, other: {}})
    with pytest.raises(TechniqueError, match="exclude each other"):
        build_hooks(model, {"refreshkv": {"every": 3, "threshold": 0.5}})


def invoke(*args):
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_cli_refreshkv(saved_dir):
    path, _ = saved_dir
    prompt = "Once upon a time there was a little girl who lived in a village near the forest."
    base = ["generate", prompt, "--model", path, "--max-tokens", 8, "--json"]
    runs = [invoke(*base, *extra) for extra in (
        [], ["--refreshkv-k", 10000], ["--refreshkv"], ["--refreshkv-k", 4, "--refreshkv-every", 2],
        ["--refreshkv-threshold", 0.9, "--refreshkv-check-every", 2, "--refreshkv-k", 4],
        ["--refreshkv-grow", "--refreshkv-pool", 1, "--refreshkv-k", 4],
        ["--refreshkv-k", 4, "--refreshkv-reach", 0],
        ["--streaming-llm-k", 8], ["--h2o-k", 8], ["--refreshkv-k", 4, "--lookup"],
    )]
    for code, out, err in runs:
        assert code == 0, err
    texts = [json.loads(out)["text"] for _, out, _ in runs]
    assert texts[1] == texts[0]  # K beyond the context: plain decoding
    assert json.loads(runs[2][1])["techniques"] == {"refreshkv": {}}


@pytest.mark.parametrize("args,line", [
    (["--refreshkv-k", 0], "error: --refreshkv-k must be at least 1, got 0"),
    (["--refreshkv-every", 0], "error: --refreshkv-every must be at least 1, got 0"),
    (["--refreshkv-threshold", 0], "error: --refreshkv-threshold must be in (0, 1], got 0.0"),
    (["--refreshkv-threshold", 1.2], "error: --refreshkv-threshold must be in (0, 1], got 1.2"),
    (["--refreshkv-every", 4, "--refreshkv-threshold", 0.5],
     "error: --refreshkv-every (fixed schedule) and --refreshkv-threshold (dynamic schedule) "
     "exclude each other; give one"),
    (["--refreshkv", "--lazy"], "error: --lazy and --refreshkv both replace the decode; choose one"),
    (["--h2o-k", 0], "error: --h2o-k must be at least 1, got 0"),
])
def test_cli_bad_input_is_one_line(saved_dir, args, line):
    path, _ = saved_dir
    code, out, err = invoke("generate", "Once upon a time", "--model", path, *args)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [line]


# ---- the per-KV-head index of the pruned-attention kernel ----------------------------------

def _per_head(B, KVH, S, n, seed=0, leading=None):
    rng = np.random.default_rng(seed)
    rows = leading or B
    return mx.array(np.stack([[rng.permutation(S)[:n] for _ in range(KVH)]
                              for _ in range(rows)]).astype(np.int32))


def _dense_per_head(q, k, v, idx, scale, qpos=None, kpos=None):
    B, H, Lq, _ = q.shape
    KVH, S = k.shape[1], k.shape[2]
    I = np.broadcast_to(np.array(idx), (B, KVH, np.array(idx).shape[-1]))
    sel = np.zeros((B, KVH, S), bool)
    for b in range(B):
        for h in range(KVH):
            sel[b, h, I[b, h]] = True
    mask = np.repeat(sel, H // KVH, axis=1)[:, :, None, :]
    if qpos is not None:
        mask = mask & (np.array(kpos)[:, None, None, :] <= np.array(qpos)[:, None, :, None])
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mx.array(mask))


@pytest.mark.parametrize("shape", [
    dict(B=1, H=4, KVH=2, Lq=1, S=64, n=16),
    dict(B=2, H=8, KVH=2, Lq=1, S=96, n=40),
    dict(B=2, H=12, KVH=3, Lq=3, S=80, n=33, D=32),
])
@pytest.mark.parametrize("leading", [None, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_per_head_equals_dense_with_mask(shape, leading, causal):
    q, k, v, _, qpos, kpos = _case(**shape)
    idx = _per_head(shape["B"], shape["KVH"], shape["S"], shape["n"], leading=leading)
    kw = dict(q_positions=qpos, k_positions=kpos) if causal else {}
    ref = pa.pruned_attention_reference(q, k, v, idx, scale=0.2, **kw)
    dense = _dense_per_head(q, k, v, idx, 0.2, *((qpos, kpos) if causal else ()))
    np.testing.assert_allclose(np.array(ref), np.array(dense), rtol=1e-5, atol=1e-5)
    # one row for every head is the (n,) index's answer
    same = mx.broadcast_to(idx[:1, :1], (1, shape["KVH"], shape["n"]))
    np.testing.assert_allclose(np.array(pa.pruned_attention_reference(q, k, v, same, scale=0.2, **kw)),
                               np.array(pa.pruned_attention_reference(q, k, v, idx[0, 0], scale=0.2, **kw)),
                               rtol=1e-6, atol=1e-6)


def test_per_head_index_bad_shape():
    q, k, v, _, _, _ = _case(B=2, H=8, KVH=2, S=50, n=10)
    with pytest.raises(ValueError, match="per-head index"):
        pa.pruned_attention_reference(q, k, v, _per_head(2, 3, 50, 10), scale=1.0)
    with pytest.raises(ValueError, match="per-head index"):
        pa.pruned_attention_reference(q, k, v, _per_head(3, 2, 50, 10), scale=1.0)


@pytest.mark.parametrize("case,n_splits,leading", [
    (dict(B=1, H=8, KVH=2, Lq=1, S=96, n=40), 1, None),
    (dict(B=1, H=8, KVH=2, Lq=1, S=96, n=40), 3, None),
    (dict(B=2, H=8, KVH=2, Lq=1, S=96, n=40), 2, 1),  # one row per KV head for the whole batch
    (dict(B=2, H=6, KVH=3, Lq=3, S=80, n=37, D=32), 2, None),
    (dict(B=1, H=20, KVH=5, Lq=1, S=200, n=50, D=128), None, None),
])
@pytest.mark.parametrize("causal", [False, True])
def test_metal_body_per_head_equals_reference(case, n_splits, leading, causal):
    use_metal_check()
    q, k, v, _, qpos, kpos = _case(**case)
    idx = _per_head(case["B"], case["KVH"], case["S"], case["n"], seed=3, leading=leading)
    kw = dict(q_positions=qpos, k_positions=kpos) if causal else {}
    scale = q.shape[-1] ** -0.5
    ref = pa.pruned_attention_reference(q, k, v, idx, scale=scale, **kw)
    got = pa.pruned_attention_metal_check(q, k, v, idx, scale=scale, n_splits=n_splits, **kw)
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=2e-6)


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("case,n_splits,leading", [
    (dict(B=1, H=24, KVH=6, Lq=1, S=4096, n=512, D=128), None, 1),  # OpenELM-3B's widest layer
    (dict(B=1, H=12, KVH=3, Lq=1, S=2048, n=256, D=128), 1, 1),
    (dict(B=2, H=8, KVH=2, Lq=1, S=512, n=130, D=64), 5, None),
    (dict(B=3, H=6, KVH=3, Lq=4, S=300, n=77, D=32), None, None),
])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_per_head_equals_reference(dtype, case, n_splits, leading, causal):
    with mx.stream(mx.gpu):
        q, k, v, _, qpos, kpos = _case(dtype=dtype, **case)
        idx = _per_head(case["B"], case["KVH"], case["S"], case["n"], seed=4, leading=leading)
        kw = dict(q_positions=qpos, k_positions=kpos) if causal else {}
        scale = q.shape[-1] ** -0.5
        ref = pa.pruned_attention_reference(q, k, v, idx, scale=scale, **kw).astype(mx.float32)
        got = pa.pruned_attention_kernel(q, k, v, idx, scale=scale, n_splits=n_splits, **kw)
        tol = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 2e-2}[dtype]
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(ref), atol=tol, rtol=tol)


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend and an NVIDIA GPU")
def test_cuda_refreshkv_partial_steps_equal_masked_reference():
    """On the GPU, RefreshKV's partial steps run the kernel over the per-head subsets (the model
    in float32, TF32 off by conftest)."""
    with mx.stream(mx.gpu):
        m = make_model(rk_args(), seed=5)
        test_partial_steps_equal_dense_attention_masked_to_the_subset(m, rk.RefreshConfig(k=12, every=6))


class _Cache:
    """What attend() reads from a cache: the buffers, the tap and the slot count."""

    def __init__(self, k, v, index=None):
        self.keys, self.values, self.offset = k, v, k.shape[2]
        self.attend_index, self.want_scores, self.scores = index, False, None
        self.next_position = self.offset


def test_attend_with_a_per_head_subset_and_its_scores():
    q, k, v, _, _, _ = _case(B=1, H=8, KVH=2, Lq=1, S=64, n=10, D=32)
    idx = _per_head(1, 2, 64, 10, seed=5)
    cache = _Cache(k, v, idx)
    cache.want_scores = True
    out = attend(q, k, v, scale=0.3, mask=None, cache=cache)
    np.testing.assert_allclose(np.array(out), np.array(_dense_per_head(q, k, v, idx, 0.3)), rtol=1e-5,
                               atol=1e-5)
    # the weights over the listed slots, in the index's order: query head h reads KV head h // 4
    s = np.array(cache.scores)
    assert s.shape == (1, 8, 10)
    qn, kn = np.array(q), np.array(k)
    for h in range(8):
        logits = 0.3 * kn[0, h // 4, np.array(idx)[0, h // 4]] @ qn[0, h, 0]
        want = np.exp(logits - logits.max())
        np.testing.assert_allclose(s[0, h], want / want.sum(), rtol=1e-5, atol=1e-6)
    # a callable index sees the layer's queries and chooses
    seen = []
    cache = _Cache(k, v, lambda queries: seen.append(queries.shape) or idx)
    np.testing.assert_allclose(np.array(attend(q, k, v, scale=0.3, mask=None, cache=cache)), np.array(out),
                               rtol=1e-6, atol=1e-6)
    assert seen == [(1, 8, 1, 32)]
    cache = _Cache(k, v, lambda queries: None)  # None: every slot
    np.testing.assert_allclose(np.array(attend(q, k, v, scale=0.3, mask=None, cache=cache)),
                               np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3)),
                               rtol=1e-6, atol=1e-6)


# ---- the benchmark -------------------------------------------------------------------------

def _benchmark_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "refreshkv.py"
    spec = importlib.util.spec_from_file_location("refreshkv_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_speed_runs(capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    bench = _benchmark_module()
    bench.main(["speed", "--shapes", "default", "--contexts", "160", "--steps", "5", "--trials", "1",
                "--every", "2", "--dynamic", "--json"])
    res = json.loads(capsys.readouterr().out)
    (run,) = res["runs"]
    assert run["context"] == 160 and run["k"] == 20
    assert set(run["tok_per_s"]) == {"plain", "refreshkv", "refreshkv_dynamic"}
    assert all(v > 0 for v in run["tok_per_s"].values())
    assert 0 < run["full_layer_step_fraction"]["refreshkv"] < 1
    att = run["attention"]
    assert all(att[m] > 0 for m in ("plain", "partial", "full", "select", "refreshkv_amortised"))


def test_benchmark_quality_runs(capsys, monkeypatch, saved_dir):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "eval" / "nq-open-oracle.jsonl.gz").exists():
        pytest.skip("shared/data is not here")
    monkeypatch.delenv("OUT", raising=False)
    path, _ = saved_dir
    bench = _benchmark_module()
    bench.main(["quality", "--model", str(path), "--context", "96", "--items", "2", "--passages", "2",
                "--answer-tokens", "2", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["k"] == 12 and res["context"] == 96
    names = {"full", "refreshkv", "refreshkv_dynamic", "streaming_llm", "h2o"}
    for task in ("kv_retrieval", "multidoc_qa"):
        r = res["tasks"][task]
        assert names <= set(r) and all(r[n]["n"] == 2 and 0 <= r[n]["accuracy"] <= 1 for n in names)
    ppl = res["tasks"]["book_tail_perplexity"]
    assert set(ppl) == names and ppl["full"]["tokens_per_passage"] == 48
    assert all(v["ci95"][0] <= v["perplexity"] <= v["ci95"][1] for v in ppl.values())
    assert "ratio_to_full" in ppl["refreshkv"] and "ratio_to_full" not in ppl["full"]


def test_benchmark_project_tasks(monkeypatch, tmp_path):
    from test_tasks import write_corpus

    from mlxeff.io import load_tokenizer, resolve_model_dir

    bench = _benchmark_module()
    monkeypatch.setattr(bench, "DATA", tmp_path)
    monkeypatch.setenv("MLXEFF_CACHE_DIR", str(tmp_path / "cache"))
    write_corpus(tmp_path / "gutenberg-children")
    tokenizer = load_tokenizer(resolve_model_dir(None))
    tasks = bench.project_items(tokenizer, 1400, 2, pairs=20, docs=3)
    assert set(tasks) == {"kv_retrieval", "multidoc_qa"}
    for items in tasks.values():
        assert len(items) == 2
        for it in items:
            assert len(it["prompt"]) <= 1400 and tokenizer.decode(it["prompt"]).endswith(("Answer:", "value:"))
            # the answer budget is the task's: a quoted 8-hex-digit value takes more than 8 tokens
            assert it["max_tokens"] >= len(tokenizer.encode(' "' + it["answers"][0] + '"'))
    with pytest.raises(SystemExit, match="more than --context"):
        bench.project_items(tokenizer, 300, 1, pairs=20, docs=3)


def test_benchmark_task_prompts_fit_the_context():
    from mlxeff.io import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(None))  # the embedded model's (it has digits)
    bench = _benchmark_module()
    for item in bench.kv_retrieval_items(tokenizer, 200, 3, seed=1):
        assert len(item["prompt"]) <= 200 and item["answers"][0].isdigit()
        text = tokenizer.decode(item["prompt"])
        key = text.rsplit("key ", 1)[1].split(":")[0]
        assert f"key {key}: value {item['answers'][0]}." in text  # the asked key is in the context
    assert bench.wilson(0, 10)[0] == 0 and 0 < bench.wilson(5, 10)[0] < 0.5 < bench.wilson(5, 10)[1] < 1
