"""What validation costs when loading: ``mlxeff.load_model`` with and without the value check,
and the header/config validation alone, side by side in one process.

    python benchmarks/load_check.py --size 270M --dtype float16 --trials 7

Builds a randomly initialised OpenELM of ``--size`` once (in ``--workdir``, default a temporary
folder), then alternates loads with ``check_values=True`` and ``False`` after a warm-up of each
(the file is in the page cache: this is the worst case for the check's relative cost), and times
the validation steps that run before any tensor data is read, and the value check alone on an
already loaded model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import mlxeff  # noqa: E402
import mlxeff.io as io  # noqa: E402
from mlxeff.models import Model, openelm_config  # noqa: E402
from mlxeff.values import check_weights  # noqa: E402

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def timed(fn) -> float:
    t = time.perf_counter()
    out = fn()
    del out
    mx.clear_cache()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="270M", help="an OpenELM size: 270M, 450M, 1_1B, 3B")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--workdir", default=None)
    opts = ap.parse_args(argv)

    work = Path(opts.workdir or tempfile.mkdtemp(prefix="mlxeff-load-check-"))
    path = work / f"openelm-{opts.size}-{opts.dtype}"
    if not path.exists():
        model = Model(openelm_config(opts.size))
        model.set_dtype(DTYPES[opts.dtype])
        mx.eval(model.parameters())
        mlxeff.save(model, None, path)
        del model
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))

    loaded = io.load_model(path, check_values=False)
    runs = {"checked": lambda: io.load_model(path), "unchecked": lambda: io.load_model(path, check_values=False),
            "validation before reading": lambda: io.check_directory(path),
            "value check alone": lambda: check_weights(loaded, path)}
    for fn in runs.values():
        timed(fn)
    times = {k: [] for k in runs}
    for _ in range(opts.trials):
        for k, fn in runs.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {path.name}: {size / 1e6:,.0f} MB of weights, backend {mx.default_device()}, "
          f"{opts.trials} trials each (median)")
    for k, v in med.items():
        print(f"  {k:28s} {v * 1e3:8.1f} ms   (all: {', '.join(f'{t * 1e3:.0f}' for t in times[k])})")
    print(f"  value check: +{(med['checked'] - med['unchecked']) * 1e3:.0f} ms, "
          f"checked/unchecked = {med['checked'] / med['unchecked']:.2f}; alone "
          f"{med['value check alone'] / med['unchecked'] * 100:.1f}% of an unchecked load")
    print(f"  validation before reading: {med['validation before reading'] / med['unchecked'] * 100:.1f}% "
          "of an unchecked load")


if __name__ == "__main__":
    main()
