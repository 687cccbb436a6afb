"""What a decode step and a verify forward cost on MLX's CPU backend, by part, and why.

Drafted decoding (prompt lookup, early exit, M2R2) pays off when a forward of 1 + d rows costs
little more than a one-row step. On the CPU it does not: this measures, for the default model
with ``--context`` tokens cached, one layer's forward and its attention (``mx.fast.
scaled_dot_product_attention``, MLX's CPU attention) at 1, 2, 4 and 8 query rows, and, beside it,
the per-element cost of the elementwise operations a softmax is made of (MLX's ``exp`` against
its ``multiply`` and numpy's ``exp`` on the same array). Medians of ``--trials`` timings, each an
evaluation of its own.

    python benchmarks/cpu_attention_cost.py [--context 1100] [--json]

On the CPU it re-launches itself with OpenBLAS preloaded, as the ``mlxeff`` command does.
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

from mlxeff.engine import ChunkedPrefill  # noqa: E402
from mlxeff.models.lws import create_attention_mask  # noqa: E402
from mlxeff.precision import apply_compute_dtype  # noqa: E402


def median_ms(fn, trials: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(trials):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def elementwise_ns(n: int, trials: int) -> dict:
    """Nanoseconds per element of MLX's exp and multiply and numpy's exp, on n float32 values."""
    x = mx.random.normal((n,))
    mx.eval(x)
    host = np.array(x)
    return {"mlx_exp": median_ms(lambda: mx.eval(mx.exp(x)), trials) * 1e6 / n,
            "mlx_multiply": median_ms(lambda: mx.eval(x * 1.5), trials) * 1e6 / n,
            "numpy_exp": median_ms(lambda: np.exp(host), trials) * 1e6 / n}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="mlxeff model directory (default: the embedded model)")
    ap.add_argument("--context", type=int, default=1100, help="tokens in the cache")
    ap.add_argument("--layer", type=int, default=None, help="the layer timed (default: the middle one)")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.context < 2 or args.trials < 1:
        raise SystemExit("error: --context must be at least 2 tokens and --trials at least 1")

    import mlxeff
    from mlxeff.io import resolve_model_dir

    mx.set_default_device(mx.cpu)
    model, _ = mlxeff.load(resolve_model_dir(args.model))
    apply_compute_dtype(model, "auto")
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    prompt = mx.array(rng.integers(0, model.args.vocab_size, args.context), dtype=mx.uint32)
    mx.eval(ChunkedPrefill()(model, prompt, cache))
    li = len(model.layers) // 2 if args.layer is None else args.layer
    if not 0 <= li < len(model.layers):
        raise SystemExit(f"error: --layer {li}: the model has layers 0..{len(model.layers) - 1}")
    layer, c = model.layers[li], cache[li]
    attn = layer.attn
    keys, values = mx.array(c.keys[:, :, : c.offset]), mx.array(c.values[:, :, : c.offset])
    mx.eval(keys, values)
    rows = {}
    for T in (1, 2, 4, 8):
        x = mx.random.normal((1, T, model.args.model_dim))
        q = mx.random.normal((1, attn.n_heads, T, attn.head_dim))
        mx.eval(x, q)

        def forward(x=x, T=T):
            mx.eval(layer(x, create_attention_mask(x, c), c))
            c.trim(T)

        def attention(q=q, T=T):
            mx.eval(mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale,
                                                         mask="causal" if T > 1 else None))

        rows[T] = {"layer_ms": median_ms(forward, args.trials), "attention_ms": median_ms(attention, args.trials),
                   "softmax_elements": attn.n_heads * T * c.offset}
    ew = elementwise_ns(attn.n_heads * 8 * c.offset, args.trials)
    report = {"device": str(mx.default_device()), "mlx": mx.__version__, "context": c.offset, "layer": li,
              "heads": [attn.n_heads, attn.n_kv_heads], "rows": rows, "elementwise_ns_per_element": ew}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"layer {li} of {len(model.layers)}, {c.offset} tokens cached, heads {attn.n_heads}/{attn.n_kv_heads}")
    for T, r in rows.items():
        print(f"  {T} rows: layer {r['layer_ms']:.3f} ms, attention {r['attention_ms']:.3f} ms "
              f"({r['softmax_elements']} scores)")
    print("  ns per element: " + ", ".join(f"{k} {v:.2f}" for k, v in ew.items()))


if __name__ == "__main__":
    from mlxeff.cli.blas import relaunch_benchmark

    relaunch_benchmark(on_cpu=True)
    main()
