"""Superposition prompting: one document is the classical prompt; the batched paths equal the
single fork-join pass; positions follow the equilibrium rule; pruned paths are never attended;
path caching (memory and directory) reuses exact results; bad input fails in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_model, make_tokenizer, tiny_args
from mlxeff.cache import PositionedKVCache
from mlxeff.errors import MlxeffError
from mlxeff.generate import ChunkedPrefill, generate_step
from mlxeff.techniques import superposition as sp
from mlxeff.techniques import superposition_graph as g
from mlxeff.techniques.prompt_lookup import PromptLookup
from mlxeff.techniques.superposition_cache import PathCache, SegmentKV, fill
from mlxeff.techniques.superposition_flops import PromptShape, naive_flops, superposition_flops
from mlxeff.techniques.superposition_paths import run_queries, run_single_pass

DOCS = [
    "Once upon a time there was a little girl who lived in a village near the forest.",
    "Whenever she went out, the little girl wore a red riding cloak.",
    "Everyone in the village called her Little Red Riding Hood.",
    "One morning she asked her mother if she could go to visit her grandmother.",
    "It had been a while since they had seen each other.",
]
QUESTION = "What did the little girl wear?"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    # GQA (2 query heads per KV head) so that the grouped attention paths are exercised
    return make_model(tiny_args(vocab_size=len(tok), num_gqa_groups=2), seed=5)


def prefill(tok, docs, **config):
    return sp.SuperpositionPrefill(tok, docs, config=sp.SuperpositionConfig(**config))


def run(model, tok, docs, question=QUESTION, hook=None, **config):
    hook = hook or prefill(tok, docs, **config)
    cache = hook.make_cache(model)
    logits = hook(model, mx.array(tok.encode(question), dtype=mx.uint32), cache)
    return logits, cache, hook


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.array(a, dtype=np.float32), np.array(b, dtype=np.float32), atol=atol, rtol=0)


# ---- positions and the graph (pure) -----------------------------------------------------------

def test_equilibrium_paths_span_the_same_range_and_queries_share_positions():
    lengths = [7, 3, 12, 5]
    lay = g.layout("equilibrium", 6, lengths, 4, 2)
    H = g.harmonic_mean(lengths)
    assert H == Fraction(4) / (Fraction(1, 7) + Fraction(1, 3) + Fraction(1, 12) + Fraction(1, 5))
    for n, p in zip(lengths, lay.documents):
        spacing = float(H) / n
        assert p[0] == 6.0 and len(p) == n
        np.testing.assert_allclose(np.diff(p), spacing)
        assert p[-1] + spacing == pytest.approx(6 + float(H), abs=1e-12)  # every path ends at P + H
    np.testing.assert_allclose(lay.query, 6 + float(H) + np.arange(4))
    np.testing.assert_allclose(lay.response, 6 + float(H) + 4 + np.arange(2))
    assert not lay.integral


def test_equal_lengths_and_one_document_give_integer_positions():
    assert g.layout("equilibrium", 3, [49, 49, 49], 2, 1).integral  # exact fractions: 1/(1/49) is 49
    one = g.layout("equilibrium", 3, [49], 2, 1)
    assert one.integral and one.documents[0].tolist() == list(range(3, 52)) and one.query[0] == 52


def test_left_aligned_positions():
    lay = g.layout("left", 2, [3, 5], 2, 1)
    assert lay.documents[0].tolist() == [2, 3, 4] and lay.documents[1].tolist() == [2, 3, 4, 5, 6]
    assert lay.query.tolist() == [7, 8] and lay.response.tolist() == [9]


def test_forkjoin_mask_lets_a_segment_see_only_its_path():
    segs = g.serialize(2, [2, 1], 2, response=1)
    m = g.forkjoin_mask(segs)
    # rows: pre 0-1 | doc0 2-3 | q0 4-5 | doc1 6 | q1 7-8 | response 9
    assert m[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert m[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert m[8].tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 1, 0]
    assert m[9].all()
    assert not m[1, 2:].any()


def test_top_k_and_soft_bias():
    assert g.top_k([0.1, 0.5, 0.5, -1.0], 2) == [1, 2]
    assert g.top_k([3.0, 1.0, 2.0], 1) == [0]
    np.testing.assert_allclose(g.soft_bias([1.0, 3.0, 2.0], [1, 2], 0.5), [0.0, -2.0])


# ---- exactness -------------------------------------------------------------------------------

def test_one_document_equals_the_classical_prompt_in_logits_and_tokens(model, tok):
    hook = prefill(tok, DOCS[1:2])
    logits, cache, _ = run(model, tok, DOCS[1:2], hook=hook)
    ids = mx.array(sp.classical_ids(hook.fork_join(QUESTION)), dtype=mx.uint32)
    plain_cache = model.make_cache()
    plain = ChunkedPrefill(512)(model, ids, plain_cache)
    close(logits, plain, atol=1e-5)
    k1, _ = cache[2].keys[..., : cache[2].offset, :], None
    close(k1, plain_cache[2].keys[..., : plain_cache[2].offset, :])
    assert cache[0].positions.tolist() == list(range(ids.size))
    # generation: the same tokens (the decode hook continues at the next position)
    q = mx.array(tok.encode(QUESTION), dtype=mx.uint32)
    sup = [t for t, _ in generate_step(q, model, max_tokens=12, prefill=hook,
                                       decode=sp.SuperpositionDecode())]
    ref = [t for t, _ in generate_step(ids, model, max_tokens=12)]
    assert sup == ref


@pytest.mark.parametrize("positions", ["equilibrium", "left"])
@pytest.mark.parametrize("batch", [2048, 16])  # 16: several batches, padded rows and keys
def test_batched_paths_equal_the_single_fork_join_pass(model, tok, positions, batch):
    one, c1, h1 = run(model, tok, DOCS, top_k=2, positions=positions, single_pass=True)
    two, c2, h2 = run(model, tok, DOCS, top_k=2, positions=positions, batch_tokens=batch)
    close(one, two, atol=1e-4)
    np.testing.assert_allclose(h1.last.document_loglik, h2.last.document_loglik, atol=1e-4)
    np.testing.assert_allclose(h1.last.query_loglik, h2.last.query_loglik, atol=1e-4)
    assert h1.last.kept == h2.last.kept
    for a, b in zip(c1, c2):
        assert a.offset == b.offset
        close(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :], atol=1e-4)
        close(a.values[..., : a.offset, :], b.values[..., : b.offset, :], atol=1e-4)
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-4)


def test_single_pass_equals_running_each_path_separately_and_concatenating(model, tok):
    """Each path [preamble, doc i, query] run alone (plain causal forward at the layout's
    positions) gives the keys and values the one fork-join pass cut out for it."""
    fj = prefill(tok, DOCS).fork_join(QUESTION)
    lay = g.layout("equilibrium", len(fj.preamble), fj.document_lengths, len(fj.query), len(fj.response))
    pre, docs, queries = run_single_pass(model, fj.preamble, fj.documents, fj.query, lay)
    P = len(fj.preamble)
    for i, d in enumerate(fj.documents):
        ids = np.array(fj.preamble + d + fj.query, dtype=np.uint32)
        pos = np.concatenate([lay.preamble, lay.documents[i], lay.query]).astype(np.float32)
        cache = [PositionedKVCache() for _ in model.layers]
        model(mx.array(ids)[None], cache=cache, positions=mx.array(pos)[None], mask="causal")
        for l, c in enumerate(cache):
            alone = c.keys[..., : c.offset, :]
            joined = mx.concatenate([pre.keys(l), docs[i].keys(l), queries[i].keys(l)], axis=2)
            close(alone, joined, atol=1e-4)
            close(c.values[..., P:P + len(d), :], docs[i].values(l), atol=1e-4)


def test_every_path_spans_the_same_range_in_the_cache_and_query_copies_share_positions(model, tok):
    _, cache, hook = run(model, tok, DOCS, top_k=len(DOCS))
    r = hook.last
    pos = cache[0].positions
    P, m, H = r.preamble_tokens, r.query_tokens, float(g.harmonic_mean(r.document_tokens))
    at = P
    query_positions = []
    for l in r.document_tokens:
        doc = pos[at:at + l]
        assert doc[0] == pytest.approx(P) and doc[-1] + H / l == pytest.approx(P + H, abs=1e-3)
        query_positions.append(pos[at + l:at + l + m])
        at += l + m
    for q in query_positions:
        assert q.tolist() == query_positions[0].tolist()
    assert pos[at:].tolist() == pytest.approx((P + H + m + np.arange(r.response_tokens)).tolist(), abs=1e-3)


def test_a_pruned_path_is_never_attended(model, tok):
    """Changing a pruned document (same length, so the same positions) changes neither the answer's
    logits nor its tokens; the cache holds the preamble, the kept paths and the response only."""
    logits, cache, hook = run(model, tok, DOCS, top_k=2)
    r = hook.last
    pruned = [i for i in range(len(DOCS)) if i not in r.kept]
    assert cache[0].offset == (r.preamble_tokens + sum(r.document_tokens[i] + r.query_tokens for i in r.kept)
                               + r.response_tokens)
    fj = hook.fork_join(QUESTION)
    rng = np.random.default_rng(0)
    for j in pruned:
        for _ in range(20):  # a replacement that stays pruned
            docs = list(fj.documents)
            docs[j] = tuple(int(t) for t in rng.integers(3, len(tok), len(docs[j])))
            other = sp.ForkJoinPrompt(fj.preamble, tuple(docs), fj.query, fj.response)
            c2 = hook.make_cache(model)
            logits2, r2 = sp.superposition_prefill(model, other, c2, hook.config)
            if r2.kept == r.kept:
                break
        assert r2.kept == r.kept
        close(logits, logits2, atol=1e-5)
        assert not np.allclose(r2.scores[j], r.scores[j])


def test_attention_scores_equal_each_path_run_alone(model, tok):
    fj = prefill(tok, DOCS).fork_join(QUESTION)
    lay = g.layout("equilibrium", len(fj.preamble), fj.document_lengths, len(fj.query), len(fj.response))
    pre, docs, _ = run_single_pass(model, fj.preamble, fj.documents, fj.query, lay)
    _, _, att = run_queries(model, pre, docs, fj.query, lay.query, 16, attention=True)
    P = len(fj.preamble)
    for i, d in enumerate(fj.documents):
        ids = np.array(fj.preamble + d + fj.query, dtype=np.uint32)
        pos = np.concatenate([lay.preamble, lay.documents[i], lay.query]).astype(np.float32)
        cache = [PositionedKVCache() for _ in model.layers]
        for c in cache:
            c.want_scores = True
        model(mx.array(ids)[None], cache=cache, positions=mx.array(pos)[None], mask="causal")
        mass = np.mean([np.array(c.scores)[0, :, P:P + len(d)].sum(-1).mean() for c in cache])
        assert att[i] == pytest.approx(mass, abs=1e-5)


def test_soft_reweighting_biases_the_answer_and_decoding(model, tok):
    drop, c1, h1 = run(model, tok, DOCS, top_k=3)
    soft, c2, h2 = run(model, tok, DOCS, top_k=3, reweight="soft", temperature=0.5)
    assert h1.last.kept == h2.last.kept
    assert not np.allclose(np.array(drop), np.array(soft))
    bias = np.array(c2[0].slot_bias)
    r = h2.last
    assert bias.shape[0] == c2[0].offset - r.response_tokens
    assert (bias[: r.preamble_tokens] == 0).all() and bias.min() < 0 and bias.max() == 0
    # a huge temperature makes every kept path weigh the same: the plain answer
    flat, _, _ = run(model, tok, DOCS, top_k=3, reweight="soft", temperature=1e9)
    close(drop, flat, atol=1e-5)
    q = mx.array(tok.encode(QUESTION), dtype=mx.uint32)
    hooks = sp.superposition_hooks(tok, DOCS, config=sp.SuperpositionConfig(top_k=3, reweight="soft"))
    assert len(list(generate_step(q, model, max_tokens=6, **hooks))) == 6


def test_decoding_continues_after_the_last_position_and_drafting_stays_lossless(model, tok):
    q = mx.array(tok.encode(QUESTION), dtype=mx.uint32)
    hooks = sp.superposition_hooks(tok, DOCS, config=sp.SuperpositionConfig(top_k=2))
    plain = [t for t, _ in generate_step(q, model, max_tokens=16, **hooks)]
    cache = hooks["prefill"].make_cache(model)
    drafted = [t for t, _ in generate_step(q, model, max_tokens=16, prompt_cache=cache,
                                           drafter=PromptLookup(2, 4), **hooks)]
    assert drafted == plain
    pos = cache[0].positions
    r = hooks["prefill"].last
    start = r.layout.response[-1]
    tail = pos[-(cache[0].offset - (r.preamble_tokens + sum(r.document_tokens[i] + r.query_tokens
                                                           for i in r.kept) + r.response_tokens)):]
    np.testing.assert_allclose(tail, start + 1 + np.arange(tail.size), atol=1e-3)


# ---- path caching -------------------------------------------------------------------------------

def test_path_cache_reuses_documents_across_questions_exactly(model, tok):
    hook = prefill(tok, DOCS, top_k=2)
    first, _, _ = run(model, tok, DOCS, hook=hook)
    assert hook.last.documents_computed == len(DOCS) and not hook.last.preamble_cached
    again, _, _ = run(model, tok, DOCS, hook=hook)
    assert hook.last.documents_cached == len(DOCS) and hook.last.preamble_cached
    assert mx.array_equal(first, again)
    other, _, _ = run(model, tok, DOCS, question="Who did she visit?", hook=hook)
    fresh, _, _ = run(model, tok, DOCS, question="Who did she visit?", top_k=2)
    assert hook.last.documents_computed == 0
    close(other, fresh, atol=1e-5)


def test_document_cache_directory_is_reused_across_runs_and_refuses_another_model(model, tok, tmp_path):
    d = tmp_path / "docs-cache"
    hook = sp.SuperpositionPrefill(tok, DOCS, config=sp.SuperpositionConfig(top_k=2), path_cache=PathCache(d))
    hook.prepare(model)
    assert (d / "manifest.json").is_file() and len(list(d.glob("*.safetensors"))) == len(DOCS) + 1
    first, _, _ = run(model, tok, DOCS, hook=hook)
    later = sp.SuperpositionPrefill(tok, DOCS, config=sp.SuperpositionConfig(top_k=2), path_cache=PathCache(d))
    second, _, _ = run(model, tok, DOCS, hook=later)
    assert later.last.documents_cached == len(DOCS) and later.last.preamble_cached
    assert mx.array_equal(first, second)
    other = make_model(tiny_args(vocab_size=len(tok), num_gqa_groups=2), seed=6)
    with pytest.raises(MlxeffError, match="made by another model"):
        PathCache(d).bind(other)
    entry = sorted(d.glob("*.safetensors"))[0]
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    with pytest.raises(MlxeffError, match="corrupt document cache entry"):
        run(model, tok, DOCS, hook=sp.SuperpositionPrefill(
            tok, DOCS, config=sp.SuperpositionConfig(top_k=2), path_cache=PathCache(d)))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("x")
    with pytest.raises(MlxeffError, match="not a superposition document cache"):
        PathCache(junk).bind(model)


def test_the_decode_cache_survives_a_prompt_cache_round_trip(model, tok, tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    _, cache, _ = run(model, tok, DOCS, top_k=2, reweight="soft")
    f = str(tmp_path / "c.safetensors")
    save_prompt_cache(f, cache)
    loaded = load_prompt_cache(f)
    dec = sp.SuperpositionDecode()
    y = mx.array([5], dtype=mx.uint32)
    close(dec(model, y, cache), dec(model, y, loaded), atol=1e-6)


# ---- FLOPs --------------------------------------------------------------------------------------

def test_flops_count_only_queries_and_response_with_path_caching(model):
    args = model.args
    shape = PromptShape(10, [40, 30, 50], 8, 3)
    cold = superposition_flops(args, shape, [1])
    warm = superposition_flops(args, shape, [1], cached=True)
    assert warm.preamble == warm.documents == 0 and cold.documents > 0
    assert warm.queries == cold.queries and warm.response == cold.response
    one = PromptShape(10, [40], 8, 3)
    extra = superposition_flops(args, one, [0]).total - naive_flops(args, one).total
    from mlxeff.techniques.kv_prediction_flops import head_macs
    assert extra == 2 * (39 + 7) * head_macs(args)  # one path = the classical prompt + the scores' heads


# ---- input ----------------------------------------------------------------------------------------

def test_documents_load_from_jsonl_and_folders(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "alpha", "title": "A"}\n\n{"text": "beta"}\n')
    assert sp.load_documents(f) == [sp.Document("alpha", "A"), sp.Document("beta", "")]
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "b.txt").write_text("second\n")
    (folder / "a.txt").write_text("first")
    assert [d.text for d in sp.load_documents(folder)] == ["first", "second"]


@pytest.mark.parametrize("content,needle", [
    ("", "no documents"),
    ('{"text": "ok"}\n{"text": "  "}\n', "line 2: the document is empty"),
    ('{"text": "ok"}\nnot json\n', "line 2: not valid JSON"),
    ('{"title": "no text"}\n', "line 1: expected an object"),
])
def test_bad_documents_fail_in_one_line(tmp_path, content, needle):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(MlxeffError, match=needle):
        sp.load_documents(f)


def test_bad_templates_and_top_k(tok):
    with pytest.raises(MlxeffError, match="query must contain"):
        sp.PromptTemplate(query="no placeholder").check()
    with pytest.raises(MlxeffError, match="response must not be empty"):
        sp.PromptTemplate(response=" ").check()
    with pytest.raises(MlxeffError, match="larger than the number of documents"):
        prefill(tok, DOCS[:2], top_k=3)
    with pytest.raises(MlxeffError, match="at least one document"):
        prefill(tok, [])
    with pytest.raises(MlxeffError, match="document 2 is empty"):
        prefill(tok, ["a text", ""])


def _cli(*args):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    return subprocess.run([sys.executable, "-m", "mlxeff.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def _one_line(proc, needle):
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_cli_answers_from_documents_and_reuses_its_document_cache(saved_dir, tmp_path):
    path, _ = saved_dir
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    cache = tmp_path / "cache"
    args = ("generate", QUESTION, "--model", path, "--max-tokens", 4, "--json",
            "--superposition-docs", docs, "--superposition-top-k", 2, "--superposition-doc-cache", cache)
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["techniques"]["superposition"]["top_k"] == 2 and out["generation_tokens"] >= 1
    assert len(list(cache.glob("*.safetensors"))) == len(DOCS) + 1
    second = _cli(*args)
    assert json.loads(second.stdout)["text"] == out["text"]


def test_cli_bad_input_one_line_each(saved_dir, tmp_path):
    path, _ = saved_dir
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "a"}\n{"text": ""}\n')
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "a"}\n{"text": "b"}\n')
    base = ("generate", "why?", "--model", path, "--max-tokens", 2, "--superposition-docs")
    _one_line(_cli(*base, empty), "no documents")
    _one_line(_cli(*base, blank), "line 2: the document is empty")
    _one_line(_cli(*base, two, "--superposition-top-k", 3), "--superposition-top-k 3 is larger than "
              "the number of documents (2)")
    other_dir = tmp_path / "other-cache"
    PathCache(other_dir).bind(make_model(tiny_args(vocab_size=96), seed=9))
    _one_line(_cli(*base, two, "--superposition-doc-cache", other_dir), "made by another model")


def test_registry_builds_the_hooks_with_command_line_escapes(saved_dir, tmp_path):
    from mlxeff.techniques.registry import build_hooks

    path, model = saved_dir
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    hooks = build_hooks(model, {"superposition": {"docs": docs, "query": "\\nQ: {question}\\n",
                                                  "top_k": 2, "scoring": "attention"}}, model_dir=path)
    pre = hooks["prefill"]
    assert pre.template.query == "\nQ: {question}\n" and pre.config.top_k == 2
    assert isinstance(hooks["decode"], sp.SuperpositionDecode)
    with pytest.raises(MlxeffError, match="needs --superposition-docs"):
        build_hooks(model, {"superposition": {}}, model_dir=path)


def test_the_benchmark_runs_on_the_cpu(saved_dir, tmp_path):
    import gzip

    path, _ = saved_dir
    data = tmp_path / "nq.jsonl.gz"
    with gzip.open(data, "wt") as f:
        for i, t in enumerate(DOCS):
            f.write(json.dumps({"question": f"what is in story {i}?", "answers": [t.split()[-1].strip(".")],
                                "ctxs": [{"title": f"Story {i}", "text": t}]}) + "\n")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "superposition.py")
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, script, "--model", path, "--data", data, "--docs", "2",
                           "--questions", "2", "--trials", "1", "--max-tokens", "2", "--devices", "cpu",
                           "--quiet", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)["devices"][0]
    rows = res["settings"]["2"]["methods"]
    assert set(rows) == {"naive", "sp-top1", "sp-top2", "sp-top1-nocache", "sp-top2-nocache",
                         "sp-top1-left", "sp-top1-attention"}
    assert rows["naive"]["flops_reduction"] == 1.0 and rows["sp-top1"]["flops_reduction"] > 1
    assert rows["sp-top2"]["gold_kept"] == 1.0  # two documents, two kept
    assert all(r["ttft_s"] > 0 for r in rows.values())
    assert rows["sp-top1-nocache"]["accuracy"] is None and 0 <= rows["sp-top1"]["accuracy"] <= 1


def test_the_benchmark_runs_the_book_task(saved_dir, tmp_path):
    from test_tasks import write_corpus

    path, _ = saved_dir
    corpus_dir = write_corpus(tmp_path / "corpus")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "superposition.py")
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1", MLXEFF_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, script, "--model", path, "--task", "multidoc-qa",
                           "--data", corpus_dir, "--docs", "3", "--context-tokens", "300",
                           "--questions", "2", "--methods", "naive", "sp-top1", "--trials", "1",
                           "--max-tokens", "2", "--devices", "cpu", "--quiet", "--json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)["devices"][0]
    rows = res["settings"]["3"]["methods"]
    assert res["settings"]["3"]["blocks"] == 2  # every item has its own passages
    assert rows["sp-top1"]["flops_reduction"] > 1 and 0 <= rows["naive"]["accuracy"] <= 1
    assert rows["naive"]["prefill_tokens"] <= 300 + 2  # the item's own prompt (plus BOS)


def test_benchmark_answer_matching():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "superposition_benchmark", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "superposition.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    correct = bench.correct

    assert correct(" The Wilhelm Conrad Röntgen.\nmore", ["Wilhelm Conrad Röntgen"])
    assert not correct("nobody\nWilhelm Conrad Röntgen", ["Wilhelm Conrad Röntgen"])
    assert correct("in May 18, 2018", ["may 18 2018"])
