"""Where a LazyLLM prefill's time goes against the plain one: the pieces added one at a time.

LazyLLM (``mlxeff.techniques.lazyllm``) differs from the plain chunked prefill in four ways: its
layers run in stages (layer ranges between pruning layers), each stage ends with the last row's
attention (the importance), the pruned stages run RoPE and attention at explicit positions, and
the pruning gathers rows. Its first design read the importance back to the host at every stage
and ran the last row alone through every stage; the ``stages`` variants below measure those
pieces (LazyLLM now selects on the device, hands each stage to it without waiting, and runs the
last row in its stage's last chunk once rows are pruned). On a GPU this
model's prefill is bound by launches and host work, not arithmetic, so these costs can outweigh
the token-layers pruning saves. Side by side in one run (a warm-up, then ``--trials``
interleaved trials, medians), for each prompt length:

- ``plain``: the engine's ``ChunkedPrefill`` (the baseline every LazyLLM figure is against);
- ``plain, last token in its chunk``: the same, the last token in the last chunk instead of
  alone (the cut LazyLLM's pruned stages use);
- ``positions``: the same computation at explicit positions (0, 1, ... given, the index-causal
  mask): what the positioned RoPE and attention route costs with nothing pruned;
- ``stages``: the plain computation cut into the schedule's layer ranges, each range's rows then
  its last row, one evaluation per range;
- ``stages+scores``: the same, with the last row's attention weights of each range's last layer
  read back to the host (the importance LazyLLM sorts); ``stages+scores(device)``: those weights
  computed but only evaluated on the device, not read back;
- each ``--schedules`` entry: LazyLLM itself.

Also the host time to build the plain prefill's graph (until its evaluation starts): when that is
most of the plain prefill's time, the prefill is host-bound.

    python benchmarks/prefill_breakdown.py [--model DIR] [--lengths 2048,4096] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxeff.engine import ChunkedPrefill, prefill_step_size  # noqa: E402
from mlxeff.precision import apply_compute_dtype  # noqa: E402
from mlxeff.techniques.lazyllm import LazyPrefill, LazySchedule  # noqa: E402


def evaluate(logits, cache):
    mx.eval(logits, [a for c in cache for a in (c.keys, c.values) if a is not None])


def run_plain(model, prompt, step):
    cache = model.make_cache()
    return ChunkedPrefill(step)(model, prompt, cache), cache


def run_last_in_chunk(model, prompt, step):
    """The plain computation with the last token in the last chunk rather than alone (the head on
    its row only): what the plain prefill would cost without its one-row pass."""
    t, cache, n = model.transformer, model.make_cache(), int(prompt.size)
    for start in range(0, n, step):
        h = t.forward_layers(t.token_embeddings(prompt[None, start:start + step]), 0, len(t.layers), cache)
        if start + step < n:
            mx.eval(h, [(c.keys, c.values) for c in cache])
    return model.logits(t.norm(h[:, -1:]))[:, -1, :], cache


def run_positions(model, prompt, step):
    """The plain chunks, each at explicit positions with the index-causal mask."""
    t, cache, n = model.transformer, model.make_cache(), int(prompt.size)
    L = len(t.layers)
    start = 0
    while n - start > 1:
        stop = min(start + step, n - 1)
        h = t.forward_layers(t.token_embeddings(prompt[None, start:stop]), 0, L, cache,
                             positions=np.arange(start, stop)[None], mask="causal")
        mx.eval(h, [(c.keys, c.values) for c in cache])
        start = stop
    h = t.forward_layers(t.token_embeddings(prompt[None, start:]), 0, L, cache,
                         positions=np.arange(start, n)[None], mask="causal")
    return model.logits(t.norm(h[:, -1:]))[:, -1, :], cache


def run_stages(model, prompt, bounds, scores: bool, host: bool = True):
    """The plain computation in the schedule's layer ranges (rows, then the last row, per range),
    one evaluation per range; with ``scores`` each range's last layer also leaves the last row's
    attention weights, read back to the host as LazyLLM's importance is (``host``), or only
    evaluated on the device."""
    t, cache = model.transformer, model.make_cache()
    h = t.token_embeddings(prompt[None])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        body = t.forward_layers(h[:, :-1], lo, hi, cache)
        if scores and hi < len(t.layers):
            cache[hi - 1].want_scores = True
        last = t.forward_layers(h[:, -1:], lo, hi, cache)
        h = mx.concatenate([body, last], axis=1)
        if scores and hi < len(t.layers):
            importance = cache[hi - 1].scores.mean(axis=(0, 1))
            cache[hi - 1].want_scores, cache[hi - 1].scores = False, None
            if host:
                np.array(importance.astype(mx.float32))  # the host read: a synchronisation
            else:
                mx.eval(h, importance)
        else:
            mx.eval(h)
    return model.logits(t.norm(h[:, -1:]))[:, -1, :], cache


def run_lazy(model, prompt, prefill: LazyPrefill):
    cache = prefill.make_cache(model)
    return prefill(model, prompt, cache), cache


def plain_build_seconds(model, prompt):
    """Host time to build the plain prefill's graph for the whole prompt in one chunk (nothing
    evaluated), and the time of its evaluation afterwards."""
    cache = model.make_cache()
    tic = time.perf_counter()
    logits = model(prompt[None], cache=cache)[:, -1, :]
    built = time.perf_counter() - tic
    evaluate(logits, cache)
    return built, time.perf_counter() - tic - built


def parse_schedules(text):
    """``--schedules``: KEEP_START:KEEP_END, comma-separated (one line and exit 2 when bad)."""
    out = {}
    for item in filter(None, text.split(",")):
        try:
            ks, ke = (float(v) for v in item.split(":"))
            out[f"lazy {ks:g}->{ke:g}"] = LazySchedule(ks, ke)
        except ValueError as e:  # a wrong count of numbers, or the schedule's own check
            raise SystemExit(f"error: --schedules: {item!r} is not KEEP_START:KEEP_END in (0, 1] ({e})")
    if not out:
        raise SystemExit("error: --schedules: no schedule given")
    return out


def parse_lengths(text):
    """``--lengths``: prompt lengths of at least 2 tokens, comma-separated."""
    try:
        out = [int(v) for v in filter(None, text.split(","))]
    except ValueError:
        out = []
    if not out or min(out) < 2:
        raise SystemExit(f"error: --lengths: {text!r} is not a list of integers of at least 2")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="mlxeff model directory (default: the embedded model)")
    ap.add_argument("--lengths", default="2048,4096", help="prompt lengths, comma-separated")
    ap.add_argument("--schedules", default="1:0.9,0.8:0.5", help="KEEP_START:KEEP_END, comma-separated")
    ap.add_argument("--step", type=int, default=None, help="chunk length (default: the engine's for the device)")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="auto", help="auto (the model's own on a GPU, float32 on the CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    lengths = parse_lengths(args.lengths)
    if args.trials < 1 or args.warmup < 0 or (args.step is not None and args.step < 1):
        raise SystemExit("error: --trials and --step must be at least 1, --warmup at least 0")

    import mlxeff
    from mlxeff.io import resolve_model_dir

    model, _ = mlxeff.load(resolve_model_dir(args.model))
    apply_compute_dtype(model, args.dtype)
    step = prefill_step_size(args.step)
    schedules = parse_schedules(args.schedules)
    L = len(model.layers)
    first = next(iter(schedules.values()))
    bounds = [0] + sorted(first.stages_for(L)) + [L]
    rng = np.random.default_rng(0)
    report = {"device": str(mx.default_device()), "step": step, "layers": L, "stage_bounds": bounds,
              "lengths": {}}
    for n in lengths:
        prompt = mx.array(rng.integers(0, model.args.vocab_size, n), dtype=mx.uint32)
        variants = {
            "plain": lambda: run_plain(model, prompt, step),
            "plain, last token in its chunk": lambda: run_last_in_chunk(model, prompt, step),
            "positions": lambda: run_positions(model, prompt, step),
            "stages": lambda: run_stages(model, prompt, bounds, False),
            "stages+scores": lambda: run_stages(model, prompt, bounds, True),
            "stages+scores(device)": lambda: run_stages(model, prompt, bounds, True, host=False),
        }
        for name, sched in schedules.items():
            variants[name] = lambda s=sched: run_lazy(model, prompt, LazyPrefill(s, step, step))
        times = {k: [] for k in variants}
        for trial in range(args.warmup + args.trials):
            print(f"{n} tokens: {'warm-up' if trial < args.warmup else 'trial'} {trial + 1} of "
                  f"{args.warmup + args.trials}", file=sys.stderr, flush=True)
            for name, fn in variants.items():
                mx.synchronize()
                tic = time.perf_counter()
                evaluate(*fn())
                if trial >= args.warmup:
                    times[name].append(time.perf_counter() - tic)
        builds = [plain_build_seconds(model, prompt) for _ in range(args.warmup + args.trials)][args.warmup:]
        base = statistics.median(times["plain"])
        row = {name: {"ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v),
                      "vs_plain": base / statistics.median(v)} for name, v in times.items()}
        row["plain_one_chunk_build_ms"] = 1e3 * statistics.median(b for b, _ in builds)
        row["plain_one_chunk_eval_ms"] = 1e3 * statistics.median(e for _, e in builds)
        report["lengths"][n] = row
        if not args.json:
            print(f"{n} tokens (step {step}, {L} layers, ranges {bounds}):")
            for name, v in times.items():
                print(f"  {name:30s} {row[name]['ms']:9.2f} ms  (min {row[name]['min_ms']:.2f})  "
                      f"{row[name]['vs_plain']:.2f}x plain")
            print(f"  plain in one chunk: graph built in {row['plain_one_chunk_build_ms']:.2f} ms, "
                  f"then evaluated in {row['plain_one_chunk_eval_ms']:.2f} ms")
    if args.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark()  # on the CPU: with OpenBLAS, as the mlxeff command runs
    main()
