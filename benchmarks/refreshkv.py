"""RefreshKV vs plain decoding: speed at long contexts, and quality against StreamingLLM and H2O.

Three parts, each one command:

``speed``: decode tok/s over a context of 4k, 8k and 16k tokens, plain decoding and RefreshKV (K =
context/8, a full step every S = 10 tokens; optionally the dynamic schedule), side by side in one
run, through the engine (``generate_step``, greedy, the decode loop mlx-lm's). Random weights in
OpenELM shapes (speed does not depend on the weights): by default OpenELM-1.1B and 3B. The cache is
filled with random keys and values (``--fill synthetic``, the default: no prefill to wait for) or by
a real prefill of random tokens (``--fill prefill``). A trial decodes ``--steps`` tokens from the
same context for every variant (the cache is trimmed back afterwards, so each trial starts a fresh
generation, first full step included); trials interleave the variants, medians are reported.
*Attention time per step* is measured separately: the attention calls of one decode step alone,
every layer over the real caches and subsets, chained through the layers as real decoding is
(each layer's query depends on the previous layer's output): plain attention over every slot, a
RefreshKV partial step over the subsets (the pruned-attention kernel on a GPU), a full step with
its attention weights, and the re-selection; RefreshKV's amortised attention per step follows from
the schedule. ``--kernel-time`` (CUDA, needs PyTorch's profiler; run with ``MLX_USE_CUDA_GRAPHS=0``)
also reports the GPU kernel time of whole decode steps, split into attention kernels and the rest.

``quality``: the default model (or ``--model``) at its longest context: key-value retrieval and
multi-document QA answered after the context (greedy, accuracy with 95% Wilson intervals), and the
perplexity of the last 256 tokens of held-out book passages (teacher-forced through the decode
strategy; 95% bootstrap interval over passages), for full attention, RefreshKV (fixed and dynamic
schedules), StreamingLLM and H2O at the same K. The task prompts come from this file's builders
(``kv_retrieval_items``, ``multidoc_qa_items``) or, with ``--tasks project``, from the project's
task generators (``project_items``: the held-out items of ``mlxeff eval --task kv-retrieval`` and
``multidoc-qa``, which the default model v2 was trained to read). ``--reach`` sets RefreshKV's
pooling reach for both schedules (``--reach 0``: the centred SnapKV window alone, as before the
reach was added).

``diagnose``: where RefreshKV settings lose a key-value retrieval on the default model (or
``--model``): the project's items, teacher-forced on full attention's greedy answer; per setting
(centred pooling windows, reach, the first selection at the prompt's last token or at the first
answer token, both schedules) the items kept, the value token that first went wrong, whether that
step was partial and whether the slot of that value token was in the subset of the head that
copies it (the query head with the largest full-attention weight on it).

    python benchmarks/refreshkv.py speed [--shapes 1.1B,3B] [--contexts 4096,8192,16384] [--json]
    python benchmarks/refreshkv.py quality [--model DIR] [--json]
    python benchmarks/refreshkv.py diagnose [--items 20] [--threshold 0.4] [--json]

On the CPU it re-launches itself with OpenBLAS preloaded, as the ``mlxeff`` command does.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxeff.cache import trim_cache  # noqa: E402
from mlxeff.engine import ChunkedPrefill, DecodeStrategy, generate_step  # noqa: E402
from mlxeff.kernels import gpu_backend  # noqa: E402
from mlxeff.precision import apply_compute_dtype  # noqa: E402
from mlxeff.models import Model, layerwise_config, openelm_config  # noqa: E402
from mlxeff.models.attention import attend  # noqa: E402
from mlxeff.techniques import refreshkv as rk  # noqa: E402
from mlxeff.tasks.scoring import wilson_interval as wilson  # noqa: E402
from mlxeff.techniques.refreshkv_baselines import H2ODecode, StreamingDecode  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


# ---- speed ---------------------------------------------------------------------------------------

def shape_config(name: str):
    if name == "default":  # the embedded model's recipe (benchmarks/default_model.sh)
        return layerwise_config(17, 192, 32, num_gqa_groups=2, ffn_dim_divisor=32, vocab_size=8192)
    return openelm_config(name)


def random_model(name: str, dtype):
    mx.random.seed(0)
    model = Model(shape_config(name))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def fill_cache(model, context: int, how: str, dtype, seed: int = 0):
    """A cache of ``context`` tokens: random keys and values, or a real prefill of random ids."""
    cache = model.make_cache()
    rng = np.random.default_rng(seed)
    if how == "prefill":
        ids = mx.array(rng.integers(3, model.args.vocab_size, context).astype(np.uint32))
        mx.eval(ChunkedPrefill(2048)(model, ids[:-1], cache))
        return cache, ids[-1:]
    key = mx.random.key(seed)
    for layer, c in zip(model.layers, cache):
        key, kk, kv = mx.random.split(key, 3)
        shape = (1, layer.attn.n_kv_heads, context - 1, layer.attn.head_dim)
        c.update_and_fetch(mx.random.normal(shape, key=kk).astype(dtype),
                           mx.random.normal(shape, key=kv).astype(dtype))
        mx.eval(c.keys, c.values)
    return cache, mx.array([int(rng.integers(3, model.args.vocab_size))], dtype=mx.uint32)


def decode_trial(model, cache, last, decode, steps: int) -> float:
    """Seconds per generated token after the first, through the engine; the cache is trimmed back."""
    start = cache[0].offset
    times = []
    for _ in generate_step(last, model, max_tokens=steps, prompt_cache=cache, decode=decode,
                           prefill=ChunkedPrefill()):
        times.append(time.perf_counter())
    trim_cache(cache, cache[0].offset - start)
    return (times[-1] - times[0]) / (len(times) - 1)


def speed_variants(args, context):
    k = rk.default_k(context)
    out = {"plain": lambda: DecodeStrategy(),
           "refreshkv": lambda: rk.RefreshDecode(rk.RefreshConfig(k=k, every=args.every))}
    if args.dynamic:
        out["refreshkv_dynamic"] = lambda: rk.RefreshDecode(
            rk.RefreshConfig(k=k, threshold=args.threshold, check_every=args.check_every))
    return out


class _Tap:
    """The attention's view of one layer cache, for the attention-only timing."""

    def __init__(self, cache, index=None, scores=False):
        self.keys, self.values, self.offset = cache.keys, cache.values, cache.offset
        self.next_position = cache.next_position
        self.attend_index, self.want_scores, self.scores = index, scores, None


def attention_step(model, cache, mode: str, subsets=None, k: int = 0, pool: int = 7, reach: int = 0):
    """One decode step's attention over every layer, chained (layer l's query is its own random
    query plus a scalar from layer l-1's output): 'plain', 'partial' (the subsets), 'full' (every
    slot and the attention weights) or 'select' (full, then RefreshKV's re-selection, pooling
    window ``pool`` and ``reach``)."""
    key = mx.random.key(1)
    queries = []
    for layer in model.layers:
        key, kq = mx.random.split(key)
        queries.append(mx.random.normal((1, layer.attn.n_heads, 1, layer.attn.head_dim),
                                        key=kq).astype(cache[0].keys.dtype))

    def step():
        prev, outs, scores = None, [], []
        for l, (layer, c) in enumerate(zip(model.layers, cache)):
            q = queries[l] if prev is None else queries[l] + prev[:, :1, :, :1]
            tap = _Tap(c, subsets[l] if mode == "partial" else None, mode in ("full", "select"))
            n = c.offset
            prev = attend(q, c.keys[..., :n, :], c.values[..., :n, :], scale=layer.attn.scale,
                          mask=None, cache=tap)
            outs.append(prev)
            if tap.scores is not None:
                scores.append(rk.group_max(tap.scores, layer.attn.n_kv_heads))
        if mode == "full":
            outs += scores  # a full step computes the weights the selection reads
        if mode == "select":
            outs.append(rk.select_top(mx.concatenate(scores, axis=1), k, pool, reach))
        return outs
    return step


def time_step(step, trials: int, reps: int = 5) -> float:
    mx.eval(step())
    out = []
    for _ in range(trials):
        tic = time.perf_counter()
        mx.eval([step() for _ in range(reps)])
        out.append((time.perf_counter() - tic) / reps)
    return statistics.median(out)


def kernel_times(model, cache, last, variants, steps, trials):
    """GPU kernel time per decode step (CUPTI via PyTorch's profiler): all kernels, and those whose
    names say attention (sdpa, attention, pruned, flash, fmha). The names are listed."""
    try:
        from torch.profiler import ProfilerActivity, profile, record_function
    except ImportError:
        raise SystemExit("--kernel-time needs PyTorch installed (its profiler reads CUPTI's records)")
    import tempfile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for name, make in variants.items():
            with record_function(f"variant:{name}"):
                for _ in range(trials):
                    decode_trial(model, cache, last, make(), steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    spans = [(e["ts"], e["ts"] + e["dur"], e["name"][8:]) for e in events if e.get("ph") == "X"
             and str(e.get("name", "")).startswith("variant:") and e.get("cat") != "kernel"]
    out = {}
    words = ("sdpa", "attention", "pruned", "flash", "fmha")
    for name in variants:
        ks = [e for e in events if e.get("cat") == "kernel"
              and any(t0 <= e["ts"] <= t1 and n == name for t0, t1, n in spans)]
        per = trials * steps
        attn = [e for e in ks if any(w in e["name"].lower() for w in words)]
        names = {}
        for e in ks:
            names[e["name"][:90]] = names.get(e["name"][:90], 0.0) + e["dur"] * 1e-6 / per
        out[name] = dict(gpu_seconds_per_step=sum(e["dur"] for e in ks) * 1e-6 / per,
                         attention_gpu_seconds_per_step=sum(e["dur"] for e in attn) * 1e-6 / per,
                         top_kernels=dict(sorted(names.items(), key=lambda kv: -kv[1])[:8]))
    return out


def run_speed(args):
    backend = gpu_backend()
    dtype = getattr(mx, args.dtype or ("float16" if backend else "float32"))
    res = dict(part="speed", device=str(mx.default_device()), backend=backend or "cpu", mlx=mx.__version__,
               dtype=str(dtype), fill=args.fill, steps=args.steps, trials=args.trials, every=args.every,
               mlx_use_cuda_graphs=os.environ.get("MLX_USE_CUDA_GRAPHS", "1 (default)"), runs=[])
    for shape in args.shapes.split(","):
        model = random_model(shape, dtype)
        for context in [int(c) for c in args.contexts.split(",")]:
            cache, last = fill_cache(model, context, args.fill, dtype)
            variants = speed_variants(args, context)
            for name, make in variants.items():  # warm-up: kernels built, buffers grown
                decode_trial(model, cache, last, make(), min(args.steps, 2 * args.every + 2))
            times = {name: [] for name in variants}
            stats = {}
            for t in range(args.trials):
                order = list(variants.items())[:: -1 if t % 2 else 1]
                for name, make in order:
                    dec = make()
                    times[name].append(decode_trial(model, cache, last, dec, args.steps))
                    if hasattr(dec, "stats"):
                        stats[name] = dict(dec.stats)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            entry = dict(shape=shape, context=context, k=rk.default_k(context),
                         tok_per_s={n: 1.0 / s for n, s in med.items()},
                         seconds_per_token=med, trials_seconds_per_token=times,
                         speedup_vs_plain={n: med["plain"] / s for n, s in med.items()},
                         full_layer_step_fraction={n: s["full_layer_steps"] / s["layer_steps"]
                                                   for n, s in stats.items()})
            entry["attention"] = attention_times(model, cache, last, context, args)
            if args.kernel_time and backend == "cuda":
                entry["gpu_kernel_time"] = kernel_times(model, cache, last, variants, args.steps,
                                                        max(1, args.trials // 2))
            res["runs"].append(entry)
            del cache
            mx.clear_cache()
        del model
        mx.clear_cache()
    return res


def attention_times(model, cache, last, context, args):
    """Attention alone per decode step (seconds): plain, and RefreshKV's partial / full / select
    steps over the subsets of a real decoding step, amortised over the fixed schedule."""
    k = rk.default_k(context)
    dec = rk.RefreshDecode(rk.RefreshConfig(k=k, every=args.every))
    start = cache[0].offset
    dec(model, last, cache)  # the first step: full, selects
    dec(model, last, cache)  # a partial step: its subsets are recorded
    subsets = list(dec.used)
    mx.eval(subsets)
    reach = dec.config.forward
    t = {mode: time_step(attention_step(model, cache, mode, subsets, k, reach=reach), args.trials)
         for mode in ("plain", "partial", "full", "select")}
    trim_cache(cache, cache[0].offset - start)
    S = args.every
    t["refreshkv_amortised"] = ((S - 1) * t["partial"] + t["select"]) / S
    t["speedup_vs_plain_amortised"] = t["plain"] / t["refreshkv_amortised"]
    t["pruned_impl"] = "kernel" if gpu_backend() and rk_kernel_ok(model) else "gather+sdpa"
    return t


def rk_kernel_ok(model) -> bool:
    from mlxeff.models.pruned_attention import kernel_supported

    return kernel_supported(model.layers[0].attn.head_dim)


# ---- quality: tasks (swap these for the project's task generators) ---------------------------

def book_passages(tokenizer, length: int, count: int, seed: int = 0):
    """``count`` passages of ``length`` tokens from the held-out books, at spread-out offsets."""
    from mlxeff.data import encode_text, read_text

    path = DATA / "gutenberg-children" / "valid.txt.gz"
    if not path.exists():
        raise SystemExit(f"error: {path}: not found (the held-out books supply the passages)")
    tokens = encode_text(tokenizer, read_text(path)[: 100_000 + 8 * length * count])
    starts = np.linspace(0, tokens.size - length - 1, num=count, dtype=int)
    return [tokens[s:s + length] for s in starts]


def kv_retrieval_items(tokenizer, length: int, count: int, seed: int = 0):
    """Prompts of at most ``length`` tokens: lines 'key NNNN: value MMMM.' and then one of the keys
    again, 'key NNNN: value'; the answer is its value. Keys are distinct 4-digit numbers."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        keys = rng.choice(np.arange(1000, 10000), size=length, replace=False)
        values = rng.integers(1000, 10000, size=length)
        room = length - len(tokenizer.encode("key 0000: value", add_special_tokens=False)) - 2
        pairs, ids = [], []
        for key, value in zip(keys, values):
            piece = tokenizer.encode(f"key {key}: value {value}.\n", add_special_tokens=False)
            if len(ids) + len(piece) > room:
                break
            pairs.append((key, value))
            ids += piece
        key, value = pairs[int(rng.integers(0, len(pairs)))]
        prompt = ids + tokenizer.encode(f"key {key}: value", add_special_tokens=False)
        items.append(dict(prompt=prompt[-length:], answers=[str(value)]))
    return items


def multidoc_qa_items(tokenizer, length: int, count: int, seed: int = 0):
    """Prompts of about ``length`` tokens: passages (the question's gold passage among other
    questions' gold passages, at a random place), then 'Question: ...\\nAnswer:'; correct when the
    answer contains a gold answer (nq-open-oracle, as in lost-in-the-middle)."""
    path = DATA / "eval" / "nq-open-oracle.jsonl.gz"
    if not path.exists():
        raise SystemExit(f"error: {path}: not found (multi-document QA reads it)")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(2000), f)]
    rng = np.random.default_rng(seed)
    items = []
    for i in rng.choice(len(rows), size=count, replace=False):
        row = rows[i]
        question = tokenizer.encode(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)

        def doc(r):
            c = r["ctxs"][0]
            return tokenizer.encode(f"Document: {c['title']}\n{c['text']}\n\n", add_special_tokens=False)
        gold = doc(row)
        docs, used = [], len(gold) + len(question)
        for j in rng.permutation(len(rows)):
            if j == i:
                continue
            d = doc(rows[j])
            if used + len(d) > length:
                break
            docs.append(d)
            used += len(d)
        docs.insert(int(rng.integers(0, len(docs) + 1)), gold)
        prompt = [t for d in docs for t in d] + question
        items.append(dict(prompt=prompt[-length:], answers=row["answers"]))
    return items


def project_items(tokenizer, context: int, count: int, pairs: int = 50, docs: int = 10):
    """The project's own tasks (``mlxeff eval --task``, held-out items, seed 0), the ones the default
    model v2 was trained to read: key-value retrieval with ``pairs`` pairs in a JSON object, and
    multi-document QA with ``docs`` book passages in about ``context - 48`` tokens (room for the
    answer). Prompts are token ids, answers the gold strings."""
    from mlxeff.errors import MlxeffError
    from mlxeff.tasks.runner import build_items

    corpus = DATA / "gutenberg-children"
    out = {}
    for name, docs_n, ctx in (("kv_retrieval", pairs, None), ("multidoc_qa", docs, context - 48)):
        try:
            items = build_items(name.replace("_", "-"), tokenizer, data=corpus, docs=docs_n,
                                context_tokens=ctx, limit=count)
        except MlxeffError as e:  # e.g. a context too small for the passages: one line, no traceback
            raise SystemExit(f"error: {e}") from None
        out[name] = [dict(prompt=tokenizer.encode(it.prompt), answers=it.answers,
                          max_tokens=it.max_tokens) for it in items]
        longest = max(len(it["prompt"]) for it in out[name])
        if longest > context:
            raise SystemExit(f"error: a {name} prompt has {longest} tokens, more than --context {context}")
    return out


# ---- quality: measurement ----------------------------------------------------------------------

def quality_variants(args, k):
    return {
        "full": lambda: DecodeStrategy(),
        "refreshkv": lambda: rk.RefreshDecode(rk.RefreshConfig(k=k, every=args.every, reach=args.reach)),
        "refreshkv_dynamic": lambda: rk.RefreshDecode(
            rk.RefreshConfig(k=k, threshold=args.threshold, check_every=args.check_every, reach=args.reach)),
        "streaming_llm": lambda: StreamingDecode(k),
        "h2o": lambda: H2ODecode(k),
    }


def normalize(text: str) -> str:
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace()).split())


def _full_fraction(decs) -> dict:
    """Layer steps that were full attention (RefreshKV's effective stride is its inverse)."""
    stats = [d.stats for d in decs if hasattr(d, "stats")]
    if not stats:
        return {}
    full, total = sum(s["full_layer_steps"] for s in stats), sum(s["layer_steps"] for s in stats)
    return dict(full_layer_step_fraction=full / total if total else None)


def answer_accuracy(model, tokenizer, items, make, max_tokens: int):
    hits, decs = [], []
    tic = time.perf_counter()
    for item in items:
        ids = mx.array(item["prompt"], dtype=mx.uint32)
        decs.append(make())
        # an item may need more tokens than --answer-tokens (an 8-hex-digit value in quotes does)
        budget = max(max_tokens, item.get("max_tokens", 0))
        out = [tok for tok, _ in generate_step(ids, model, max_tokens=budget, decode=decs[-1])]
        text = normalize(tokenizer.decode(out))
        hits.append(any(normalize(a) and normalize(a) in text for a in item["answers"]))
    lo, hi = wilson(sum(hits), len(items))
    return dict(accuracy=sum(hits) / len(items), ci95=[lo, hi], n=len(items), correct=hits,
                seconds=time.perf_counter() - tic, **_full_fraction(decs))


def tail_nll(model, passages, make, tail: int):
    """Per passage, the negative log-likelihood of each of its last ``tail`` tokens: the rest
    prefilled, the tail teacher-forced through the decode strategy. Also the seconds per decode step."""
    nll, decs, seconds, steps = [], [], 0.0, 0
    for p in passages:
        cache = model.make_cache()
        head, rest = mx.array(p[:-tail], dtype=mx.uint32), p[-tail:]
        logits = ChunkedPrefill()(model, head, cache)
        decs.append(make())
        per = []
        for i, tok in enumerate(rest):
            lp = logits[-1] - mx.logsumexp(logits[-1])
            per.append(-float(lp[int(tok)]))
            if i + 1 < len(rest):
                tic = time.perf_counter()
                logits = decs[-1](model, mx.array([int(tok)], dtype=mx.uint32), cache)
                mx.eval(logits)
                seconds += time.perf_counter() - tic
                steps += 1
        nll.append(per)
    return np.array(nll), seconds / max(steps, 1), _full_fraction(decs)


def bootstrap_ppl(nll: np.ndarray, reference=None, boot: int = 2000):
    """Perplexity over all passages and its 95% bootstrap interval (passages resampled); with
    ``reference`` (the same passages under full attention) also the paired ratio of perplexities."""
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, len(nll), len(nll)) for _ in range(boot)]
    out = dict(perplexity=float(np.exp(nll.mean())),
               ci95=[float(np.exp(np.percentile([nll[i].mean() for i in picks], q))) for q in (2.5, 97.5)],
               n_passages=len(nll), tokens_per_passage=nll.shape[1])
    if reference is not None:
        diff = nll.mean(axis=1) - reference.mean(axis=1)
        out["ratio_to_full"] = float(np.exp(diff.mean()))
        out["ratio_ci95"] = [float(np.exp(np.percentile([diff[i].mean() for i in picks], q)))
                             for q in (2.5, 97.5)]
    return out


def run_quality(args):
    import mlxeff
    from mlxeff.io import resolve_model_dir

    path = resolve_model_dir(args.model)
    model, tokenizer = mlxeff.load(path)
    if gpu_backend() is None:
        apply_compute_dtype(model, "auto")  # float32, affine 4-bit dequantized (mlxeff.precision)
    context = args.context or model.args.max_context_length
    k = args.k or rk.default_k(context)
    res = dict(part="quality", model=str(path), device=str(mx.default_device()), mlx=mx.__version__,
               context=context, k=k, every=args.every, threshold=args.threshold,
               check_every=args.check_every, reach=args.reach,
               trained_context=model.args.max_context_length, tasks={})
    variants = quality_variants(args, k)
    res["task_source"] = args.tasks
    tasks = project_items(tokenizer, context, args.items) if args.tasks == "project" else {
        "kv_retrieval": kv_retrieval_items(tokenizer, context, args.items, seed=1),
        "multidoc_qa": multidoc_qa_items(tokenizer, context, args.items, seed=2),
    }
    for task, items in tasks.items():
        res["tasks"][task] = {n: answer_accuracy(model, tokenizer, items, make, args.answer_tokens)
                              for n, make in variants.items()}
    passages = book_passages(tokenizer, context, args.passages)
    runs = {n: tail_nll(model, passages, make, min(256, context // 2)) for n, make in variants.items()}
    ppl = res["tasks"]["book_tail_perplexity"] = {}
    for n, (nll, step_s, frac) in runs.items():
        ppl[n] = dict(bootstrap_ppl(nll, None if n == "full" else runs["full"][0]),
                      seconds_per_decode_step=step_s, **frac)
        ppl[n]["decode_speed_vs_full"] = runs["full"][1] / step_s
    for task in ("kv_retrieval", "multidoc_qa"):
        r = res["tasks"][task]
        full = r["full"]["accuracy"]
        r["refreshkv_vs_full"] = r["refreshkv"]["accuracy"] / full if full else None
    return res


# ---- diagnose: where RefreshKV loses a key-value retrieval ------------------------------------

class _Weights(DecodeStrategy):
    """Plain decoding that keeps every layer's attention weights of the step (float32, (H, n))."""

    def __call__(self, model, tokens, cache):
        for c in cache:
            c.want_scores = True
        try:
            out = model(tokens[None], cache=cache).squeeze(0)
            self.weights = [np.array(c.scores[0]) for c in cache]
        finally:
            for c in cache:
                c.want_scores, c.scores = False, None
        return out


def diagnose_settings(args, k):
    """name -> (RefreshConfig, where the first selection is made: 'answer' (the first decoded
    token's full step, the strategy as it is) or 'prompt' (a full step on the prompt's last token,
    the paper's selection point))."""
    S, QC, th = args.every, args.check_every, args.threshold
    fixed = dict(k=k, every=S)
    return {
        "S, centred pool 7 (reach 0)": (rk.RefreshConfig(**fixed, reach=0), "answer"),
        "S, centred pool 13 (reach 0)": (rk.RefreshConfig(**fixed, pool=13, reach=0), "answer"),
        "S, pool 7, reach 6": (rk.RefreshConfig(**fixed, reach=6), "answer"),
        f"S, pool 7, reach {S - 1} (default)": (rk.RefreshConfig(**fixed), "answer"),
        "S, reach 0, selected at the prompt's last token": (rk.RefreshConfig(**fixed, reach=0), "prompt"),
        f"S, reach {S - 1}, selected at the prompt's last token": (rk.RefreshConfig(**fixed), "prompt"),
        "dynamic, reach 0": (rk.RefreshConfig(k=k, threshold=th, check_every=QC, reach=0), "answer"),
        f"dynamic, reach {QC - 1} (default)": (rk.RefreshConfig(k=k, threshold=th, check_every=QC), "answer"),
    }


def run_diagnose(args):
    """Key-value retrieval items (the project's, 50 pairs), teacher-forced on full attention's
    greedy answer: for each RefreshKV setting, whether every answer step keeps full attention's
    token and, where one does not, which value token it was, whether the step was full, and whether
    the slot of that value token was in the subset of the copying head (the query head with the
    largest full-attention weight on it). Also where the copying head looks at the prompt's last
    token and at the first answer token, relative to the value's first slot."""
    import mlxeff
    from mlxeff.io import resolve_model_dir
    from mlxeff.tasks.runner import build_items

    path = resolve_model_dir(args.model)
    model, tok = mlxeff.load(path)
    if gpu_backend() is None:
        apply_compute_dtype(model, "auto")
    k = args.k or rk.default_k(model.args.max_context_length)
    items = build_items("kv-retrieval", tok, data=DATA / "gutenberg-children", docs=50,
                        context_tokens=None, limit=args.items)
    settings = diagnose_settings(args, k)
    groups = [l.attn.n_heads // l.attn.n_kv_heads for l in model.layers]
    res = dict(part="diagnose", model=str(path), device=str(mx.default_device()), mlx=mx.__version__,
               k=k, every=args.every, threshold=args.threshold, check_every=args.check_every,
               items=len(items), settings={n: dict(kept=0, failures=[]) for n in settings}, heads=[])
    for it in items:
        ids = tok.encode(it.prompt)
        value = it.answers[0]
        at = it.prompt.index(value)
        va, vb = len(tok.encode(it.prompt[:at])), len(tok.encode(it.prompt[:at + len(value)]))
        if tok.decode(ids[va:vb]).strip() != value:
            raise SystemExit(f"error: item {len(res['heads'])}: the value's slots could not be located")
        cache = model.make_cache()
        mx.eval(ChunkedPrefill()(model, mx.array(ids[:-1], dtype=mx.uint32), cache))
        P = cache[0].offset  # the prompt less its last token
        probe = _Weights()
        ref = [int(mx.argmax(probe(model, mx.array(ids[-1:], dtype=mx.uint32), cache)[-1]).item())]
        weights = [probe.weights]  # weights[s]: the step that produced ref[s]
        while value not in tok.decode(ref) and len(ref) < it.max_tokens:
            ref.append(int(mx.argmax(probe(model, mx.array(ref[-1:], dtype=mx.uint32), cache)[-1]).item()))
            weights.append(probe.weights)
        if value not in tok.decode(ref):
            raise SystemExit("error: full attention does not answer an item; the diagnosis needs it")
        first = next(s for s in range(len(ref)) if tok.decode(ref[:s + 1]).lstrip(' "').startswith(value[:1]))

        def copy_head(s):  # the query head that reads the slot of the value token ref[s] most
            need = va + s - first
            best = max((float(w[h, need]), l, h) for l, w in enumerate(weights[s]) for h in range(w.shape[0]))
            return need, best[1], best[2]
        _, l0, h0 = copy_head(first)
        res["heads"].append(dict(head=f"L{l0}h{h0}",
                                 prompt_last_peak=int(weights[0][l0][h0].argmax()) - va,
                                 first_answer_peak=int(weights[1][l0][h0].argmax()) - va
                                 if len(weights) > 1 else None))
        for name, (config, where) in settings.items():
            trim_cache(cache, cache[0].offset - P)
            dec = rk.RefreshDecode(config)
            fail = None
            if where == "prompt":
                got = dec(model, mx.array(ids[-1:], dtype=mx.uint32), cache)
                if int(mx.argmax(got[-1]).item()) != ref[0]:
                    fail = dict(step=0)
            else:
                model(mx.array([ids[-1:]], dtype=mx.uint32), cache=cache)  # the prefill's last row
            for s in range(1, len(ref)):
                if fail is not None:
                    break
                before = dec.stats["full_layer_steps"]
                got = dec(model, mx.array([ref[s - 1]], dtype=mx.uint32), cache)
                if int(mx.argmax(got[-1]).item()) != ref[s]:
                    fail = dict(step=s, full=dec.stats["full_layer_steps"] > before)
                    if first <= s < first + (vb - va):
                        need, l, h = copy_head(s)
                        used = dec.used[l]
                        fail.update(value_token=s - first + 1, copy_head=f"L{l}h{h}",
                                    slot_in_subset=None if used is None
                                    else bool(need in np.array(used[0, h // groups[l]]).tolist()))
            entry = res["settings"][name]
            entry["kept"] += fail is None
            if fail is not None:
                entry["failures"].append(fail)
        trim_cache(cache, cache[0].offset - P)
    return res


def print_diagnose(res):
    print(f"{res['model']}: key-value retrieval, {res['items']} items, K {res['k']}, S {res['every']}, "
          f"threshold {res['threshold']}, QC {res['check_every']} (teacher-forced on full attention's answer)")
    heads = [h["head"] for h in res["heads"]]
    common = max(set(heads), key=heads.count)
    print(f"  copying head of the value's first token: {common} in {heads.count(common)} items; its peak "
          f"relative to the value's first slot: at the prompt's last token median "
          f"{statistics.median(h['prompt_last_peak'] for h in res['heads']):+.0f}, at the first answer "
          f"token median {statistics.median(h['first_answer_peak'] for h in res['heads']):+.0f}")
    for name, e in res["settings"].items():
        fails = e["failures"]
        at = sorted({f.get("value_token", 0) for f in fails})
        hist = {t: sum(f.get("value_token", 0) == t for f in fails) for t in at}
        outside = sum(f.get("slot_in_subset") is False for f in fails)
        partial = sum(f.get("full") is False for f in fails)
        print(f"  {name:50s} kept {e['kept']}/{res['items']}; first wrong value token {hist} "
              f"(0: a token outside the value); at a step no layer refreshed {partial}; the value token's "
              f"slot outside the copying head's subset {outside}")


# ---- command line ----------------------------------------------------------------------------

def print_speed(res):
    print(f"{res['device']} ({res['backend']}), MLX {res['mlx']}, {res['dtype']}, cache {res['fill']}, "
          f"{res['steps']} steps x {res['trials']} trials, S = {res['every']}")
    for e in res["runs"]:
        tps = e["tok_per_s"]
        print(f"  {e['shape']:>7} {e['context']:>6} tokens, K {e['k']}: "
              + "  ".join(f"{n} {v:.1f} tok/s ({e['speedup_vs_plain'][n]:.2f}x)" for n, v in tps.items()))
        a = e["attention"]
        print(f"          attention per step: plain {a['plain'] * 1e3:.3f} ms, partial {a['partial'] * 1e3:.3f} ms, "
              f"full+weights {a['full'] * 1e3:.3f} ms, full+select {a['select'] * 1e3:.3f} ms; RefreshKV "
              f"amortised {a['refreshkv_amortised'] * 1e3:.3f} ms ({a['speedup_vs_plain_amortised']:.2f}x)")
        for n, g in e.get("gpu_kernel_time", {}).items():
            print(f"          GPU kernels {n}: {g['gpu_seconds_per_step'] * 1e3:.3f} ms per step, attention "
                  f"{g['attention_gpu_seconds_per_step'] * 1e3:.3f} ms")


def print_quality(res):
    print(f"{res['model']} at {res['context']} tokens (trained on {res['trained_context']}), K {res['k']}")
    for task, r in res["tasks"].items():
        for n, v in r.items():
            if isinstance(v, dict) and "accuracy" in v:
                print(f"  {task:22s} {n:18s} {v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] n={v['n']}")
            elif isinstance(v, dict):
                ratio = (f", x{v['ratio_to_full']:.4f} of full [{v['ratio_ci95'][0]:.4f}, {v['ratio_ci95'][1]:.4f}]"
                         if "ratio_to_full" in v else "")
                print(f"  {task:22s} {n:18s} ppl {v['perplexity']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                      f"{ratio}; decode step {v['decode_speed_vs_full']:.2f}x full's speed")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    sp = sub.add_parser("speed", help="decode speed and attention time per step")
    sp.add_argument("--shapes", default="1.1B,3B", help="OpenELM shapes (270M, 450M, 1.1B, 3B, default)")
    sp.add_argument("--contexts", default="4096,8192,16384")
    sp.add_argument("--fill", choices=["synthetic", "prefill"], default="synthetic")
    sp.add_argument("--steps", type=int, default=32, help="tokens decoded per trial")
    sp.add_argument("--trials", type=int, default=3)
    sp.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                    help="default: float16 on a GPU, float32 on the CPU")
    sp.add_argument("--kernel-time", action="store_true", help="GPU kernel time per step (CUDA, PyTorch)")
    qp = sub.add_parser("quality", help="tasks and perplexity against StreamingLLM and H2O")
    qp.add_argument("--model", default=None, help="an mlxeff model directory (default: the embedded model)")
    qp.add_argument("--context", type=int, default=None, help="default: the model's max_context_length")
    qp.add_argument("--k", type=int, default=None, help="default: context / 8")
    qp.add_argument("--items", type=int, default=40, help="prompts per task")
    qp.add_argument("--tasks", choices=["builtin", "project"], default="builtin",
                    help="builtin: this file's prompt builders (numbered key lines, nq-open-oracle); "
                    "project: the project's task generators (mlxeff eval --task kv-retrieval with 50 "
                    "pairs and multidoc-qa with 10 passages), what the default model v2 reads")
    qp.add_argument("--passages", type=int, default=16)
    qp.add_argument("--answer-tokens", type=int, default=8)
    qp.add_argument("--reach", type=int, default=None, help="RefreshKV's pooling reach (default: "
                    "S - 1, or QC - 1 for the dynamic schedule; 0: the centred window alone)")
    dp = sub.add_parser("diagnose", help="where RefreshKV settings lose a key-value retrieval "
                        "(teacher-forced on full attention's answer)")
    dp.add_argument("--model", default=None, help="an mlxeff model directory (default: the embedded model)")
    dp.add_argument("--k", type=int, default=None, help="default: the trained context / 8")
    dp.add_argument("--items", type=int, default=20, help="key-value retrieval items (50 pairs)")
    for p in (sp, qp, dp):
        p.add_argument("--every", type=int, default=10, help="RefreshKV's fixed schedule S")
        p.add_argument("--threshold", type=float, default=0.9, help="the dynamic schedule's s")
        p.add_argument("--check-every", type=int, default=5, help="the dynamic schedule's QC")
        p.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument("--dynamic", action="store_true", help="also time the dynamic schedule")
    args = ap.parse_args(argv)
    if args.part == "speed" and (args.steps < 2 or args.trials < 1):
        ap.error("--steps must be >= 2 and --trials >= 1")
    run, show = dict(speed=(run_speed, print_speed), quality=(run_quality, print_quality),
                     diagnose=(run_diagnose, print_diagnose))[args.part]
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        show(res)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, f"refreshkv_{args.part}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark()  # on the CPU: with OpenBLAS, as the mlxeff command runs
    main()
