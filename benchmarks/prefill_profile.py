"""Host-side profile of LazyLLM's prefill against the plain one (cProfile, 20 prefills each).

On a GPU this model's prefill is bound by host work and launches; the profile shows where the
host's time goes: building the graph (the model's Python calls), the blocking reads that wait for
the GPU (``numpy.array`` of the importance, once per pruning stage), and the final evaluation.
The default model, LazyLLM 1 -> 0.9 (chunks of 2,048 tokens, pruned stages likewise) and the
engine's ``ChunkedPrefill(2048)``, random prompt ids, two warm-up runs of each first.

    python benchmarks/prefill_profile.py [TOKENS]
"""

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlxeff  # noqa: E402
from mlxeff.engine import ChunkedPrefill  # noqa: E402
from mlxeff.precision import apply_compute_dtype  # noqa: E402
from mlxeff.techniques.lazyllm import LazyPrefill, LazySchedule  # noqa: E402

model, _ = mlxeff.load(str(Path(__file__).resolve().parents[1] / "mlxeff" / "assets" / "default"))
apply_compute_dtype(model, "auto")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
prompt = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, n), dtype=mx.uint32)
pre = LazyPrefill(LazySchedule(1.0, 0.9), 2048, 2048)


def run_lazy():
    c = pre.make_cache(model)
    mx.eval(pre(model, prompt, c), c.arrays())


def run_plain():
    c = model.make_cache()
    mx.eval(ChunkedPrefill(2048)(model, prompt, c), [x.state for x in c])


for f in (run_lazy, run_plain, run_lazy, run_plain):
    f()
for name, f in (("lazy", run_lazy), ("plain", run_plain)):
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(20):
        f()
    pr.disable()
    wall = (time.perf_counter() - t0) / 20
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(f"==== {name} {n}: {1e3 * wall:.2f} ms per prefill (under the profiler)")
    print(s.getvalue()[:6000])
