"""What one forward of T rows (T = 1..9) costs after a growing cache, as drafted decoding runs it.

Drafted decoding (prompt lookup, early exit, a draft model, M2R2) verifies a draft with one
forward of ``1 + d`` rows appended after everything cached, then trims the rejected rows. This
times exactly that pattern: a ``--prompt-tokens`` prefill of random token ids, then ``--steps``
forwards whose row count cycles through 1..9, each followed by trimming all but one row, so the
cache grows by one slot a step and every step meets a key length it has not seen. The whole
sequence runs twice on fresh caches (``pass0``: every (rows, key length) pair new to the process;
``pass1``: the same pairs again). Printed per row count: the median and the first forward's time,
in milliseconds, synchronised after each forward.

    python benchmarks/verify_cost.py [--model DIR] [--dequantize] [--json]
    MLXEFF_FEW_ROWS=0 python benchmarks/verify_cost.py ...   # MLX's own attention for 2+ rows

``--dequantize`` replaces affine-quantized layers by their dense weights (float16 on a GPU,
float32 on the CPU) first. ``--prefill-lengths 480,496,...`` also prefills each listed prompt
length twice on fresh caches (a user's first prompt of a length against a repeat of it).
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

import mlxeff.models.attention as attention  # noqa: E402
from mlxeff.cache import trim_cache  # noqa: E402
from mlxeff.errors import MlxeffError  # noqa: E402
from mlxeff.io import load_model  # noqa: E402

DEFAULT_MODEL = ROOT / "mlxeff" / "assets" / "default"
MAX_ROWS = 9


def random_ids(model, rng, n: int) -> mx.array:
    """(1, n) random token ids within the model's vocabulary (below 4000, above the first few)."""
    high = min(4000, model.args.vocab_size)
    return mx.array(rng.integers(min(5, high - 1), high, size=(1, n)), dtype=mx.uint32)


def one_pass(model, rng, prompt_tokens: int, steps: int) -> dict:
    def ids(n):
        return random_ids(model, rng, n)

    cache = model.make_cache()
    tic = time.perf_counter()
    mx.eval(model(ids(prompt_tokens), cache=cache))
    prefill = time.perf_counter() - tic
    per_rows = {T: [] for T in range(1, MAX_ROWS + 1)}
    start = time.perf_counter()
    for step in range(steps):
        T = 1 + step % MAX_ROWS
        tic = time.perf_counter()
        mx.eval(model(ids(T), cache=cache))
        per_rows[T].append(time.perf_counter() - tic)
        if T > 1:
            trim_cache(cache, T - 1)
    return {"prefill_s": prefill, "total_s": time.perf_counter() - start,
            "median_ms": {T: round(1e3 * statistics.median(v), 3) for T, v in per_rows.items() if v},
            "first_ms": {T: round(1e3 * v[0], 3) for T, v in per_rows.items() if v}}


def prefill_lengths(model, rng, lengths) -> dict:
    """Each prompt length prefilled twice on fresh caches: the first meets the length new, the
    second again (MLX's CUDA attention builds a cuDNN graph per new shape)."""
    first, again = [], []
    for n in lengths:
        x = random_ids(model, rng, n)
        for times in (first, again):
            tic = time.perf_counter()
            mx.eval(model(x, cache=model.make_cache()))
            times.append(time.perf_counter() - tic)
    return {"lengths": list(lengths), "first_ms": [round(1e3 * t, 3) for t in first],
            "again_ms": [round(1e3 * t, 3) for t in again],
            "median_first_ms": round(1e3 * statistics.median(first), 3),
            "median_again_ms": round(1e3 * statistics.median(again), 3)}


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def positive_ints(text: str) -> list:
    """Comma-separated positive integers (an empty string: none)."""
    return [positive_int(t) for t in text.split(",")] if text else []


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--dequantize", action="store_true", help="dense weights instead of affine ones")
    p.add_argument("--prompt-tokens", type=positive_int, default=512)
    p.add_argument("--steps", type=positive_int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-lengths", type=positive_ints, default=[],
                   help="also prefill these prompt lengths (comma-separated), each twice")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        model = load_model(args.model)
    except MlxeffError as e:
        raise SystemExit(f"error: {e}")
    if args.dequantize:
        from mlxeff.quant.affine import dequantize_affine

        dequantize_affine(model, mx.float16 if mx.default_device() == mx.gpu else mx.float32)
    mx.eval(model.parameters())
    rng = np.random.default_rng(args.seed)
    out = {"device": str(mx.default_device()), "mlx": mx.__version__, "model": str(args.model),
           "dequantized": args.dequantize, "few_rows": attention.FEW_ROWS,
           "passes": [one_pass(model, rng, args.prompt_tokens, args.steps) for _ in range(2)]}
    if args.prefill_lengths:
        out["prefill"] = prefill_lengths(model, rng, args.prefill_lengths)
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['device']}, MLX {out['mlx']}, few-rows route up to {out['few_rows']} rows")
    for i, r in enumerate(out["passes"]):
        cells = "  ".join(f"{T}:{ms:.2f}" for T, ms in r["median_ms"].items())
        print(f"pass {i}: median ms by rows  {cells}")
    if "prefill" in out:
        r = out["prefill"]
        print(f"prefill of {len(r['lengths'])} new lengths: median {r['median_first_ms']:.2f} ms, "
              f"the same lengths again {r['median_again_ms']:.2f} ms")


if __name__ == "__main__":
    main()
