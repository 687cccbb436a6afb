"""Prefill time by chunk length, plain and LazyLLM, side by side: where a GPU prefill's time goes.

On a GPU a prefill of a small model is bound by launches and host work per chunk rather than by
arithmetic, so the chunk length matters more than the FLOPs a technique removes. This times, on
one random prompt of ``--tokens`` ids, interleaved, after one warm-up call each (its time is
printed as ``first``: a new process meets new shapes):

- plain prefill (``ChunkedPrefill``) in chunks of 512 and of 2048 tokens, and in chunks of 512
  with every chunk's evaluation asynchronous (``mx.async_eval``, the host building the next chunk
  while the device runs this one);
- LazyLLM prefill (``lazy_prefill``) with keep 1.0 (nothing pruned), 1 -> 0.9 and 0.8 -> 0.5, its
  contiguous stages in chunks of 512 and its pruned stages (``pruned_step_size``) in chunks of 512,
  2048 or 4096, with and without asynchronous evaluations.

    python benchmarks/prefill_chunks.py [--model DIR] --tokens 4096 [--trials 5] [--json]

The asynchronous variants replace ``mx.eval`` in the engine's or LazyLLM's module by
``mx.async_eval`` for the call (a measurement device, not a library option).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "mlxeff" / "assets" / "default"


def with_async_eval(module, fn):
    """``fn`` run with ``module.mx.eval`` replaced by ``mx.async_eval``."""
    patched = types.SimpleNamespace(**{k: getattr(mx, k) for k in dir(mx) if not k.startswith("__")})
    patched.eval = mx.async_eval

    def run():
        real, module.mx = module.mx, patched
        try:
            return fn()
        finally:
            module.mx = real
    return run


def cases(model, prompt) -> dict:
    import mlxeff.engine as engine
    import mlxeff.techniques.lazyllm as lz

    layers = len(model.transformer.layers)

    def plain(step=512):
        return lambda: engine.ChunkedPrefill(step)(model, prompt, model.make_cache())

    def lazy(schedule, pruned=None):
        return lambda: lz.lazy_prefill(model, prompt, lz.make_cache(layers, schedule), 512, pruned)

    s1, s2 = lz.LazySchedule(1.0, 0.9), lz.LazySchedule(0.8, 0.5)
    return {"plain 512": plain(), "plain 2048": plain(2048),
            "plain 512 async": with_async_eval(engine, plain()),
            "lazy keep 1.0": lazy(lz.LazySchedule.full()),
            "lazy 1->0.9": lazy(s1), "lazy 1->0.9 p2048": lazy(s1, 2048), "lazy 1->0.9 p4096": lazy(s1, 4096),
            "lazy 1->0.9 async": with_async_eval(lz, lazy(s1)),
            "lazy 1->0.9 p4096 async": with_async_eval(lz, lazy(s1, 4096)),
            "lazy 0.8->0.5": lazy(s2), "lazy 0.8->0.5 p4096": lazy(s2, 4096),
            "lazy 0.8->0.5 p4096 async": with_async_eval(lz, lazy(s2, 4096))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.trials < 1:
        raise SystemExit("error: --tokens must be at least 2 and --trials at least 1")
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark()
    import mlxeff
    from mlxeff.errors import MlxeffError
    from mlxeff.precision import apply_compute_dtype

    try:
        model, _ = mlxeff.load(args.model)
    except MlxeffError as e:
        raise SystemExit(f"error: {e}")
    apply_compute_dtype(model)
    prompt = mx.array(np.random.default_rng(0).integers(3, 8000, args.tokens).astype(np.int32))
    runs = cases(model, prompt)
    times = {k: [] for k in runs}
    for _ in range(args.trials + 1):  # the first round is the warm-up
        for k, fn in runs.items():
            t0 = time.perf_counter()
            mx.eval(fn())
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["plain 512"][1:])
    rows = {k: {"first_ms": 1e3 * v[0], "median_ms": 1e3 * statistics.median(v[1:]),
                "min_ms": 1e3 * min(v[1:]), "max_ms": 1e3 * max(v[1:]),
                "speed_vs_plain_512": base / statistics.median(v[1:])} for k, v in times.items()}
    if args.json:
        print(json.dumps({"device": str(mx.default_device()), "mlx": mx.__version__, "model": str(args.model),
                          "tokens": args.tokens, "trials": args.trials, "rows": rows}))
        return
    for k, r in rows.items():
        print(f"N={args.tokens} {k:26s} first {r['first_ms']:8.1f} ms  median {r['median_ms']:7.2f} ms  "
              f"({r['min_ms']:.2f}-{r['max_ms']:.2f})  speed vs plain 512 {r['speed_vs_plain_512']:.3f}x")


if __name__ == "__main__":
    main()
