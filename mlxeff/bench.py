"""``mlxeff bench``: prompt-processing and generation speed on this machine, llama-bench style.

For each model and technique combination, each test runs through the generation engine
(``mlxeff.engine.generate_step``, with the hooks the registry builds, as ``mlxeff generate`` runs
them), once to warm up and then ``reps`` times:

- ``ppN``: a prompt of N random token ids is processed and the first token sampled; tokens per
  second = N / time to first token (the TTFT is reported too);
- ``tgM``: M tokens are generated after a one-token prompt; tokens per second over the M - 1
  decode steps (the first token comes from the prompt). End-of-sequence tokens do not stop it, as
  in llama-bench.

Each row gives the mean and sample standard deviation over the repetitions, and with a drafter the
tokens accepted per forward. Every run uses the same seeded prompts, so combinations are compared
on equal input. The machine, backend, BLAS and versions are reported with the numbers. Output:
a markdown table, JSON, CSV and a PNG plot (matplotlib, headless).

Names follow llama-bench (``pp512``, ``tg128``, ``-p``, ``-n``, ``-r``); sampling is greedy.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .engine import ChunkedPrefill, DecodeStats, generate_step
from .errors import MlxeffError
from .progress import bar

BASELINE = "baseline"


@dataclass
class Combination:
    """A model (loaded) and the techniques to run it with."""

    model_label: str
    model: object
    techniques: Dict[str, dict]
    label: str = BASELINE
    model_dir: Optional[Path] = None
    params: int = 0
    size_bytes: int = 0


@dataclass
class Row:
    model: str
    params: int
    size_bytes: int
    techniques: str
    test: str
    n_prompt: int
    n_gen: int
    tps: List[float] = field(default_factory=list)
    ttft_s: List[float] = field(default_factory=list)
    tokens_per_forward: Optional[float] = None

    @property
    def tps_mean(self) -> float:
        return statistics.fmean(self.tps)

    @property
    def tps_std(self) -> float:
        return statistics.stdev(self.tps) if len(self.tps) > 1 else 0.0

    @property
    def ttft_ms_mean(self) -> float:
        return 1e3 * statistics.fmean(self.ttft_s)

    @property
    def ttft_ms_std(self) -> float:
        return 1e3 * statistics.stdev(self.ttft_s) if len(self.ttft_s) > 1 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tps_mean=self.tps_mean, tps_std=self.tps_std, ttft_ms_mean=self.ttft_ms_mean,
                 ttft_ms_std=self.ttft_ms_std)
        return d


@dataclass
class BenchResult:
    machine: Dict[str, str]
    rows: List[Row]
    settings: Dict[str, object] = field(default_factory=dict)


# ---- the machine ---------------------------------------------------------------------------------

def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def blas_in_use() -> str:
    """The BLAS library this process has loaded, where that can be seen."""
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for needle, name in (("libopenblas", "OpenBLAS"), ("libmkl", "MKL"), ("libblis", "BLIS")):
        if needle in maps:
            return name
    return "MLX's bundled BLAS" if "libmlx" in maps else "unknown"


def machine_info() -> Dict[str, str]:
    device = mx.default_device()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if device.type == mx.gpu:
        backend = "gpu (Metal)" if mx.metal.is_available() else "gpu (CUDA)"
    else:
        backend = "cpu"
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": str(info.get("device_name", platform.processor() or "unknown")),
        "cpu_count": str(os.cpu_count()),
        "backend": backend,
        "blas": blas_in_use() if device.type == mx.cpu else "n/a (GPU)",
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "mlxeff": _version("mlxeff"),
    }


def machine_line(m: Dict[str, str]) -> str:
    blas = f", BLAS {m['blas']}" if m["backend"] == "cpu" else ""
    return (f"{m['device']} ({m['machine']}, {m['cpu_count']} cores), {m['platform']}; backend "
            f"{m['backend']}{blas}; MLX {m['mlx']}, mlx-lm {m['mlx_lm']}, mlxeff {m['mlxeff']}, "
            f"Python {m['python']}")


# ---- measuring -------------------------------------------------------------------------------

def timed_run(combo: Combination, prompt: mx.array, max_tokens: int, step_size: int):
    """(time to first token, the times each token arrived, decode statistics) of one run."""
    from .techniques.registry import build_hooks

    model = combo.model
    hooks = build_hooks(model, combo.techniques, model_dir=combo.model_dir,
                        step_size=step_size) if combo.techniques else {}
    attention = hooks.pop("attention", None)
    hooks["prefill"] = hooks.get("prefill") or ChunkedPrefill(step_size)
    stats = DecodeStats()
    previous = model.set_attention(attention) if attention is not None else None
    try:
        times = []
        tic = time.perf_counter()
        for _token, _ in generate_step(prompt, model, max_tokens=max_tokens, stats=stats, **hooks):
            times.append(time.perf_counter())  # the token is a Python int: computed
    finally:
        if attention is not None:
            model.set_attention(previous)
    return times[0] - tic, times, stats


def run_bench(combos: Sequence[Combination], prompt_sizes: Sequence[int], gen_sizes: Sequence[int],
              reps: int = 5, step_size: Optional[int] = None, seed: int = 0,
              say: Callable[[str], None] = lambda s: None) -> BenchResult:
    """Every test of every combination: a warm-up run, then ``reps`` timed runs (``step_size``:
    the prompt chunk length, None for the device's default)."""
    from .engine import prefill_step_size

    step_size = prefill_step_size(step_size)
    if reps < 1:
        raise MlxeffError(f"-r/--repetitions must be at least 1, got {reps}")
    if any(n < 1 for n in prompt_sizes):
        raise MlxeffError(f"-p sizes must be at least 1, got {list(prompt_sizes)}")
    if any(n < 2 for n in gen_sizes):
        raise MlxeffError(f"-n sizes must be at least 2 (generation speed is timed between the "
                          f"first and the last token), got {list(gen_sizes)}")
    tests = [("pp", n) for n in prompt_sizes] + [("tg", n) for n in gen_sizes]
    if not tests:
        raise MlxeffError("nothing to run: give -p and/or -n sizes")
    rows = []
    with bar(len(combos) * len(tests) * (reps + 1), "bench", "run") as progress:
        for combo in combos:
            vocab = combo.model.args.vocab_size
            for kind, n in tests:
                rng = np.random.default_rng(seed + n)  # the same prompt for every combination
                length = n if kind == "pp" else 1
                prompt = mx.array(rng.integers(0, vocab, size=length), dtype=mx.uint32)
                max_tokens = 1 if kind == "pp" else n
                row = Row(combo.model_label, combo.params, combo.size_bytes, combo.label,
                          f"{kind}{n}", length, max_tokens)
                forwards = generated = 0
                for rep in range(reps + 1):
                    ttft, times, stats = timed_run(combo, prompt, max_tokens, step_size)
                    progress.update(1)
                    if rep == 0:
                        continue  # warm-up
                    row.ttft_s.append(ttft)
                    if kind == "pp":
                        row.tps.append(n / ttft)
                    else:
                        row.tps.append((len(times) - 1) / (times[-1] - times[0]))
                        forwards += stats.forwards
                        generated += stats.generated - 1  # tokens of decode forwards only
                if kind == "tg" and "drafter" in _hooks_of(combo):
                    row.tokens_per_forward = generated / forwards if forwards else 0.0
                rows.append(row)
                say(f"{combo.model_label} {combo.label} {row.test}: {row.tps_mean:.2f} ± "
                    f"{row.tps_std:.2f} tokens/s")
    return BenchResult(machine_info(), rows, dict(reps=reps, prefill_step_size=step_size, seed=seed))


def _hooks_of(combo: Combination) -> set:
    from .techniques.registry import get

    return {h for name in combo.techniques for h in get(name).hooks}


# ---- reports -----------------------------------------------------------------------------------

def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def to_markdown(result: BenchResult) -> str:
    head = ["model", "size", "params", "backend", "techniques", "test", "t/s", "TTFT ms", "tok/fwd"]
    lines = ["| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] * 4 + ["---", "---:", "---:", "---:", "---:"]) + " |"]
    for r in result.rows:
        ttft = f"{r.ttft_ms_mean:.2f} ± {r.ttft_ms_std:.2f}" if r.test.startswith("pp") else ""
        tpf = f"{r.tokens_per_forward:.2f}" if r.tokens_per_forward is not None else ""
        lines.append("| " + " | ".join([
            r.model, _size(r.size_bytes), _params(r.params), result.machine["backend"], r.techniques,
            r.test, f"{r.tps_mean:.2f} ± {r.tps_std:.2f}", ttft, tpf]) + " |")
    return f"machine: {machine_line(result.machine)}\n\n" + "\n".join(lines) + "\n"


CSV_FIELDS = ["model", "size_bytes", "params", "backend", "blas", "techniques", "test", "n_prompt",
              "n_gen", "reps", "tps_mean", "tps_std", "ttft_ms_mean", "ttft_ms_std",
              "tokens_per_forward", "tps_samples", "mlx", "mlxeff", "device"]


def to_csv(result: BenchResult) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    m = result.machine
    for r in result.rows:
        w.writerow({
            "model": r.model, "size_bytes": r.size_bytes, "params": r.params, "backend": m["backend"],
            "blas": m["blas"], "techniques": r.techniques, "test": r.test, "n_prompt": r.n_prompt,
            "n_gen": r.n_gen, "reps": len(r.tps), "tps_mean": f"{r.tps_mean:.6g}",
            "tps_std": f"{r.tps_std:.6g}", "ttft_ms_mean": f"{r.ttft_ms_mean:.6g}",
            "ttft_ms_std": f"{r.ttft_ms_std:.6g}",
            "tokens_per_forward": "" if r.tokens_per_forward is None else f"{r.tokens_per_forward:.6g}",
            "tps_samples": ";".join(f"{x:.6g}" for x in r.tps), "mlx": m["mlx"],
            "mlxeff": m["mlxeff"], "device": m["device"]})
    return out.getvalue()


def to_json(result: BenchResult) -> str:
    return json.dumps({"machine": result.machine, "settings": result.settings,
                       "rows": [r.to_dict() for r in result.rows]}, indent=2) + "\n"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MlxeffError("no such directory for the output", path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(result: BenchResult, path: Path) -> None:
    """A PNG: time to first token per prompt size (left) and tokens per second per test (right),
    one bar per combination, error bars one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    combos = list(dict.fromkeys(f"{r.model} / {r.techniques}" for r in result.rows))
    pp = [t for t in dict.fromkeys(r.test for r in result.rows) if t.startswith("pp")]
    tests = list(dict.fromkeys(r.test for r in result.rows))
    by = {(f"{r.model} / {r.techniques}", r.test): r for r in result.rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / max(1, len(combos))
    for ax, names, value, title in (
        (axes[0], pp, lambda r: (r.ttft_ms_mean, r.ttft_ms_std), "time to first token (ms)"),
        (axes[1], tests, lambda r: (r.tps_mean, r.tps_std), "tokens per second"),
    ):
        for i, c in enumerate(combos):
            xs, ys, es = [], [], []
            for j, t in enumerate(names):
                if (c, t) in by:
                    mean, std = value(by[(c, t)])
                    xs.append(j + (i - (len(combos) - 1) / 2) * width)
                    ys.append(mean)
                    es.append(std)
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=c)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        if not names:
            ax.text(0.5, 0.5, "no prompt-processing test", ha="center", transform=ax.transAxes)
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    m = result.machine
    fig.suptitle(f"mlxeff bench: {m['device']}, backend {m['backend']}"
                 + (f", BLAS {m['blas']}" if m["backend"] == "cpu" else "")
                 + f", MLX {m['mlx']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
