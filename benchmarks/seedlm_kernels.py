"""SeedLM kernels, part (c) of benchmarks/seedlm.py: fused matvec and dequantise timings.

Side by side in one run, for square weights of ``--sizes`` (default 4096 and 8192) and ``--rows``
rows of x (default 1, a decode step):

- ``fp16``: MLX ``x @ W.T`` with a float16 W;
- ``affine4``: MLX ``mx.quantized_matmul`` at 4 bits, group size 64 (4.5 bits per weight);
- ``seedlm4`` / ``seedlm3``: the fused SeedLM matvec (``seedlm_kernels.seedlm_matvec``) at
  4 bits (C=8, P=3) and 3 bits (C=12, P=4), fp16 x, for the states basis;
- ``seedlm4-bits`` / ``seedlm3-bits``: the table-lookup matvec of the two-bit basis
  (``seedlm_bits_kernels.seedlm_matvec``, one row of x only).

Every method gets as many independent weight copies as make its footprint >= 256 MB (at most 64),
so at the default sizes nothing is served from the 50 MB L2 of an H100; one timed call evaluates ``--reps`` matvecs (copy i mod n,
a distinct x each) in one graph. After a warm-up, each trial times every method once, in an order
rotated per trial; the median over ``--trials`` is reported with the achieved bandwidth (weight
bytes read, plus x and y, per matvec / time). The run also checks each SeedLM kernel's output
against the plain-MLX reference (max abs diff, and relative to max |y|).

The dequantise kernel (prefill) is timed against its reference into float16, with bytes read and
written per second. ``--sweep`` also times the 4-bit one-row matvec at every size over the launch
shapes in ``SWEEP`` (x staged in threadgroup memory or read directly, threads per threadgroup, output
rows per threadgroup; the first GPU run's shape included) and names the fastest overall, the value
for ``seedlm_kernels.MATVEC_DEFAULTS``.

On the CPU the SeedLM columns are the reference (no kernel); timings there say nothing about the
kernels. Results go to stdout (``--json`` for one JSON object) and, if ``$OUT`` is set, to
``$OUT/seedlm_kernels.json``.

    python benchmarks/seedlm_kernels.py --sweep               # on the GPU machine, ~3 minutes
    python benchmarks/seedlm_kernels.py --sizes 256 --trials 3  # smoke test anywhere
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

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxeff.kernels import gpu_backend  # noqa: E402
from mlxeff.quant import seedlm_bits_kernels as bk  # noqa: E402
from mlxeff.quant import seedlm_kernels as sk  # noqa: E402
from mlxeff.quant.seedlm_format import reconstruct  # noqa: E402

FOOTPRINT = 256 * 1024 * 1024  # bytes of weights per method, well above any L2
MAX_COPIES = 64
CONFIGS = {"seedlm4": (8, 3), "seedlm3": (12, 4), "seedlm4-bits": (8, 3), "seedlm3-bits": (12, 4)}
# the basis of each SeedLM method (mlxeff.quant.seedlm_format) and the module with its kernels
BASIS = {name: ("bits" if name.endswith("-bits") else "states") for name in CONFIGS}
KERNELS = {"states": sk, "bits": bk}


def random_packed(out: int, inf: int, C: int, P: int, seed: int):
    """A packed tensor with uniform seeds and codes and exp_base -12 (the kernels' work does not
    depend on the values)."""
    rng = np.random.default_rng(seed)
    nb = sk.num_blocks(inf, C)
    seeds = rng.integers(1, 1 << 16, (out, nb), dtype=np.uint16)
    codes = rng.integers(0, 256, (out, sk.codes_width(nb, P)), dtype=np.uint8)
    return mx.array(seeds), mx.array(codes), -12


def packed_bytes(seeds: mx.array, codes: mx.array) -> int:
    return seeds.nbytes + codes.nbytes + 4


class Method:
    """One way to compute y = x @ W.T, with its weight copies."""

    def __init__(self, name: str, n: int, rows: int, seed: int):
        self.name, self.n, self.rows = name, n, rows
        rng = np.random.default_rng(seed)
        if name in CONFIGS:
            C, P = CONFIGS[name]
            self.bits = (16 + 4 + 4 * P) / C
            first = random_packed(n, n, C, P, seed)
            self.weight_bytes = packed_bytes(*first[:2])
            copies = min(MAX_COPIES, max(1, math.ceil(FOOTPRINT / self.weight_bytes)))
            self.copies = [first] + [random_packed(n, n, C, P, seed + 1 + i) for i in range(copies - 1)]
            kern = KERNELS[BASIS[name]]
            self.fn = lambda x, w: kern.seedlm_matvec(x, w[0], w[1], w[2], C, P, n)
        else:
            W = mx.array((rng.standard_normal((n, n), dtype=np.float32) * n ** -0.5).astype(np.float16))
            if name == "fp16":
                self.bits, self.weight_bytes = 16.0, W.nbytes
                make = lambda i: W if i == 0 else (W + mx.array(i * 1e-3, mx.float16))  # noqa: E731
                self.fn = lambda x, w: x @ w.T
            else:
                wq, scales, biases = mx.quantize(W, group_size=64, bits=4)
                self.weight_bytes = wq.nbytes + scales.nbytes + biases.nbytes
                self.bits = 8 * self.weight_bytes / (n * n)
                make = lambda i: (wq ^ mx.array(i, mx.uint32), scales, biases)  # noqa: E731
                self.fn = lambda x, w: mx.quantized_matmul(x, w[0], w[1], w[2], transpose=True,
                                                           group_size=64, bits=4)
            copies = min(MAX_COPIES, max(1, math.ceil(FOOTPRINT / self.weight_bytes)))
            self.copies = [make(i) for i in range(copies)]
        mx.eval([a for c in self.copies for a in (c if isinstance(c, tuple) else (c,))
                 if isinstance(a, mx.array)])

    def call(self, xs):
        return [self.fn(x, self.copies[i % len(self.copies)]) for i, x in enumerate(xs)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t0


def check(method: Method, x: mx.array) -> dict:
    """Max |kernel - reference| on the first copy (float32 reference from the same packed data)."""
    C, P = CONFIGS[method.name]
    s, c, eb = method.copies[0]
    basis = BASIS[method.name]
    got = KERNELS[basis].seedlm_matvec(x, s, c, eb, C, P, method.n).astype(mx.float32)
    W = reconstruct(s, c, eb, C, P, method.n, basis=basis)
    want = x.astype(mx.float32) @ W.T
    diff = mx.abs(got - want).max().item()
    return {"max_abs_diff": diff, "rel_to_max": diff / max(mx.abs(want).max().item(), 1e-30)}


def bench_matvec(n: int, rows: int, args) -> dict:
    names = ["fp16", "affine4", "seedlm4", "seedlm3"] + (["seedlm4-bits", "seedlm3-bits"] if rows == 1 else [])
    methods = [Method(name, n, rows, seed=17 * i + n) for i, name in enumerate(names)]
    reps = max(args.reps, max(len(m.copies) for m in methods))
    xs = [mx.random.normal((rows, n), key=mx.random.key(i)).astype(mx.float16) for i in range(reps)]
    mx.eval(xs)
    for m in methods:  # warm-up (and kernel builds)
        for _ in range(2):
            timed(lambda: m.call(xs))
    times = {m.name: [] for m in methods}
    for t in range(args.trials):
        order = methods[t % len(methods):] + methods[: t % len(methods)]
        for m in order:
            times[m.name].append(timed(lambda: m.call(xs)) / reps)
    out = {"n": n, "rows": rows, "reps": reps, "methods": []}
    io_bytes = 2 * rows * n * 2  # x and y in float16
    for m in methods:
        med = statistics.median(times[m.name])
        row = {"method": m.name, "bits_per_weight": round(m.bits, 4), "weight_bytes": m.weight_bytes,
               "copies": len(m.copies), "median_us": med * 1e6, "min_us": min(times[m.name]) * 1e6,
               "gbps": (m.weight_bytes + io_bytes) / med / 1e9}
        if m.name in CONFIGS:
            row.update(check(m, xs[0]))
        out["methods"].append(row)
    t = {r["method"]: r["median_us"] for r in out["methods"]}
    out["ratios"] = {f"{base}_over_{m}": t[base] / t[m] for m in names[2:] for base in ("fp16", "affine4")}
    return out


def bench_dequant(n: int, args) -> list:
    rows = []
    for name, (C, P) in CONFIGS.items():
        s, c, eb = random_packed(n, n, C, P, seed=n + C)
        kern, basis = KERNELS[BASIS[name]], BASIS[name]
        ways = {"kernel": lambda: kern.seedlm_dequantize(s, c, eb, C, P, n, dtype=mx.float16),
                "reference": lambda: reconstruct(s, c, eb, C, P, n, dtype=mx.float16, basis=basis)}
        # Each way in its own block of trials, not alternated: a kernel call right after the host
        # reference took 2.7 ms (states) and 3.9 ms (bits) at 8192x8192 on an H100, against
        # 0.17 ms and 0.48 ms back to back (benchmarks/RESULTS.md, "Kernels v2"); alternating
        # had reported that as a kernel regression.
        times = {k: [] for k in ways}
        for k, f in ways.items():
            timed(f)
            timed(f)
            times[k] = [timed(f) for _ in range(args.trials)]
        moved = packed_bytes(s, c) + n * n * 2
        got = kern.seedlm_dequantize(s, c, eb, C, P, n, dtype=mx.float32)
        want = reconstruct(s, c, eb, C, P, n, dtype=mx.float32, basis=basis)
        diff = mx.abs(got - want).max().item()
        entry = {"n": n, "config": name, "bytes_moved": moved,
                 "max_abs_diff_fp32": diff, "rel_to_max_fp32": diff / mx.abs(want).max().item()}
        for k, v in times.items():
            med = statistics.median(v)
            entry[f"{k}_median_us"] = med * 1e6
            entry[f"{k}_gbps"] = moved / med / 1e9
        entry["reference_over_kernel"] = entry["reference_median_us"] / entry["kernel_median_us"]
        rows.append(entry)
    return rows


def bench_dequant_order(n: int, args) -> list:
    """The 4-bit dequantise kernel timed back to back (10 calls after 2 warm-up calls), then 5
    times each right after a host reference reconstruction, without and with ``mx.clear_cache()``
    in between, then back to back again: what a kernel call costs depends on what ran before it."""
    def median_us(f, k):
        return statistics.median(timed(f) for _ in range(k)) * 1e6

    rows = []
    for name in ("seedlm4", "seedlm4-bits"):
        (C, P), basis = CONFIGS[name], BASIS[name]
        s, c, eb = random_packed(n, n, C, P, seed=n + C)
        mx.eval(s, c)
        kernel = lambda: KERNELS[basis].seedlm_dequantize(s, c, eb, C, P, n, dtype=mx.float16)  # noqa: E731
        entry = {"n": n, "config": name}
        timed(kernel)
        timed(kernel)
        entry["back_to_back_us"] = median_us(kernel, 10)
        for clear in (False, True):
            ts = []
            for _ in range(5):
                mx.eval(reconstruct(s, c, eb, C, P, n, dtype=mx.float16, basis=basis))
                if clear:
                    mx.clear_cache()
                ts.append(timed(kernel))
            entry["after_reference_cleared_us" if clear else "after_reference_us"] = statistics.median(ts) * 1e6
        entry["back_to_back_again_us"] = median_us(kernel, 10)
        rows.append(entry)
    return rows


# (stage_x, threads, tile_rows) tried by --sweep; (True, 256, 8) is the first GPU run's launch shape
SWEEP = [(True, 256, 8), (True, 128, 8), (True, 256, 4)] + [
    (False, T, TR) for T in (32, 64, 128, 256) for TR in (2, 4, 8)] + [(False, 128, 16), (False, 64, 16)]


def variant_name(cfg) -> str:
    stage, T, TR = cfg
    return f"{'staged' if stage else 'direct'}-x T={T} TR={TR}"


def sweep_inputs(name: str, n: int, args):
    """A sweep's method (its weight copies), matvecs per timed call, x rows and exp_base."""
    m = Method(name, n, 1, seed=n)
    reps = max(args.reps, len(m.copies))
    xs = [mx.random.normal((1, n), key=mx.random.key(i)).astype(mx.float16) for i in range(reps)]
    mx.eval(xs)
    return m, reps, xs, m.copies[0][2]


def bench_sweep(n: int, args) -> list:
    """The 4-bit matvec (one x row) at every launch shape of SWEEP, timed side by side like the
    methods of bench_matvec (same copies, same x, rotated order); each checked against the
    reference on the first copy."""
    C, P = CONFIGS["seedlm4"]
    m, reps, xs, eb = sweep_inputs("seedlm4", n, args)

    def run(cfg, xs=xs):
        st, T, TR = cfg
        return [sk.matvec_kernel(x, *m.copies[i % len(m.copies)][:2], eb, C, P, n,
                                 threads=T, tile_rows=TR, stage_x=st) for i, x in enumerate(xs)]

    want = sk.seedlm_matvec_reference(xs[0].astype(mx.float32), *m.copies[0][:2], eb, C, P, n)
    scale = mx.abs(want).max().item()
    diffs = {}
    for cfg in SWEEP:
        got = run(cfg, xs[:1])[0].astype(mx.float32)
        diffs[cfg] = mx.abs(got - want).max().item() / scale
        timed(lambda: run(cfg))
        timed(lambda: run(cfg))
    times = {cfg: [] for cfg in SWEEP}
    for t in range(args.trials):
        for cfg in SWEEP[t % len(SWEEP):] + SWEEP[: t % len(SWEEP)]:
            times[cfg].append(timed(lambda: run(cfg)) / reps)
    d = sk.matvec_plan(1, n, n, C, P, mx.float16)["ints"]
    default = (bool(d["SL_STAGE"]), d["SL_T"], d["SL_TR"])
    out = []
    for cfg, v in times.items():
        med = statistics.median(v)
        out.append({"n": n, "variant": variant_name(cfg), "stage_x": cfg[0], "threads": cfg[1],
                    "tile_rows": cfg[2], "median_us": med * 1e6, "min_us": min(v) * 1e6,
                    "gbps": (m.weight_bytes + 4 * n) / med / 1e9, "rel_err": diffs[cfg],
                    "default": cfg == default})
    return out


# (warps, rows per warp, groups, buffers, jump table per lane, blocks per lane per chunk) tried by
# --sweep-bits for the bits basis' 4-bit matvec (None: the default groups). The first H100 sweep of
# the whole-row kernel found the per-lane jump table slower in both pairs (85.5 against 59.5 us at
# 8x8; every launch needing 128 KiB of shared memory was slow) and the time set per threadgroup and
# 32-block chunk, hardly by the rows a threadgroup owns: so this list asks how the time moves with
# threadgroups per SM (fewer rows each, the 16-entry G=2 tables that leave room for more), with more
# rows per threadgroup, and with longer chunks, each under 128 KiB (the second entry, the per-lane
# table at 128 KiB, repeats the first sweep's slow case beside them). Timed on an H100 since: every
# launch took 60-87 us, none faster than the default beyond the spread (RESULTS.md).
BITS_SWEEP = [(8, 8, None, 2, False, 1), (8, 8, None, 2, True, 1), (16, 8, None, 2, False, 1),
              (32, 4, None, 2, False, 1), (8, 4, None, 2, False, 1), (4, 8, None, 2, False, 1),
              (8, 8, 2, 2, False, 1), (8, 4, 2, 2, False, 1), (4, 4, 2, 2, False, 1),
              (8, 8, None, 1, False, 2), (8, 8, 2, 2, False, 2), (8, 4, 2, 2, False, 2),
              (8, 4, 2, 2, False, 4), (16, 4, 2, 2, False, 2)]


def parse_launches(text: str) -> list:
    """``--bits-launches``: comma-separated W:R:G:B:J[:L] (warps, rows per warp, tables per field or
    0 for the default, buffers, jump table per lane 0/1, blocks per lane per chunk, default 1)."""
    out = []
    for item in filter(None, text.split(",")):
        try:
            v = [int(t) for t in item.split(":")]
            if len(v) not in (5, 6):
                raise ValueError
        except ValueError:
            raise SystemExit(f"error: --bits-launches: {item!r} is not W:R:G:B:J[:L] (five or six integers)")
        w, r, g, b, j = v[:5]
        if min(w, r, v[5] if len(v) == 6 else 1) < 1 or g < 0 or b not in (1, 2) or j not in (0, 1):
            raise SystemExit(f"error: --bits-launches: {item!r}: warps, rows and lane blocks must be at "
                             "least 1, tables at least 0, buffers 1 or 2, the jump table 0 or 1")
        out.append((w, r, g or None, b, bool(j), v[5] if len(v) == 6 else 1))
    return out


def launch_plan(n: int, cfg: tuple, backend=None) -> dict:
    """The n x n 4-bit bits matvec's plan for a BITS_SWEEP entry (ValueError if it cannot run here;
    ``backend``: the device's by default)."""
    C, P = CONFIGS["seedlm4-bits"]
    w, r, g, b, j, lb = cfg
    return bk.matvec_plan(n, n, C, P, mx.float16, backend, warps=w, rows=r, groups=g, buffers=b,
                          jump_per_lane=j, lane_blocks=lb)


def bench_bits_sweep(n: int, args) -> list:
    """The bits basis' 4-bit matvec (one x row) at every launch of BITS_SWEEP, side by side, each
    checked against the reference on the first copy."""
    C, P = CONFIGS["seedlm4-bits"]
    m, reps, xs, eb = sweep_inputs("seedlm4-bits", n, args)

    def run(cfg, xs=xs):
        w, r, g, b, j, lb = cfg
        return [bk.matvec_kernel(x, *m.copies[i % len(m.copies)][:2], eb, C, P, n, warps=w, rows=r, groups=g,
                                 buffers=b, jump_per_lane=j, lane_blocks=lb) for i, x in enumerate(xs)]

    W = reconstruct(*m.copies[0][:2], eb, C, P, n, basis="bits")
    want = xs[0].astype(mx.float32) @ W.T
    scale = mx.abs(want).max().item()
    diffs = {}
    launches = args.bits_launches or BITS_SWEEP
    for cfg in launches:  # every launch planned first: one that cannot run stops the sweep before it starts
        try:
            launch_plan(n, cfg)
        except ValueError as e:
            raise SystemExit(f"error: launch {cfg}: {e}")
    for cfg in launches:
        got = run(cfg, xs[:1])[0].astype(mx.float32)
        diffs[cfg] = mx.abs(got - want).max().item() / scale
        timed(lambda: run(cfg))
        timed(lambda: run(cfg))
    times = {cfg: [] for cfg in launches}
    for t in range(args.trials):
        for cfg in launches[t % len(launches):] + launches[: t % len(launches)]:
            times[cfg].append(timed(lambda: run(cfg)) / reps)
    out = []
    for cfg, v in times.items():
        plan = launch_plan(n, cfg)
        ints = dict(plan["spec"].defines)
        med = statistics.median(v)
        out.append({"n": n, "warps": cfg[0], "rows_per_warp": cfg[1], "groups": int(ints["SLB_G"]),
                    "buffers": cfg[3], "jump_per_lane": cfg[4], "lane_blocks": cfg[5],
                    "threadgroups": plan["grid"][0] // plan["threadgroup"][0],
                    "median_us": med * 1e6, "min_us": min(v) * 1e6,
                    "gbps": (m.weight_bytes + 4 * n) / med / 1e9, "rel_err": diffs[cfg]})
    return out


def bench_floor(args, n: int = 256) -> dict:
    """Per-call time of every method on an n x n weight (microseconds of work on the GPU): what
    a call costs regardless of the weight's size -- graph, launch and host-side work."""
    names = ["fp16", "affine4", "seedlm4", "seedlm4-bits"]
    methods = [Method(name, n, 1, seed=i) for i, name in enumerate(names)]
    for m in methods:
        m.copies = m.copies[:1]
    xs = [mx.random.normal((1, n), key=mx.random.key(i)).astype(mx.float16) for i in range(args.reps)]
    mx.eval(xs)
    for m in methods:
        timed(lambda: m.call(xs))
        timed(lambda: m.call(xs))
    times = {m.name: [] for m in methods}
    for t in range(args.trials):
        for m in methods[t % len(methods):] + methods[: t % len(methods)]:
            times[m.name].append(timed(lambda: m.call(xs)) / len(xs))
    return {"n": n, **{k: statistics.median(v) * 1e6 for k, v in times.items()}}


def sweep_winner(entries: list) -> dict:
    """The launch shape with the least total time over the swept sizes (every size counts by its
    time relative to that size's best), among those that match the reference."""
    ok = [e for e in entries if e["rel_err"] < 1e-3]
    best = {}
    for e in ok:
        best[e["n"]] = min(best.get(e["n"], math.inf), e["median_us"])
    score = {}
    for e in ok:
        key = (e["stage_x"], e["threads"], e["tile_rows"])
        score[key] = score.get(key, 0.0) + e["median_us"] / best[e["n"]]
    key = min(score, key=score.get)
    return {"stage_x": key[0], "threads": key[1], "tile_rows": key[2], "variant": variant_name(key),
            "score": score[key] / len(best),
            "median_us": {e["n"]: e["median_us"] for e in ok
                          if (e["stage_x"], e["threads"], e["tile_rows"]) == key}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,8192", help="square weight sizes (comma-separated)")
    ap.add_argument("--rows", default="1", help="rows of x per matvec (comma-separated, 1..8)")
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--reps", type=int, default=32, help="matvecs per timed call (at least one per copy)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the 4-bit kernel's launch shape")
    ap.add_argument("--sweep-bits", action="store_true",
                    help="also sweep the bits basis' 4-bit matvec launch (warps, rows per warp, tables, buffers, jump "
                         "table, blocks per lane per chunk)")
    ap.add_argument("--bits-launches", type=parse_launches, default=None, metavar="W:R:G:B:J[:L],...",
                    help="launches for --sweep-bits instead of the built-in list (warps, rows per warp, "
                         "tables per field or 0 for the default, buffers, jump table per lane 0/1, "
                         "blocks per lane per chunk, default 1)")
    ap.add_argument("--dequant-order", action="store_true",
                    help="also time the 4-bit dequantise kernels back to back and right after a host reference")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    backend = gpu_backend()
    result = {
        "command": "python benchmarks/seedlm_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "backend": backend or "cpu", "kernel": sk.kernel_available(),
        "device": {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))},
        "mlx": mx.__version__, "platform": platform.platform(),
        "matvec": [bench_matvec(n, int(r), args) for n in sizes for r in args.rows.split(",")],
        "dequant": [e for n in sizes for e in bench_dequant(n, args)],
    }
    if args.dequant_order and sk.kernel_available():
        result["dequant_order"] = [e for n in sizes for e in bench_dequant_order(n, args)]
    if args.sweep_bits and bk.kernel_available():
        result["bits_sweep"] = [e for n in sizes for e in bench_bits_sweep(n, args)]
    if args.sweep and sk.kernel_available():
        result["sweep"] = [e for n in sizes for e in bench_sweep(n, args)]
        result["sweep_winner"] = sweep_winner(result["sweep"])
    if (args.sweep or args.sweep_bits) and sk.kernel_available():
        result["floor_us"] = bench_floor(args)
    text = json.dumps(result, indent=1)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "seedlm_kernels.json").write_text(text)
    if args.json:
        print(text)
        return
    print(f"backend {result['backend']} (SeedLM kernel: {result['kernel']}), {result['device']}")
    for mv in result["matvec"]:
        print(f"\nmatvec {mv['n']}x{mv['n']}, {mv['rows']} row(s) of x, {mv['reps']} per timed call")
        for r in mv["methods"]:
            extra = f"  max|dy| {r['max_abs_diff']:.3g} ({r['rel_to_max']:.2g} of max|y|)" if "max_abs_diff" in r else ""
            print(f"  {r['method']:8s} {r['bits_per_weight']:6.3f} b/w  {r['median_us']:9.1f} us  "
                  f"{r['gbps']:7.1f} GB/s  x{r['copies']} copies{extra}")
        print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in mv["ratios"].items()))
    print("\ndequantise to float16")
    for d in result["dequant"]:
        print(f"  {d['n']} {d['config']}: kernel {d['kernel_median_us']:.1f} us ({d['kernel_gbps']:.1f} GB/s), "
              f"reference {d['reference_median_us']:.1f} us; max|dW| fp32 {d['max_abs_diff_fp32']:.3g}")
    if "sweep" in result:
        print("\nsweep: 4-bit matvec, 1 row of x, launch shapes (stage_x, threads, tile_rows)")
    for s in result.get("sweep", []):
        print(f"  n={s['n']:5d} {s['variant']:26s} {s['median_us']:8.1f} us  {s['gbps']:7.1f} GB/s  "
              f"rel err {s['rel_err']:.1e}{'  (default)' if s['default'] else ''}")
    if "sweep_winner" in result:
        w = result["sweep_winner"]
        print(f"  fastest overall: {w['variant']} ({w['score']:.3f} x the per-size best): "
              + ", ".join(f"{n}: {t:.1f} us" for n, t in w["median_us"].items())
              + f"\n  -> MATVEC_DEFAULTS[1] = ({w['stage_x']}, {w['threads']}, {w['tile_rows']})")
    if "bits_sweep" in result:
        print("\nsweep: bits basis, 4-bit matvec, 1 row of x (warps, rows per warp, tables per field, buffers, jump table per lane, blocks per lane per chunk)")
    for s in result.get("bits_sweep", []):
        print(f"  n={s['n']:5d} warps={s['warps']:2d} rows={s['rows_per_warp']:2d} groups={s['groups']} "
              f"buffers={s['buffers']} jump/lane={int(s['jump_per_lane'])} lane blocks={s['lane_blocks']} "
              f"({s['threadgroups']} groups) "
              f"{s['median_us']:8.1f} us  "
              f"{s['gbps']:7.1f} GB/s  rel err {s['rel_err']:.1e}")
    if "floor_us" in result:
        f = result["floor_us"]
        print(f"\nper-call floor ({f['n']}x{f['n']} weight, 1 row): "
              + ", ".join(f"{k} {v:.1f} us" for k, v in f.items() if k != "n"))


if __name__ == "__main__":
    main()
