"""MLX's CPU backend on Linux: its bundled reference BLAS vs the OpenBLAS ``mlxeff`` re-launches with.

Two measurements, each side by side (the BLAS is fixed when a process starts, so every trial is a
fresh process; trials alternate between the two setups):

- float32 matmul GFLOP/s for square sizes (``--sizes``), one warm-up product, then repeated
  products for at least ``--min-seconds``; the product is checked against NumPy in float64.
- optionally (``--eval-text``) the wall time of the real command
  ``mlxeff eval --max-tokens N --perplexity TEXT --json`` and the perplexity it prints.

``reference`` runs with ``MLXEFF_NO_OPENBLAS=1``; ``openblas`` goes through
``mlxeff.cli.blas.relaunch_with_openblas``, as the command line does, and says which library it
found. Medians per setup and the openblas/reference speed ratio are printed (``--json``: one object).

    python benchmarks/cpu_blas.py --sizes 1024 2048 --ops --trials 3
    python benchmarks/cpu_blas.py --sizes --eval-text ../shared/data/gutenberg-children/valid.txt.gz \\
        --eval-tokens 20000 --trials 1 [--phases]

``--phases`` runs the eval's steps in-process instead (load the default model, tokenize, score)
and times each, to show where the command's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETUPS = ("openblas", "reference")


def _env(setup: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLXEFF_NO_OPENBLAS"}
    if setup == "reference":
        env["MLXEFF_NO_OPENBLAS"] = "1"
    return env


def _seconds(fn, reps: int = 3) -> float:
    import mlx.core as mx

    mx.eval(fn())  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t0) / reps


def op_seconds() -> dict:
    """Seconds per call of the operations an attention layer of the default model runs on a batch
    of 4 windows of 512 tokens (6 heads of 32, as in its upper layers; a 192 -> 768 linear), float32."""
    import mlx.core as mx

    b, h, t, d = 4, 6, 512, 32
    q, k = mx.random.normal((b, h, t, d)), mx.random.normal((b, h, t, d))
    scores = q @ k.swapaxes(-1, -2)
    x, w = mx.random.normal((b * t, 192)), mx.random.normal((768, 192))
    mx.eval(scores, x, w)
    return {
        "linear 2048x192 @ 192x768": _seconds(lambda: x @ w.T),
        "q @ k^T (4x6 of 512x32 @ 32x512)": _seconds(lambda: q @ k.swapaxes(-1, -2)),
        "softmax over the 6.3 M scores": _seconds(lambda: mx.softmax(scores, axis=-1)),
        "exp of the 6.3 M scores": _seconds(lambda: mx.exp(scores)),
        "scaled_dot_product_attention, causal": _seconds(
            lambda: mx.fast.scaled_dot_product_attention(q, k, k, scale=d ** -0.5, mask="causal")),
    }


def child(sizes, min_seconds: float, ops: bool = False) -> None:
    """One trial in this process: re-launch with OpenBLAS if allowed, then time the products."""
    from mlxeff.cli import blas

    blas.relaunch_with_openblas(hint=False)
    blas.restore_environment()
    import mlx.core as mx
    import numpy as np

    mx.set_default_device(mx.cpu)
    out = {"blas": blas.blas_summary(), "gflops": {}, "max_rel_error": {}}
    if ops:
        out["op_seconds"] = op_seconds()
    rng = np.random.default_rng(0)
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        A, B = mx.array(a), mx.array(b)
        c = A @ B
        mx.eval(c)  # warm-up
        ref = a.astype(np.float64) @ b.astype(np.float64)
        out["max_rel_error"][n] = float(np.abs(np.array(c) - ref).max() / np.abs(ref).max())
        reps, t0 = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - t0 < min_seconds:
            mx.eval(A @ B)
            reps += 1
        out["gflops"][n] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9
    print(json.dumps(out))


def phases_child(text: str, tokens: int) -> None:
    """What ``mlxeff eval`` does on the default model, in this process, timed phase by phase."""
    from mlxeff.cli import blas

    blas.relaunch_with_openblas(hint=False)
    blas.restore_environment()
    t0 = time.perf_counter()
    import mlxeff
    from mlxeff import data
    from mlxeff.cli.common import apply_compute_dtype
    from mlxeff.eval import perplexity
    from mlxeff.io import resolve_model_dir

    net, tokenizer = mlxeff.load(resolve_model_dir(None))
    apply_compute_dtype(net, "auto")
    t1 = time.perf_counter()
    ids = data.tokenize_files(data.expand_files([text], "text"), tokenizer)[:tokens]
    t2 = time.perf_counter()
    result = perplexity(net, ids)
    t3 = time.perf_counter()
    print(json.dumps({"blas": blas.blas_summary(), "load_s": t1 - t0, "tokenize_s": t2 - t1,
                      "score_s": t3 - t2, "tokens": result["tokens"], "ppl": result["ppl"]}))


def mlxeff_command() -> list:
    exe = os.path.join(os.path.dirname(sys.executable), "mlxeff")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "mlxeff.cli.main"]


def eval_trial(setup: str, text: str, tokens: int) -> dict:
    cmd = [*mlxeff_command(), "eval", "--max-tokens", str(tokens), "--perplexity", text, "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=_env(setup), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    out = json.loads(p.stdout)
    blas_lines = [line for line in p.stderr.splitlines() if line.startswith("cpu blas:")]
    return {"seconds": seconds, "tokens": out["tokens"], "ppl": out["ppl"],
            "blas": blas_lines[-1][len("cpu blas: "):] if blas_lines else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--eval-text", help="also time `mlxeff eval` on this text file")
    ap.add_argument("--eval-tokens", type=int, default=20000)
    ap.add_argument("--phases", action="store_true", help="time the phases of the eval (load, tokenize, "
                    "score) in-process instead of the command's wall time")
    ap.add_argument("--ops", action="store_true", help="also time the operations of one attention layer "
                    "of the default model (where an eval's time goes besides matrix products)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.phases:
            return phases_child(args.eval_text, args.eval_tokens)
        return child(args.sizes, args.min_seconds, args.ops)

    runs = {s: [] for s in SETUPS}
    evals = {s: [] for s in SETUPS}
    for trial in range(args.trials):
        order = SETUPS if trial % 2 == 0 else SETUPS[::-1]
        for setup in order:
            if args.sizes or args.ops:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--min-seconds",
                       str(args.min_seconds), *(["--ops"] if args.ops else []), "--sizes", *map(str, args.sizes)]
                p = subprocess.run(cmd, env=_env(setup), capture_output=True, text=True, check=True)
                runs[setup].append(json.loads(p.stdout.strip().splitlines()[-1]))
            if args.eval_text and args.phases:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--phases", "--eval-text",
                       args.eval_text, "--eval-tokens", str(args.eval_tokens)]
                p = subprocess.run(cmd, env=_env(setup), capture_output=True, text=True, check=True)
                evals[setup].append(json.loads(p.stdout.strip().splitlines()[-1]))
            elif args.eval_text:
                evals[setup].append(eval_trial(setup, args.eval_text, args.eval_tokens))
            print(f"trial {trial + 1}/{args.trials} {setup} done", file=sys.stderr, flush=True)

    result = {"trials": args.trials, "matmul": {}, "eval": {}}
    for n in args.sizes:
        med = {s: statistics.median(r["gflops"][str(n)] if str(n) in r["gflops"] else r["gflops"][n]
                                    for r in runs[s]) for s in SETUPS}
        result["matmul"][n] = {
            **{f"{s}_gflops": med[s] for s in SETUPS},
            "speedup": med["openblas"] / med["reference"],
            "max_rel_error": {s: max(r["max_rel_error"][str(n)] if str(n) in r["max_rel_error"]
                                     else r["max_rel_error"][n] for r in runs[s]) for s in SETUPS},
        }
    if args.sizes or args.ops:
        result["blas"] = {s: runs[s][0]["blas"] for s in SETUPS}
    if args.ops:
        result["op_seconds"] = {op: {s: statistics.median(r["op_seconds"][op] for r in runs[s]) for s in SETUPS}
                                for op in runs["openblas"][0]["op_seconds"]}
    if args.eval_text and args.phases:
        result["eval_phases"] = {s: {k: statistics.median(e[k] for e in evals[s])
                                     for k in ("load_s", "tokenize_s", "score_s")} for s in SETUPS}
        result["eval_phases"]["score_speedup"] = (result["eval_phases"]["reference"]["score_s"]
                                                  / result["eval_phases"]["openblas"]["score_s"])
        result["eval_phases"]["ppl"] = {s: evals[s][0]["ppl"] for s in SETUPS}
        result["eval_phases"]["tokens"] = evals["openblas"][0]["tokens"]
        result["eval_phases"]["blas"] = {s: evals[s][0]["blas"] for s in SETUPS}
    elif args.eval_text:
        sec = {s: statistics.median(e["seconds"] for e in evals[s]) for s in SETUPS}
        result["eval"] = {"tokens": evals["openblas"][0]["tokens"],
                          **{f"{s}_seconds": sec[s] for s in SETUPS},
                          **{f"{s}_ppl": evals[s][0]["ppl"] for s in SETUPS},
                          "speedup": sec["reference"] / sec["openblas"],
                          "blas": {s: evals[s][0]["blas"] for s in SETUPS}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for n, m in result["matmul"].items():
        print(f"fp32 matmul {n}x{n}: reference {m['reference_gflops']:.1f} GFLOP/s, "
              f"openblas {m['openblas_gflops']:.1f} GFLOP/s, x{m['speedup']:.1f}")
    if result.get("eval_phases"):
        e = result["eval_phases"]
        for s in SETUPS:
            print(f"eval phases, {s}: load {e[s]['load_s']:.1f} s, tokenize {e[s]['tokenize_s']:.1f} s, "
                  f"score {e[s]['score_s']:.1f} s")
        print(f"scoring {e['tokens']} tokens: x{e['score_speedup']:.1f}; perplexity "
              f"{e['ppl']['reference']:.4f} vs {e['ppl']['openblas']:.4f}")
    if result["eval"]:
        e = result["eval"]
        print(f"mlxeff eval, {e['tokens']} tokens: reference {e['reference_seconds']:.1f} s, "
              f"openblas {e['openblas_seconds']:.1f} s, x{e['speedup']:.1f}; "
              f"perplexity {e['reference_ppl']:.4f} vs {e['openblas_ppl']:.4f}")
    for op, sec in result.get("op_seconds", {}).items():
        print(f"{op}: reference {sec['reference'] * 1e3:.0f} ms, openblas {sec['openblas'] * 1e3:.0f} ms")
    for s, b in result.get("blas", {}).items():
        print(f"{s}: {b}")


if __name__ == "__main__":
    main()
