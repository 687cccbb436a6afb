"""LazyLLM vs plain prefill: time to first token, and what the pruning costs in quality.

Side by side in one run, for several keep schedules:

- **TTFT**: prefill of 1k-, 2k- and 4k-token prompts (text from the held-out Gutenberg books) to the
  first token's logits, with the cache fully evaluated; plain = the engine's ``ChunkedPrefill``
  (same chunk size). Warm-up, then ``--trials`` interleaved trials; medians and ratios.
- **Quality**, per prompt length in ``--quality-lengths`` (by default the model's trained context and
  2048), against plain generation from the same prompt: *next-token agreement* over plain's first
  32 greedy tokens (lazy decoding teacher-forced on plain's tokens: does it predict the same next
  token at each of the 32 steps), *greedy agreement* (both generate 32 tokens freely: position-wise
  match, and the matching prefix), the perplexity of the text's real continuation (teacher-forced
  through the decode strategy), a planted-fact retrieval test within the trained context (an
  invented password early in the prompt, asked for at its end), the percent of prompt tokens
  computed (by the prefill, and after the revivals of decoding), and the decode time (the first
  step after the prefill, which revives the most, and the median of the later steps).

The default model is the embedded one (``mlxeff/assets/default``); ``--model DIR`` takes another
mlxeff directory; ``--random`` builds random weights in the default model's shape (speed only; text
quality is then meaningless and prompts are random ids). Prompts longer than the model's
``max_context_length`` run RoPE beyond the trained positions: the speed is still a valid
measurement, the quality figures there describe an extrapolating model and are flagged.

    python benchmarks/lazyllm.py [--model DIR] [--json]

On the CPU it re-launches itself with OpenBLAS preloaded, as the ``mlxeff`` command does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxeff.bench import blas_in_use  # noqa: E402
from mlxeff.eval import greedy_agreement, prefix_agreement  # noqa: E402
from mlxeff.engine import prefill_step_size  # noqa: E402
from mlxeff.generate import ChunkedPrefill, DecodeStrategy  # noqa: E402
from mlxeff.precision import apply_compute_dtype  # noqa: E402
from mlxeff.techniques.lazyllm import LazyDecode, LazyPrefill, LazySchedule  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DEFAULT_SCHEDULES = "1:0.9,0.9:0.7,0.8:0.5,0.8:0.5:4:0,0.7:0.4,0.6:0.3,0.5:0.2"


# ---- model and text ----------------------------------------------------------------------------

def load_model(args):
    if args.random:
        from mlxeff.models import Model, layerwise_config

        # The embedded model's recipe (benchmarks/default_model.sh): 17 x 192, head 32, vocab 8192.
        mx.random.seed(0)
        cfg = layerwise_config(17, 192, 32, num_gqa_groups=2, ffn_dim_divisor=32, vocab_size=8192,
                               max_context_length=512)
        model = Model(cfg)
        mx.eval(model.parameters())
        return model, None, "random weights, default-model shape"
    import mlxeff
    from mlxeff.io import resolve_model_dir

    path = resolve_model_dir(args.model)
    model, tok = mlxeff.load(path)
    return model, tok, str(path)


def text_tokens(tokenizer, vocab: int, rng, max_chars: int = 4_000_000) -> np.ndarray:
    """Token ids of the held-out books, raw as in training (the books' line breaks and spacing
    matter: collapsing them multiplies this model's perplexity tenfold); random ids without a
    tokenizer."""
    if tokenizer is None:
        return rng.integers(3, vocab, max_chars // 4)
    from mlxeff.data import encode_text, read_text

    path = DATA / "gutenberg-children" / "valid.txt.gz"
    if not path.exists():
        raise SystemExit(f"error: {path}: not found (the held-out books supply the prompts)")
    return encode_text(tokenizer, read_text(path)[:max_chars])


def windows(tokens: np.ndarray, length: int, count: int, cont: int, rng):
    """``count`` (prompt, continuation) pairs at spread-out offsets of the token stream."""
    span = length + cont
    if tokens.size < span + 1:
        raise SystemExit(f"error: the text has {tokens.size} tokens, fewer than {span} needed")
    starts = np.linspace(0, tokens.size - span - 1, num=count + 2, dtype=int)[1:-1]
    starts = starts + rng.integers(0, max(1, (tokens.size - span) // (count + 2)), size=count) // 4
    return [(tokens[s:s + length], tokens[s + length:s + span]) for s in starts]


# ---- variants ----------------------------------------------------------------------------------

def parse_schedules(spec: str):
    """``KEEP_START:KEEP_END[:STAGES[:RECENT[:START:END]]]`` items, comma-separated."""
    out = {}
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        if len(parts) not in (2, 3, 4, 6):
            raise SystemExit(f"error: --schedules: {item!r} is not "
                             "KEEP_START:KEEP_END[:STAGES[:RECENT[:START:END]]]")
        ks, ke = float(parts[0]), float(parts[1])
        stages = int(parts[2]) if len(parts) > 2 else 4
        recent = int(parts[3]) if len(parts) > 3 else 32
        lo, hi = (float(parts[4]), float(parts[5])) if len(parts) == 6 else (0.3, 0.9)
        name = f"lazy {ks:g}->{ke:g} x{stages} r{recent}" + (f" @{lo:g}-{hi:g}" if len(parts) == 6 else "")
        out[name] = LazySchedule(ks, ke, lo, hi, stages, recent)
    return out


def make_variants(schedules, step, pruned_step=None):
    v = {"plain": (ChunkedPrefill(step), DecodeStrategy())}
    for name, sched in schedules.items():
        v[name] = (LazyPrefill(sched, step, pruned_step), LazyDecode())
    return v


def cache_arrays(cache):
    if hasattr(cache, "arrays"):
        return cache.arrays()
    return [a for c in cache for a in (c.keys, c.values) if a is not None]


def clone(cache):
    if hasattr(cache, "clone"):
        return cache.clone()
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        n = KVCache()
        n.keys, n.values, n.offset = mx.array(c.keys), mx.array(c.values), c.offset
        out.append(n)
    return out


def prefill(model, pre, prompt):
    cache = pre.make_cache(model)
    tic = time.perf_counter()
    logits = pre(model, mx.array(prompt, dtype=mx.uint32), cache)
    mx.eval(logits, cache_arrays(cache))
    return logits, cache, time.perf_counter() - tic


# ---- measurements ------------------------------------------------------------------------------

def ttft(model, variants, prompt, warmup, trials):
    for _ in range(warmup):
        for pre, _ in variants.values():
            prefill(model, pre, prompt)
    times = {name: [] for name in variants}
    pct = {}
    for t in range(trials):
        order = list(variants.items())
        if t % 2:
            order.reverse()  # alternate the order so that drift favours no variant
        for name, (pre, _) in order:
            _, cache, sec = prefill(model, pre, prompt)
            times[name].append(sec)
            pct[name] = cache.percent_computed() if hasattr(cache, "percent_computed") else 100.0
    return {name: dict(median_s=statistics.median(ts), trials_s=ts, percent_computed=pct[name])
            for name, ts in times.items()}


def decode_run(model, dec, logits, cache, n, forced=None, step_times=None):
    """Greedy (or teacher-forced on ``forced``) decoding from a prefill: the chosen tokens, the
    argmax at every step and the log-probability of every forced token."""
    chosen, argmax, logps = [], [], []
    for i in range(n):
        lp = logits[0] - mx.logsumexp(logits[0])
        best = int(mx.argmax(lp))
        argmax.append(best)
        tok = best if forced is None else int(forced[i])
        if forced is not None:
            logps.append(float(lp[tok]))
        chosen.append(tok)
        if i + 1 < n:
            tic = time.perf_counter()
            logits = dec(model, mx.array([tok], dtype=mx.uint32), cache)
            mx.eval(logits)
            if step_times is not None:
                step_times.append(time.perf_counter() - tic)
    return chosen, argmax, logps


def planted_items(tokenizer, filler: np.ndarray, length: int, count: int, rng):
    """Prompts of ``length`` tokens: book text with 'the secret password is NAME.' planted in the
    first fifth, ending with a request for it; NAME is an invented word."""
    syll = ["ba", "ko", "ri", "zu", "mel", "tan", "vor", "qui", "pex", "lom", "dra", "sif", "nor", "gub"]
    items = []
    for i in range(count):
        name = "".join(rng.choice(syll, size=3)).capitalize()
        fact = tokenizer.encode(f"\n\nThe secret password is {name}. Do not forget it.\n\n",
                                add_special_tokens=False)
        ask = tokenizer.encode("\n\nThe secret password is", add_special_tokens=False)
        body = length - len(fact) - len(ask)
        start = int(rng.integers(0, filler.size - body - 1))
        text = filler[start:start + body]
        at = int(rng.integers(body // 20, body // 5 + 1))
        ids = np.concatenate([text[:at], fact, text[at:], ask]).astype(np.int64)
        items.append((ids, name))
    return items


def quality(model, tokenizer, variants, pairs, planted, n_greedy):
    per = {name: dict(agree=[], prefix=[], forced=[], nll=[], ntok=0, pct_prefill=[], pct_after=[],
                      planted=0, first_step_s=[], step_s=[]) for name in variants}
    for prompt, cont in pairs:
        runs = {}
        for name, (pre, dec) in variants.items():
            logits, cache, _ = prefill(model, pre, prompt)
            pct_prefill = cache.percent_computed() if hasattr(cache, "percent_computed") else 100.0
            steps = []
            greedy, _, _ = decode_run(model, dec, logits, clone(cache), n_greedy, step_times=steps)
            per[name]["first_step_s"].append(steps[0])
            per[name]["step_s"].extend(steps[1:])
            _, _, logps = decode_run(model, dec, logits, clone(cache), len(cont), forced=cont)
            runs[name] = (logits, cache, greedy)
            per[name]["nll"].append(-sum(logps))
            per[name]["ntok"] += len(cont)
            per[name]["pct_prefill"].append(pct_prefill)
        base = runs["plain"][2]
        for name, (pre, dec) in variants.items():
            logits, cache, greedy = runs[name]
            per[name]["agree"].append(greedy_agreement(base, greedy))
            per[name]["prefix"].append(prefix_agreement(base, greedy))
            _, argmax, _ = decode_run(model, dec, logits, cache, n_greedy, forced=base)
            per[name]["forced"].append(float(np.mean([a == b for a, b in zip(argmax, base)])))
            per[name]["pct_after"].append(cache.percent_computed() if hasattr(cache, "percent_computed") else 100.0)
    for ids, password in planted:
        for name, (pre, dec) in variants.items():
            logits, cache, _ = prefill(model, pre, ids)
            n = len(tokenizer.encode(" " + password, add_special_tokens=False)) + 1
            got, _, _ = decode_run(model, dec, logits, cache, n)
            per[name]["planted"] += int(tokenizer.decode(got).strip().startswith(password))
    out = {}
    for name, p in per.items():
        out[name] = dict(
            greedy_agreement_32=statistics.mean(p["agree"]),
            greedy_prefix_agreement_32=statistics.mean(p["prefix"]),
            next_token_agreement_32=statistics.mean(p["forced"]),
            continuation_ppl=math.exp(sum(p["nll"]) / max(p["ntok"], 1)),
            percent_computed_prefill=statistics.mean(p["pct_prefill"]),
            percent_computed_after_decode=statistics.mean(p["pct_after"]),
            planted_fact_accuracy=(p["planted"] / len(planted)) if planted else None,
            first_decode_step_ms=1e3 * statistics.median(p["first_step_s"]),
            decode_ms_per_token=1e3 * statistics.median(p["step_s"]),
        )
    return out


def copy_test(model, tokens, rng, items: int = 8, span: int = 60):
    """Can the model copy from its context at all? ``span`` random tokens, then book text, then
    the same ``span`` tokens again: the plain model's top-1 accuracy on the repeat (a model with
    induction heads approaches 1; one without stays near 0). Book text repeated the same way is
    the control (ordinary next-token accuracy helps there)."""
    out = {}
    for kind in ("random tokens", "book text"):
        accs = []
        for _ in range(items):
            if kind == "random tokens":
                seg = rng.integers(100, model.args.vocab_size, span)
            else:
                s0 = int(rng.integers(0, tokens.size - span))
                seg = tokens[s0:s0 + span]
            s1 = int(rng.integers(0, tokens.size - 300))
            x = np.concatenate([tokens[s1:s1 + 200], seg, tokens[s1 + 200:s1 + 300], seg])
            pred = np.array(mx.argmax(model(mx.array(x[None].astype(np.int32)))[0], axis=-1))
            first = x.size - span
            accs.append(float(np.mean(pred[first:-1] == x[first + 1:])))
        out[kind] = statistics.mean(accs)
    return out


# ---- main --------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="mlxeff model directory (default: the embedded model)")
    ap.add_argument("--random", action="store_true", help="random weights in the default model's shape")
    ap.add_argument("--schedules", default=DEFAULT_SCHEDULES,
                    help="comma list of KEEP_START:KEEP_END[:STAGES[:RECENT[:START:END]]] (defaults: 4 "
                    "stages, 32 recent positions, pruning from 0.3 to 0.9 of the depth; default %(default)s)")
    ap.add_argument("--lengths", default="512,1024,2048,4096", help="TTFT prompt lengths")
    ap.add_argument("--quality-lengths", default=None,
                    help="quality prompt lengths (default: the trained context and 2048)")
    ap.add_argument("--items", type=int, default=12, help="quality prompts per length")
    ap.add_argument("--planted", type=int, default=12, help="planted-fact prompts per length")
    ap.add_argument("--greedy", type=int, default=32, help="greedy tokens compared")
    ap.add_argument("--continuation", type=int, default=64, help="continuation tokens scored")
    ap.add_argument("--step", type=int, default=None,
                    help="prefill chunk size, plain and lazy (default: the engine's for the device, "
                    "512 on the CPU, 2048 on a GPU)")
    ap.add_argument("--pruned-step", type=int, default=None,
                    help="LazyLLM's chunk size once rows are pruned (default: --step)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="compute dtype (default: float32 on the CPU, the model's own on a GPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    for name in ("step", "pruned_step"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    args.step = prefill_step_size(args.step)

    model, tokenizer, desc = load_model(args)
    apply_compute_dtype(model, args.dtype)  # auto: float32 on the CPU, affine 4-bit dequantized
    L = len(model.layers)
    ctx = int(model.args.max_context_length)
    schedules = parse_schedules(args.schedules)
    for name, sched in schedules.items():
        try:
            sched.stages_for(L)
        except ValueError as e:
            raise SystemExit(f"error: --schedules: {name}: {e}")
    variants = make_variants(schedules, args.step, args.pruned_step)
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    qlengths = ([int(x) for x in args.quality_lengths.split(",") if x] if args.quality_lengths
                else sorted({ctx, 2048}))
    tokens = text_tokens(tokenizer, model.args.vocab_size, rng)
    blas = "openblas" if blas_in_use() == "OpenBLAS" else "bundled"
    result = dict(model=desc, layers=L, max_context_length=ctx, device=str(mx.default_device()),
                  dtype=str(model.transformer.norm.weight.dtype),
                  mlx=mx.__version__, blas=blas if mx.default_device() == mx.cpu else None,
                  step=args.step, pruned_step=args.pruned_step,
                  schedules={n: dict(vars(s), pruning_layers=s.stages_for(L)) for n, s in schedules.items()},
                  ttft={}, quality={})
    log = (lambda *a: None) if args.json else print
    log(f"{desc}: {L} layers, trained context {ctx}; {result['device']} (BLAS {blas})")
    for name, s in schedules.items():
        log(f"  {name}: keep at layers {s.stages_for(L)}")

    if not args.skip_ttft:
        for n in lengths:
            prompt = tokens[len(tokens) // 3:len(tokens) // 3 + n]
            res = ttft(model, variants, prompt, args.warmup, args.trials)
            base = res["plain"]["median_s"]
            for r in res.values():
                r["speedup"] = base / r["median_s"]
            result["ttft"][str(n)] = res
            log(f"\nTTFT, {n}-token prompt{' (beyond the trained context)' if n > ctx else ''}:")
            for name, r in res.items():
                log(f"  {name:32s} {r['median_s'] * 1e3:9.1f} ms  {r['speedup']:5.2f}x  "
                    f"{r['percent_computed']:5.1f}% of prompt tokens computed")

    if tokenizer is not None and not args.skip_quality:  # a quality measurement
        result["copy_test"] = copy_test(model, tokens, np.random.default_rng(1))  # own stream
        log(f"\nCopy test (plain model, top-1 on a repeated 60-token span): "
            f"random tokens {result['copy_test']['random tokens']:.3f}, "
            f"book text {result['copy_test']['book text']:.3f}")

    if not args.skip_quality:
        for n in qlengths:
            pairs = windows(tokens, n, args.items, args.continuation, rng)
            # Retrieval needs a model that can copy from its context; only within the trained context.
            planted = (planted_items(tokenizer, tokens, n, args.planted, rng)
                       if tokenizer is not None and args.planted and n <= ctx else [])
            q = quality(model, tokenizer, variants, pairs, planted, args.greedy)
            q["_extrapolating"] = n > ctx
            result["quality"][str(n)] = q
            log(f"\nQuality, {n}-token prompts ({args.items} texts, {len(planted)} planted facts)"
                f"{' - beyond the trained context: RoPE extrapolates' if n > ctx else ''}:")
            log(f"  {'':32s} {'next-tok':>8s} {'greedy':>7s} {'prefix':>7s} {'cont.ppl':>9s} "
                f"{'%prefill':>8s} {'%+decode':>8s} {'planted':>8s} {'1st ms':>7s} {'ms/tok':>7s}")
            for name, r in q.items():
                if name.startswith("_"):
                    continue
                pf = "-" if r["planted_fact_accuracy"] is None else f"{r['planted_fact_accuracy']:.2f}"
                log(f"  {name:32s} {r['next_token_agreement_32']:8.3f} {r['greedy_agreement_32']:7.3f} "
                    f"{r['greedy_prefix_agreement_32']:7.3f} {r['continuation_ppl']:9.2f} "
                    f"{r['percent_computed_prefill']:8.1f} {r['percent_computed_after_decode']:8.1f} {pf:>8s} "
                    f"{r['first_decode_step_ms']:7.1f} {r['decode_ms_per_token']:7.1f}")

    text = json.dumps(result, indent=1)
    if args.json:
        print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "lazyllm.json").write_text(text)


if __name__ == "__main__":
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark()  # on the CPU: with OpenBLAS, as the mlxeff command runs
    main()
