"""KV Prediction (arXiv 2410.08391) benchmark: time to first token and quality, side by side.

For a base model and one or more trained KV Prediction directories (``--aux DIR``, from
``mlxeff train-kv-prediction``), in one run:

- TTFT for prompts of ``--lengths`` tokens (default 256, 1024, 2048) of held-out text: the base
  alone (chunked prefill), KV prediction (auxiliary on ``prompt[:-1]``, predictor, base on the last
  token), and the auxiliary model alone. TTFT is the time from the prompt's token ids to the first
  token id (prefill + greedy pick, synchronised), on the default device. Methods are interleaved
  trial by trial after a warm-up; medians are reported with the ratio to the base, next to the
  FLOPs reduction in the paper's convention and in the executed-work convention
  (``mlxeff.techniques.kv_prediction_flops``).
- Quality, each for the base, KV prediction and the auxiliary alone:
  ``ppl``: perplexity of the true ``--cont`` next tokens of held-out text after a ``--ctx``-token
  context (the base continues, teacher-forced, from the cache the method built);
  ``ppl_base``: perplexity of the base's own greedy continuation (the first ``--cont`` tokens);
  ``agree``: fraction of the first ``--cont`` greedy tokens equal to the base's (position-wise);
  ``lambada``: LAMBADA (OpenAI) last-word accuracy (every word token must be the greedy choice)
  and mean log-probability of the word, ``--lambada-items`` items.

Run from the repository root, e.g.:

    python benchmarks/kv_prediction.py --base mlxeff/assets/default \\
        --aux mlxeff/assets/default/kv_prediction/lp-0.5 --aux mlxeff/assets/default/kv_prediction/lp-0.25

``--json`` prints one JSON object; with ``$OUT`` set the JSON also goes to
``$OUT/kv_prediction_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _preload_openblas():
    """Re-run with Debian's OpenBLAS preloaded (MLX's CPU wheel bundles reference BLAS)."""
    if sys.platform != "linux" or os.environ.get("MLXEFF_NO_OPENBLAS"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    sys.path.insert(0, str(REPO))  # cli/ imports as a top-level package from the source tree
    from cli.blas import child_environment

    env = child_environment()
    if env is None:
        return
    env["MLXEFF_NO_OPENBLAS"] = "1"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="base model directory")
    p.add_argument("--aux", action="append", required=True, type=Path,
                   help="KV prediction directory (repeat for several)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--step-size", type=int, default=512, help="prefill chunk length")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--text", type=Path, default=DATA / "gutenberg-children" / "valid.txt.gz",
                   help="held-out text for prompts and perplexity")
    p.add_argument("--text-chars", type=int, default=2_000_000,
                   help="characters of --text to tokenize")
    p.add_argument("--ctx", type=int, default=256, help="context tokens for the quality items")
    p.add_argument("--cont", type=int, default=32, help="continuation tokens scored/generated")
    p.add_argument("--items", type=int, default=64, help="held-out text items for ppl/agreement")
    p.add_argument("--lambada", type=Path, default=DATA / "eval" / "lambada_openai.jsonl.gz")
    p.add_argument("--lambada-items", type=int, default=1000)
    p.add_argument("--table-length", type=int, default=1024,
                   help="prompt length whose TTFT goes into the accuracy-vs-TTFT table")
    p.add_argument("--skip-ttft", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _preload_openblas()
    import mlx.core as mx
    import numpy as np

    import mlxeff
    from mlxeff import data
    from mlxeff.errors import MlxeffError
    from mlxeff.generate import ChunkedPrefill
    from mlxeff.techniques.kv_prediction import KVPrediction
    from mlxeff.techniques.kv_prediction_flops import prompt_flops

    dtype = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[args.dtype]
    base, tok = mlxeff.load(args.base)
    if tok is None:
        raise MlxeffError("the base model has no tokenizer", args.base)
    base.set_dtype(dtype)
    arts = {}
    for d in args.aux:
        art = KVPrediction.load(d, base=base)
        art.auxiliary.set_dtype(dtype)
        art.predictor.set_dtype(dtype)
        name = d.name
        while name in arts:
            name += "'"
        arts[name] = art
    step = args.step_size
    # method name -> (model, prefill strategy)
    methods = {"base": (base, ChunkedPrefill(step))}
    for name, art in arts.items():
        methods[f"kvp {name}"] = (base, art.prefill(step))
        methods[f"aux {name}"] = (art.auxiliary, ChunkedPrefill(step))

    text = data.read_text(args.text)[: args.text_chars]
    tokens = np.asarray(data.encode_text(tok, text))
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"base {args.base}: {base.args.num_transformer_layers} layers; text {len(tokens):,} tokens; "
        f"device {mx.default_device()}; dtype {args.dtype}")

    result = {"base": str(args.base), "aux": {n: str(d) for n, d in zip(arts, args.aux)},
              "device": str(mx.default_device()), "dtype": args.dtype, "machine": platform.node(),
              "command": " ".join(["python"] + sys.argv),
              "ld_preload": os.environ.get("LD_PRELOAD", "")}

    def first_token(model, prefill, prompt):
        cache = prefill.make_cache(model)
        y = mx.argmax(prefill(model, prompt, cache), axis=-1)
        mx.eval(y)
        return y

    # ---- TTFT ------------------------------------------------------------------------------
    if not args.skip_ttft:
        ttft = {}
        for T in args.lengths:
            if T + 1 > len(tokens):
                raise MlxeffError(f"the text has {len(tokens)} tokens, fewer than a {T}-token prompt")
            prompt = mx.array(tokens[1000 % (len(tokens) - T): 1000 % (len(tokens) - T) + T],
                              dtype=mx.uint32)
            times = {m: [] for m in methods}
            for trial in range(args.warmup + args.trials):
                for m, (model, prefill) in methods.items():
                    mx.synchronize()
                    tic = time.perf_counter()
                    first_token(model, prefill, prompt)
                    dt = time.perf_counter() - tic
                    mx.clear_cache()
                    if trial >= args.warmup:
                        times[m].append(dt)
            med = {m: statistics.median(v) for m, v in times.items()}
            row = {}
            for m, v in times.items():
                row[m] = {"median_s": med[m], "trials_s": v, "speedup": med["base"] / med[m]}
                kind, _, name = m.partition(" ")
                if kind == "kvp":
                    art = arts[name]
                    for conv in ("paper", "exact"):
                        fl = prompt_flops(base.args, art.auxiliary.args, art.predictor.layer_map, T,
                                          conv)
                        row[m][f"flops_reduction_{conv}"] = fl.reduction
                        row[m][f"ttft_over_flops_{conv}"] = row[m]["speedup"] / fl.reduction
            ttft[T] = row
            say(f"TTFT {T}: " + ", ".join(f"{m} {row[m]['median_s'] * 1e3:.1f} ms "
                                          f"({row[m]['speedup']:.2f}x)" for m in row))
        result["ttft"] = ttft

    # ---- quality ---------------------------------------------------------------------------
    if not args.skip_quality:
        from mlxeff.eval import _encode, _split_space, greedy_agreement, greedy_tokens

        def scores(model, prefill, ctx, cont):
            """Log-probs of ``cont`` after ``ctx`` with the cache ``prefill`` builds; greedy hit."""
            cache = prefill.make_cache(model)
            first = prefill(model, mx.array(ctx, dtype=mx.uint32), cache)
            logits = first
            if len(cont) > 1:
                rest = model(mx.array(cont[:-1], dtype=mx.uint32)[None], cache=cache)[0]
                logits = mx.concatenate([first, rest], axis=0)
            logits = logits.astype(mx.float32)
            target = mx.array(cont, dtype=mx.int32)
            lp = mx.take_along_axis(logits, target[:, None], axis=-1)[:, 0] - \
                mx.logsumexp(logits, axis=-1)
            hit = mx.all(mx.argmax(logits, axis=-1) == target)
            mx.eval(lp, hit)
            return float(lp.sum().item()), bool(hit.item())

        C, K = args.ctx, args.cont
        span = C + K
        n_items = min(args.items, (len(tokens) - 1) // span)
        starts = np.linspace(0, len(tokens) - span - 1, n_items).astype(int)
        items = [(tokens[s:s + C].tolist(), tokens[s + C:s + span].tolist()) for s in starts]
        quality = {m: {"nll": 0.0, "nll_base": 0.0, "agree": 0.0} for m in methods}
        tic = time.perf_counter()
        for ctx, cont in items:
            ref = greedy_tokens(base, ctx, K, prefill=methods["base"][1])
            for m, (model, prefill) in methods.items():
                q = quality[m]
                q["nll"] -= scores(model, prefill, ctx, cont)[0]
                q["nll_base"] -= scores(model, prefill, ctx, ref)[0]
                got = ref if m == "base" else greedy_tokens(model, ctx, K, prefill=prefill)
                q["agree"] += greedy_agreement(got, ref)
        for q in quality.values():
            q["ppl"] = math.exp(q.pop("nll") / (len(items) * K))
            q["ppl_base"] = math.exp(q.pop("nll_base") / (len(items) * K))
            q["agree"] /= len(items)
        say(f"text items: {len(items)} x ({C} context + {K}) tokens "
            f"({time.perf_counter() - tic:.0f} s)")
        if args.lambada_items > 0 and args.lambada.is_file():
            rows = list(data.iter_jsonl(args.lambada))[: args.lambada_items]
            encoded = []
            for r in rows:
                ctx, cont = _split_space(r["context"] + " ", r["continuation"].strip())
                encoded.append((_encode(tok, ctx), _encode(tok, cont)))
            for m, (model, prefill) in methods.items():
                hits, lps = 0, 0.0
                for ctx, cont in encoded:
                    lp, hit = scores(model, prefill, ctx, cont)
                    hits += hit
                    lps += lp
                quality[m]["lambada_acc"] = hits / len(encoded)
                quality[m]["lambada_hits"] = hits
                quality[m]["lambada_logprob"] = lps / len(encoded)
            result["lambada_items"] = len(encoded)
        result["quality"] = quality
        result["quality_items"] = {"text": len(items), "ctx": C, "cont": K}

    # ---- report ----------------------------------------------------------------------------
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "kv_prediction_bench.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"device {result['device']}, dtype {args.dtype}, LD_PRELOAD={result['ld_preload'] or '-'}")
    if "ttft" in result:
        lengths = list(result["ttft"])
        print("\nTTFT, median ms (speedup vs base) [FLOPs reduction paper / exact]")
        print(f"{'method':16s}" + "".join(f"{T:>34d}" for T in lengths))
        for m in methods:
            cells = []
            for T in lengths:
                r = result["ttft"][T][m]
                cell = f"{r['median_s'] * 1e3:8.1f} ({r['speedup']:4.2f}x)"
                if "flops_reduction_paper" in r:
                    cell += f" [{r['flops_reduction_paper']:.2f}/{r['flops_reduction_exact']:.2f}]"
                cells.append(f"{cell:>34s}")
            print(f"{m:16s}" + "".join(cells))
    if "quality" in result:
        qi = result["quality_items"]
        print(f"\nquality: {qi['text']} held-out items ({qi['ctx']}-token context, {qi['cont']} "
              f"tokens); lambada {result.get('lambada_items', 0)} items")
        print(f"{'method':16s}{'ppl':>10s}{'ppl_base':>10s}{'agree':>8s}{'lambada':>9s}"
              f"{'lp':>8s}")
        for m, q in result["quality"].items():
            print(f"{m:16s}{q['ppl']:10.3f}{q['ppl_base']:10.3f}{q['agree']:8.3f}"
                  f"{q.get('lambada_acc', float('nan')):9.3f}{q.get('lambada_logprob', float('nan')):8.3f}")
    T = args.table_length
    if "ttft" in result and "quality" in result and T in result["ttft"]:
        print(f"\naccuracy vs TTFT ({T}-token prompts)")
        print(f"{'method':16s}{'TTFT ms':>10s}{'speedup':>9s}{'ppl':>9s}{'agree':>8s}{'lambada':>9s}")
        for m, q in result["quality"].items():
            r = result["ttft"][T][m]
            print(f"{m:16s}{r['median_s'] * 1e3:10.1f}{r['speedup']:8.2f}x{q['ppl']:9.3f}"
                  f"{q['agree']:8.3f}{q.get('lambada_acc', float('nan')):9.3f}")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        from mlxeff.errors import MlxeffError

        if isinstance(e, MlxeffError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        raise
