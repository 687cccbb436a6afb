"""Pruned attention vs dense attention for one decode step, side by side in one run.

A decode step (one query per sequence) over ``--context`` cached positions with ``--keep`` of them
selected: the pruned-attention kernel (``mlxeff.techniques.pruned_attention``) over the selected
slots against ``mx.fast.scaled_dot_product_attention`` over all of them, and against the same SDPA
over a gathered copy of the selected rows. Shapes:

- ``layer``: one attention layer with OpenELM-270M's widest GQA layout (20 query, 5 KV heads, d=64);
- ``step``: a whole decode step's attention of OpenELM-270M (16 layers, 12-20 query heads, 4 query
  heads per KV head), each layer with its own cache;
- ``default``: every layer of the model in ``--model`` (default: the embedded model), if present;
- ``3b``: a whole decode step's attention of OpenELM-3B (36 layers, 12-24 query heads, d=128);
- ``layer128``: OpenELM-3B's widest layer alone (24 query, 6 KV heads, d=128).

``--batch`` sets the sequences per step (each with its own cache and selection): at batch 1 a step
over these small models is bound by host work (Python and MLX's kernel encoding); larger batches
show the kernels' own GPU time.

Each timed call builds and evaluates ``--reps`` steps in one graph (distinct queries; Python's
graph building is inside the time), after a warm-up; dense and pruned alternate within every
trial. By default the steps are independent, and MLX's CUDA graphs may run their kernels side by
side, which hides a latency-bound kernel; ``--chained`` links every layer's query to the previous
layer's output (one add, the same for every variant), as in real decoding. ``--compiled`` adds
dense and pruned with the whole step under ``mx.compile``. ``--kernel-time`` also reports each
variant's GPU time (CUDA; run it with ``MLX_USE_CUDA_GRAPHS=0`` so kernels run one at a time).
Each shape also reports where a step's time goes: Python building the graph, MLX encoding the
kernels, and the whole. On a GPU the kernel runs; on the CPU the "pruned" column is the plain-MLX
reference (gather + softmax). The run also checks the kernel's output against the reference.
``--sweep`` times other launch shapes of the kernel too (``--launches`` picks them).

    python benchmarks/pruned_attention.py [--batch B] [--shapes layer,step,default,3b,layer128]
        [--chained] [--compiled] [--kernel-time] [--sweep [--launches W:U:S,...]] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxeff.kernels import gpu_backend  # noqa: E402
from mlxeff.models import openelm_config  # noqa: E402
from mlxeff.models import pruned_attention as pa  # noqa: E402


def layouts(args):
    def heads(cfg):
        return list(zip(cfg.num_query_heads, cfg.num_kv_heads, [cfg.head_dim] * len(cfg.num_kv_heads)))

    out = {"layer": [(20, 5, 64)], "step": heads(openelm_config("270M")), "3b": heads(openelm_config("3B")),
           "layer128": [(24, 6, 128)]}
    default_dir = Path(__file__).resolve().parents[1] / "mlxeff/assets/default"
    model_dir = Path(args.model) if args.model else default_dir
    if (model_dir / "config.json").is_file():
        params = json.loads((model_dir / "config.json").read_text())
        out["default"] = list(zip(params["num_query_heads"], params["num_kv_heads"],
                                  [params["head_dim"]] * len(params["num_kv_heads"])))
    return out


def make_layers(heads, batch, context, n_sel, reps, dtype, seed):
    """Per layer: a K/V cache of ``context`` slots per sequence, ``reps`` queries and a sorted random
    selection of ``n_sel`` slots ((n,) at batch 1, else one row per sequence). Drawn with MLX on the
    default device (an OpenELM-3B cache at batch 16 is gigabytes)."""
    key = mx.random.key(seed)
    layers = []
    for H, KVH, D in heads:
        key, kk, kv, kq, ki = mx.random.split(key, 5)
        k = mx.random.normal((batch, KVH, context, D), key=kk).astype(dtype)
        v = mx.random.normal((batch, KVH, context, D), key=kv).astype(dtype)
        qs = [q.astype(dtype) for q in mx.split(mx.random.normal((reps * batch, H, 1, D), key=kq), reps)]
        order = mx.argsort(mx.random.uniform(shape=(batch, context), key=ki), axis=1)[:, :n_sel]
        idx = mx.sort(order, axis=1).astype(mx.int32)
        idx = idx[0] if batch == 1 else idx
        mx.eval(k, v, qs, idx)
        layers.append(dict(k=k, v=v, qs=qs, idx=idx, scale=D**-0.5))
    return layers


# (warps, unroll, splits); a few, since each is a kernel MLX compiles at its first call
SWEEP = [(16, 2, s) for s in (1, 4, 8, 16, 32)] + [(4, 4, 16), (4, 4, 32), (8, 2, 16), (8, 4, 16), (16, 4, 16)]


def parse_launches(text: str) -> list:
    try:
        out = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WARPS:UNROLL:SPLITS,..., got {text!r}")
    if not out or any(len(t) != 3 for t in out):
        raise argparse.ArgumentTypeError(f"expected WARPS:UNROLL:SPLITS,..., got {text!r}")
    return [(w, u, s or None) for w, u, s in out]


def variants(use_kernel: bool, n_splits=None, warps=None, unroll=None):
    def dense(L, q):
        return mx.fast.scaled_dot_product_attention(q, L["k"], L["v"], scale=L["scale"])

    def gathered(L, q):
        idx = L["idx"].reshape(-1, 1, L["idx"].shape[-1], 1)
        kg, vg = mx.take_along_axis(L["k"], idx, axis=2), mx.take_along_axis(L["v"], idx, axis=2)
        return mx.fast.scaled_dot_product_attention(q, kg, vg, scale=L["scale"])

    def pruned(L, q):
        if use_kernel:
            return pa.pruned_attention_kernel(q, L["k"], L["v"], L["idx"], scale=L["scale"],
                                              n_splits=n_splits, warps=warps, unroll=unroll)
        return pa.pruned_attention_reference(q, L["k"], L["v"], L["idx"], scale=L["scale"])

    return {"dense_all": dense, "sdpa_gathered": gathered, "pruned": pruned}


def _link(q, prev):
    """``q`` made to depend on ``prev`` (an earlier layer's output) through one add."""
    return q if prev is None else q + prev[:, :1, :, :1]


def eager(fn, layers, chained=False):
    """A decode step as a loop calls it: ``fn`` once per layer, graph built in Python each time.
    ``chained``: each layer's query depends on the previous layer's output, and each step's first
    layer on the previous step's last, as in real decoding (nothing can overlap on the GPU)."""
    if not chained:
        return lambda r: [fn(L, L["qs"][r]) for L in layers]
    last = [None]

    def step(r):
        outs = []
        for L in layers:
            last[0] = fn(L, _link(L["qs"][r], last[0]))
            outs.append(last[0])
        return outs

    return step


def compiled(fn, layers, chained=False):
    """The same step under ``mx.compile`` (traced once; caches and selections are constants)."""
    if not chained:
        step = mx.compile(lambda *qs: [fn(L, q) for L, q in zip(layers, qs)])
        return lambda r: step(*[L["qs"][r] for L in layers])

    def chain(prev, *qs):
        outs = []
        for L, q in zip(layers, qs):
            prev = fn(L, _link(q, prev))
            outs.append(prev)
        return outs

    step = mx.compile(chain)
    last = [mx.zeros_like(layers[-1]["qs"][0])]

    def run(r):
        outs = step(last[0], *[L["qs"][r] for L in layers])
        last[0] = outs[-1]
        return outs

    return run


def time_step(step, reps):
    """Seconds per step, building the graph in Python included (a decode loop pays it per layer)."""
    tic = time.perf_counter()
    outs = [step(r) for r in range(reps)]
    mx.eval(outs)
    return (time.perf_counter() - tic) / reps


def time_phases(step, reps):
    """Per step: Python building the graph, MLX encoding it (``async_eval`` returns once every
    kernel is queued), and the whole (until the GPU is done). When encoding is most of the whole,
    the call is bound by host work, not by the GPU."""
    t0 = time.perf_counter()
    outs = [step(r) for r in range(reps)]
    t1 = time.perf_counter()
    mx.async_eval(outs)
    t2 = time.perf_counter()
    mx.eval(outs)
    t3 = time.perf_counter()
    return {"build": (t1 - t0) / reps, "encode": (t2 - t1) / reps, "total": (t3 - t0) / reps}


def bench(steps, reps, warmup, trials):
    for _ in range(warmup):
        for step in steps.values():
            time_step(step, reps)
    times = {name: [] for name in steps}
    for _ in range(trials):
        for name, step in steps.items():  # interleaved: every trial times every variant
            try:
                times[name].append(time_step(step, reps))
            except (RuntimeError, ValueError) as e:  # e.g. a launch shape the GPU refuses
                times[name] = str(e).splitlines()[0][:160]
                steps = {k: f for k, f in steps.items() if k != name}
                break
    return {name: statistics.median(t) if isinstance(t, list) else t for name, t in times.items()}


def phases(steps, reps, trials):
    out = {}
    for name, step in steps.items():
        runs = [time_phases(step, reps) for _ in range(trials)]
        out[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return out


def kernel_time(steps, reps, trials):
    """GPU time per step: the summed durations of the CUDA kernels a step launched, as CUPTI records
    them (through PyTorch's profiler), host time excluded. Run with ``MLX_USE_CUDA_GRAPHS=0``: MLX
    then launches kernels one after another on its stream, so each duration is the kernel's alone
    (inside a CUDA graph, independent kernels overlap and their durations include the sharing).
    One profiling session for all variants; a kernel belongs to the variant whose (blocking)
    evaluation was running when it started."""
    try:
        from torch.profiler import ProfilerActivity, profile, record_function
    except ImportError:
        raise SystemExit("--kernel-time needs PyTorch installed (its profiler reads CUPTI's kernel records)")
    out, ok = {}, {}
    for name, step in steps.items():
        try:
            mx.eval(step(0))
            ok[name] = step
        except (RuntimeError, ValueError) as e:  # a launch shape the GPU refuses
            out[name] = dict(error=str(e).splitlines()[0][:160])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for name, step in ok.items():
            with record_function(f"variant:{name}"):
                for _ in range(trials):
                    mx.eval([step(r) for r in range(reps)])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    spans = [(e["ts"], e["ts"] + e["dur"], e["name"][len("variant:"):]) for e in events
             if e.get("ph") == "X" and str(e.get("name", "")).startswith("variant:") and e.get("cat") != "kernel"]
    kernels = {name: [] for name in ok}
    for e in events:
        if e.get("cat") == "kernel":
            owner = next((n for t0, t1, n in spans if t0 <= e["ts"] <= t1), None)
            if owner in kernels:
                kernels[owner].append(e)
    n = trials * reps
    for name, ks in kernels.items():
        out[name] = dict(seconds_per_step=sum(e["dur"] for e in ks) * 1e-6 / n, kernels_per_step=len(ks) / n,
                         kernel_names=sorted({e["name"][:80] for e in ks}))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=4096, help="cached positions (default 4096)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per decode step (default 1)")
    ap.add_argument("--keep", type=float, default=0.25, help="fraction selected (default 0.25)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                    help="default: float16 on a GPU, float32 on the CPU")
    ap.add_argument("--reps", type=int, default=20, help="decode steps per timed graph")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--shapes", default="layer,step,default",
                    help="comma list of layer,step,default,3b,layer128")
    ap.add_argument("--model", default=None, help="model directory for the 'default' shape")
    ap.add_argument("--chained", action="store_true",
                    help="one dependency chain through every layer and step, as in real decoding "
                         "(default: independent steps, which the GPU may overlap)")
    ap.add_argument("--compiled", action="store_true",
                    help="also time dense and pruned with the whole step under mx.compile")
    ap.add_argument("--kernel-time", action="store_true",
                    help="also report GPU kernel time per step (CUDA only; needs PyTorch's profiler)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time a few other launch shapes (SIMD groups, keys in flight, splits)")
    ap.add_argument("--launches", type=parse_launches, default=None,
                    help="with --sweep: the launch shapes to time, as WARPS:UNROLL:SPLITS,... "
                         "(SPLITS 0: the default split count)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if not 0 < args.keep <= 1:
        ap.error("--keep must be in (0, 1]")
    if args.batch < 1:
        ap.error("--batch must be >= 1")

    backend = gpu_backend()
    use_kernel = backend is not None
    dtype = getattr(mx, args.dtype or ("float16" if use_kernel else "float32"))
    n_sel = max(1, round(args.keep * args.context))
    result = dict(device=str(mx.default_device()), backend=backend or "cpu", mlx=mx.__version__,
                  mlx_use_cuda_graphs=os.environ.get("MLX_USE_CUDA_GRAPHS", "1 (default)"),
                  dtype=str(dtype), batch=args.batch, chained=args.chained, context=args.context,
                  selected=n_sel, reps=args.reps,
                  trials=args.trials, pruned_impl="kernel" if use_kernel else "reference", shapes={})
    all_layouts = layouts(args)
    for name in args.shapes.split(","):
        if name not in all_layouts:
            continue
        heads = all_layouts[name]
        layers = make_layers(heads, args.batch, args.context, n_sel, args.reps, dtype, seed=0)
        # Correctness in the same run: kernel (or reference) vs reference on the first layer.
        L = layers[0]
        ref = pa.pruned_attention_reference(L["qs"][0], L["k"], L["v"], L["idx"], scale=L["scale"])
        fns = variants(use_kernel)
        got = fns["pruned"](L, L["qs"][0])
        err = float(mx.max(mx.abs(got.astype(mx.float32) - ref.astype(mx.float32))))
        steps = {name: eager(fn, layers, args.chained) for name, fn in fns.items()}
        if args.compiled:
            steps.update({f"{name}_compiled": compiled(fns[name], layers, args.chained)
                          for name in ("dense_all", "pruned")})
        med = bench(steps, args.reps, args.warmup, args.trials)
        entry = dict(layers=len(heads), heads=heads, max_abs_err_vs_reference=err,
                     seconds_per_step=med,
                     speedup_vs_dense=med["dense_all"] / med["pruned"],
                     speedup_vs_gathered=med["sdpa_gathered"] / med["pruned"])
        if args.compiled:
            entry["speedup_vs_dense_compiled"] = med["dense_all_compiled"] / med["pruned_compiled"]
        entry["phases_seconds_per_step"] = phases(steps, args.reps, args.trials)
        if args.kernel_time and backend == "cuda":
            entry["gpu_kernel_time"] = kernel_time(steps, args.reps, max(2, args.trials // 4))
            g = entry["gpu_kernel_time"]
            entry["gpu_kernel_speedup_vs_dense"] = g["dense_all"]["seconds_per_step"] / g["pruned"]["seconds_per_step"]
        if args.sweep and use_kernel:
            H, KVH, D = heads[0]
            cfg = pa.launch_config((args.batch, H, 1, D), (args.batch, KVH, args.context, D), n_sel)
            entry["default_launch_first_layer"] = cfg["ints"]
            sweep = {"dense_all": eager(fns["dense_all"], layers, args.chained)}
            for w, u, s in args.launches or SWEEP:
                if s is None or s <= n_sel:
                    pruned = variants(True, s, w, u)["pruned"]
                    sweep[f"warps{w}_unroll{u}_splits{s or 'auto'}"] = eager(pruned, layers, args.chained)
            if args.kernel_time and backend == "cuda":
                entry["sweep_gpu_kernel_time"] = {k: g["seconds_per_step"] for k, g in
                                                  kernel_time(sweep, args.reps, 2).items() if "error" not in g}
            else:
                entry["sweep_seconds_per_step"] = bench(sweep, args.reps, 1, max(3, args.trials // 2))
        result["shapes"][name] = entry

    if args.json:
        text = json.dumps(result, indent=2)
        print(text)
    else:
        print(f"{result['device']} ({result['backend']}), MLX {result['mlx']}, {result['dtype']}, "
              f"batch {args.batch}, {n_sel} of {args.context} positions selected, pruned = {result['pruned_impl']}")
        for name, e in result["shapes"].items():
            s = e["seconds_per_step"]
            print(f"  {name:8s} ({e['layers']} layer{'s' if e['layers'] > 1 else ''}): "
                  f"dense {s['dense_all'] * 1e6:9.1f} us  gathered+sdpa {s['sdpa_gathered'] * 1e6:9.1f} us  "
                  f"pruned {s['pruned'] * 1e6:9.1f} us  -> {e['speedup_vs_dense']:.2f}x vs dense, "
                  f"{e['speedup_vs_gathered']:.2f}x vs gathered (max err {e['max_abs_err_vs_reference']:.2e})")
            if "speedup_vs_dense_compiled" in e:
                print(f"      compiled step: dense {s['dense_all_compiled'] * 1e6:9.1f} us  pruned "
                      f"{s['pruned_compiled'] * 1e6:9.1f} us  -> {e['speedup_vs_dense_compiled']:.2f}x")
            for k, p in e["phases_seconds_per_step"].items():
                print(f"      {k:18s} python build {p['build'] * 1e6:7.1f} us  encode {p['encode'] * 1e6:7.1f} us"
                      f"  until done {p['total'] * 1e6:7.1f} us")
            if "gpu_kernel_speedup_vs_dense" in e:
                print(f"      GPU kernel time: pruned {e['gpu_kernel_speedup_vs_dense']:.2f}x faster than dense")
            for k, g in e.get("gpu_kernel_time", {}).items():
                if "error" in g:
                    continue
                print(f"      GPU kernels {k:18s} {g['seconds_per_step'] * 1e6:9.1f} us "
                      f"({g['kernels_per_step']:.1f} kernels per step)")
            for k, t in e.get("sweep_seconds_per_step", {}).items():
                print(f"      {k:28s} " + (f"{t * 1e6:9.1f} us" if isinstance(t, float) else t))
            for k, t in e.get("sweep_gpu_kernel_time", {}).items():
                print(f"      {k:28s} GPU kernels {t * 1e6:9.1f} us")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "pruned_attention.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
