"""Prompt lookup decoding vs plain greedy decoding on copy-heavy prompts, side by side.

A copy-heavy prompt is a passage of ``--passage-tokens`` tokens from the held-out books
(``valid.txt.gz``, never seen in training) followed by an instruction-free restart of it: its first
``--restart-tokens`` tokens again. A model that reads its context continues by copying the
passage, which the lookup drafter proposes. For each prompt, plain greedy decoding and prompt
lookup generate ``--gen-tokens`` tokens through ``mlxeff.stream_generate``; runs alternate order per
trial after a warm-up, and the medians of decode speed (tokens per second after the first token)
and time to first token are compared. Both must produce the same tokens (lossless; checked).
Reported beside the speed: the drafts' acceptance rate, tokens per decode forward, and how much of
the output repeats the passage.

    python benchmarks/prompt_lookup.py [--model DIR] [--json]

On the CPU it re-launches itself with OpenBLAS preloaded, as the ``mlxeff`` command does.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlxeff  # noqa: E402
from mlxeff.bench import blas_in_use  # noqa: E402
from mlxeff.precision import apply_compute_dtype  # noqa: E402

DEFAULT_VALID = ROOT.parent / "shared" / "data" / "gutenberg-children" / "valid.txt.gz"


def passages(tokenizer, valid: Path, count: int, length: int, seed: int):
    """``count`` token spans of ``length`` tokens from evenly spaced places in the text."""
    with gzip.open(valid, "rt", encoding="utf-8") as f:
        text = f.read(4_000_000)
    ids = tokenizer.encode(text)
    step = (len(ids) - length) // max(count, 1)
    start = seed % max(step, 1)
    return [ids[start + i * step: start + i * step + length] for i in range(count)]


def run(model, tokenizer, prompt, gen_tokens, techniques):
    last, tokens = None, []
    for last in mlxeff.stream_generate(model, tokenizer, prompt, max_tokens=gen_tokens,
                                       techniques=techniques):
        tokens.append(last.token)
    d = last.decode
    return {"tokens": tokens, "generation_tps": last.generation_tps, "ttft_s": last.ttft,
            "generation_tokens": last.generation_tokens, "forwards": d.forwards,
            "drafted": d.drafted, "accepted": d.accepted}


def copied_fraction(output, passage, restart):
    """The share of output tokens equal to the passage's continuation after the restart."""
    want = passage[restart: restart + len(output)]
    return sum(a == b for a, b in zip(output, want)) / max(len(output), 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "mlxeff" / "assets" / "default")
    ap.add_argument("--valid", type=Path, default=DEFAULT_VALID, help="held-out text (.txt.gz)")
    ap.add_argument("--items", type=int, default=4, help="prompts (passages)")
    ap.add_argument("--passage-tokens", type=int, default=1000)
    ap.add_argument("--restart-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=200)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--draft", type=int, default=8)
    ap.add_argument("--fixed", action="store_true",
                    help="propose every match's full continuation (no adaptive draft length)")
    ap.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                    help="auto: float32 on the CPU, the stored precision on a GPU")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model, tokenizer = mlxeff.load(args.model)
    apply_compute_dtype(model, args.dtype)  # auto: float32 on the CPU, affine 4-bit dequantized
    lookup = {"lookup": {"ngram": args.ngram, "draft": args.draft, "fixed": args.fixed}}
    items = []
    for passage in passages(tokenizer, args.valid, args.items, args.passage_tokens, args.seed):
        prompt = passage + passage[: args.restart_tokens]
        runs = {"plain": [], "lookup": []}
        for trial in range(args.warmup + args.trials):
            order = ("plain", "lookup") if trial % 2 == 0 else ("lookup", "plain")
            for name in order:
                r = run(model, tokenizer, prompt, args.gen_tokens, None if name == "plain" else lookup)
                if trial >= args.warmup:
                    runs[name].append(r)
        plain, look = runs["plain"][0], runs["lookup"][0]
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("generation_tps", "ttft_s")}
               for k, v in runs.items()}
        items.append({
            "lossless": plain["tokens"] == look["tokens"],
            "plain": med["plain"], "lookup": med["lookup"],
            "decode_speedup": med["lookup"]["generation_tps"] / med["plain"]["generation_tps"],
            "ttft_ratio": med["lookup"]["ttft_s"] / med["plain"]["ttft_s"],
            "acceptance_rate": look["accepted"] / max(look["drafted"], 1),
            "tokens_per_forward": look["generation_tokens"] / max(look["forwards"], 1),
            "copied_fraction": copied_fraction(plain["tokens"], passage, args.restart_tokens),
        })
    summary = {
        "decode_speedup_median": statistics.median(i["decode_speedup"] for i in items),
        "ttft_ratio_median": statistics.median(i["ttft_ratio"] for i in items),
        "acceptance_rate_mean": statistics.mean(i["acceptance_rate"] for i in items),
        "tokens_per_forward_mean": statistics.mean(i["tokens_per_forward"] for i in items),
        "copied_fraction_mean": statistics.mean(i["copied_fraction"] for i in items),
        "all_lossless": all(i["lossless"] for i in items),
    }
    result = {"model": str(args.model), "device": str(mx.default_device()),
              "dtype": str(model.transformer.norm.weight.dtype),
              "openblas": blas_in_use() == "OpenBLAS",
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "summary": summary, "items": items}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']} on {result['device']} ({result['dtype']}): {args.items} prompts of "
          f"{args.passage_tokens}+{args.restart_tokens} tokens, {args.gen_tokens} generated, "
          f"median of {args.trials} interleaved trials")
    for i, it in enumerate(items):
        print(f"  prompt {i}: plain {it['plain']['generation_tps']:.1f} tok/s, lookup "
              f"{it['lookup']['generation_tps']:.1f} tok/s ({it['decode_speedup']:.2f}x), accepted "
              f"{100 * it['acceptance_rate']:.0f}%, {it['tokens_per_forward']:.2f} tok/forward, "
              f"copied {100 * it['copied_fraction']:.0f}%, lossless {it['lossless']}")
    s = summary
    print(f"median decode speed-up {s['decode_speedup_median']:.2f}x, TTFT ratio "
          f"{s['ttft_ratio_median']:.2f}, acceptance {100 * s['acceptance_rate_mean']:.0f}%, "
          f"{s['tokens_per_forward_mean']:.2f} tokens per forward, all lossless: {s['all_lossless']}")


if __name__ == "__main__":
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark()  # on the CPU: with OpenBLAS, as the mlxeff command runs
    main()
