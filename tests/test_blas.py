"""The fast CPU path: which BLAS MLX runs, the re-launch with OpenBLAS, and the hint without it.

Each case runs a small script in a subprocess, since the re-launch replaces the process. The
search is pinned with MLXEFF_OPENBLAS_SEARCH, so a distribution OpenBLAS on the test machine
neither helps nor hides anything: "pip" is the wheel that ``pip install`` brings on Linux x86-64.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlxeff.cli import blas

linux_cpu_wheel = pytest.mark.skipif(not blas.reference_blas_bundled(),
                                     reason="needs MLX's Linux CPU wheel (its bundled reference BLAS)")
pip_openblas = pytest.mark.skipif(blas.pip_candidate() is None,
                                  reason=f"the {blas.PIP_PACKAGE} wheel is not installed")

# Relaunch if possible, then report what runs and how the process looks from the inside.
PROBE = textwrap.dedent("""
    import json, os, sys
    print(json.dumps({"pid": os.getpid()}), file=sys.stderr, flush=True)
    from mlxeff.cli import blas
    blas.restore_environment()
    blas.relaunch_with_openblas()
    blas.relaunch_with_openblas()  # a second call in the re-launched process must not loop
    import numpy as np
    import mlx.core as mx
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200), dtype=np.float32)
    b = rng.standard_normal((200, 100), dtype=np.float32)
    c = np.array(mx.array(a) @ mx.array(b))
    maps = open("/proc/self/maps").read()
    print(json.dumps({
        "pid": os.getpid(), "argv": sys.argv[1:], "stdin": sys.stdin.read(),
        "info": blas.blas_info(), "summary": blas.blas_summary(),
        "env": {k: os.environ.get(k) for k in ("LD_PRELOAD", "LD_LIBRARY_PATH", blas.RELAUNCHED)},
        "max_error": float(np.abs(c - a.astype(np.float64) @ b.astype(np.float64)).max()),
        "gfortran": sorted({l.split()[-1] for l in maps.splitlines() if "gfortran" in l}),
    }))
    sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
""")


def run_probe(tmp_path, search, *args, stdin="", **env):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    full = {k: v for k, v in os.environ.items() if k not in (blas.NO_OPENBLAS, blas.NO_HINT, "LD_PRELOAD")}
    full.update({blas.SEARCH: search, "TMPDIR": str(tmp_path)}, **env)
    proc = subprocess.run([sys.executable, str(script), *args], input=stdin, capture_output=True, text=True,
                          env=full, timeout=120)
    lines = proc.stderr.splitlines()
    pids = [json.loads(l)["pid"] for l in lines if l.startswith('{"pid"')]
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc, out, pids, [l for l in lines if not l.startswith('{"pid"')]


def alias_dirs(tmp_path):
    return [p.name for p in tmp_path.iterdir() if p.name.startswith("mlxeff-blas-")]


@linux_cpu_wheel
@pip_openblas
def test_relaunch_uses_pip_openblas_transparently(tmp_path):
    proc, out, pids, other = run_probe(tmp_path, "pip", "x", "two words", "--flag", stdin="from stdin\n",
                                       PROBE_EXIT="3")
    assert proc.returncode == 3, proc.stderr
    # the same process (execve), started twice, with the arguments and standard input intact
    assert len(pids) == 2 and pids[0] == pids[1] == out["pid"]
    assert out["argv"] == ["x", "two words", "--flag"] and out["stdin"] == "from stdin\n"
    info = out["info"]
    assert info["fast"] and info["name"].startswith("OpenBLAS") and "ngsolve_openblas" in info["library"]
    assert info["source"] == f"pip package {blas.PIP_PACKAGE}"
    assert out["summary"].startswith("OpenBLAS") and blas.PIP_PACKAGE in out["summary"]
    # the Fortran runtime is the copy MLX's wheel bundles, not the distribution's
    assert out["gfortran"] and all(".libs/" in p for p in out["gfortran"]), out["gfortran"]
    # the user's environment is back for child processes, the alias directory gone
    assert out["env"] == {"LD_PRELOAD": None, "LD_LIBRARY_PATH": None, blas.RELAUNCHED: None}
    assert alias_dirs(tmp_path) == []
    assert out["max_error"] < 1e-3
    assert other == [], other  # no hint, nothing else on stderr


@linux_cpu_wheel
@pip_openblas
def test_relaunch_keeps_the_users_preload_and_library_path(tmp_path):
    empty = tmp_path / "lib"
    empty.mkdir()
    proc, out, pids, _ = run_probe(tmp_path, "pip", LD_LIBRARY_PATH=str(empty))
    assert proc.returncode == 0, proc.stderr
    assert len(pids) == 2 and out["info"]["fast"]
    assert out["env"]["LD_LIBRARY_PATH"] == str(empty) and out["env"]["LD_PRELOAD"] is None


@linux_cpu_wheel
def test_no_openblas_prints_one_hint_and_runs_on(tmp_path):
    proc, out, pids, other = run_probe(tmp_path, "")
    assert proc.returncode == 0, proc.stderr
    assert len(pids) == 1  # not re-launched
    assert other == [blas.HINT]
    assert "pip install ngsolve-openblas" in blas.HINT and blas.NO_HINT in blas.HINT
    assert out["info"] == {"name": "reference BLAS bundled with MLX", "library": None,
                           "source": "no OpenBLAS found", "fast": False}
    assert out["max_error"] < 1e-3


@linux_cpu_wheel
def test_hint_and_relaunch_opt_outs(tmp_path):
    proc, out, pids, other = run_probe(tmp_path, "", **{blas.NO_HINT: "1"})
    assert proc.returncode == 0 and other == [] and len(pids) == 1
    proc, out, pids, other = run_probe(tmp_path, "pip", **{blas.NO_OPENBLAS: "1"})
    assert proc.returncode == 0 and other == [] and len(pids) == 1
    assert out["info"]["source"] == f"{blas.NO_OPENBLAS}=1" and not out["info"]["fast"]


@linux_cpu_wheel
def test_a_library_that_cannot_load_is_skipped(tmp_path):
    """A candidate whose preload would kill the process at start is vetted out: no re-launch,
    no alias directory left behind, the hint instead."""
    fake = tmp_path / "libopenblas.so.0"
    fake.write_bytes(b"not an ELF file")
    proc, out, pids, other = run_probe(tmp_path, str(fake))
    assert proc.returncode == 0, proc.stderr
    assert len(pids) == 1 and other == [blas.HINT]
    assert not out["info"]["fast"]
    assert alias_dirs(tmp_path) == []


def test_candidates_follow_the_search_variable(monkeypatch, tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    monkeypatch.setenv(blas.SEARCH, "")
    assert blas.candidates() == []
    monkeypatch.setenv(blas.SEARCH, os.pathsep.join([str(tmp_path / "missing.so"), str(lib)]))
    assert [c.library for c in blas.candidates()] == [str(lib)]
    monkeypatch.setenv(blas.SEARCH, "pip")
    pip = blas.pip_candidate()
    assert blas.candidates() == ([pip] if pip else [])


def test_in_process_main_never_relaunches(monkeypatch):
    """A caller that rewrote sys.argv (main() run inside another program) is not re-executed."""
    monkeypatch.delenv(blas.NO_OPENBLAS, raising=False)
    monkeypatch.setenv(blas.SEARCH, "pip")
    monkeypatch.setattr(sys, "argv", ["mlxeff", "eval", "--bogus"])
    called = []
    monkeypatch.setattr(os, "execve", lambda *a: called.append(a))
    blas.relaunch_with_openblas(hint=False)
    assert called == []


@linux_cpu_wheel
@pip_openblas
def test_eval_and_generate_state_the_blas_that_ran(saved_dir, tmp_path):
    """As a user runs them: the pip OpenBLAS, stated on stderr after the results (stdout stays one
    JSON object); the same perplexity as the reference BLAS to float32 rounding."""
    import gzip

    from conftest import TEXT

    path, _ = saved_dir
    text = tmp_path / "text.txt.gz"
    text.write_bytes(gzip.compress(TEXT.encode()))
    base = {k: v for k, v in os.environ.items() if k not in (blas.NO_OPENBLAS, "LD_PRELOAD")}

    def mlxeff(*args, **env):
        p = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", *map(str, args)], capture_output=True,
                           text=True, timeout=180, env={**base, blas.SEARCH: "pip", **env})
        assert p.returncode == 0, p.stderr
        return p.stdout, p.stderr.splitlines()

    args = ("eval", path, "--perplexity", text, "--window", 32, "--stride", 16, "--json")
    fast_out, fast_err = mlxeff(*args)
    slow_out, slow_err = mlxeff(*args, **{blas.NO_OPENBLAS: "1"})
    assert fast_err[-1].startswith("cpu blas: OpenBLAS") and blas.PIP_PACKAGE in fast_err[-1], fast_err
    assert slow_err[-1] == f"cpu blas: reference BLAS bundled with MLX ({blas.NO_OPENBLAS}=1)", slow_err
    assert json.loads(fast_out)["ppl"] == pytest.approx(json.loads(slow_out)["ppl"], rel=1e-4)
    out, err = mlxeff("generate", "Once upon", "--model", path, "--max-tokens", 3, "--json")
    assert json.loads(out)["generation_tokens"] >= 1
    assert err[-1].startswith("cpu blas: OpenBLAS"), err


def test_relaunch_benchmark_only_on_the_cpu(monkeypatch):
    """Benchmark scripts re-launch with OpenBLAS (no hint) and restore the environment on the CPU
    backend; on a GPU they do nothing."""
    import mlx.core as mx

    calls = []
    monkeypatch.setattr(blas, "relaunch_with_openblas", lambda hint=True: calls.append(("relaunch", hint)))
    monkeypatch.setattr(blas, "restore_environment", lambda: calls.append(("restore",)))
    blas.relaunch_benchmark()
    assert calls == [("relaunch", False), ("restore",)]
    calls.clear()
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    blas.relaunch_benchmark()
    assert calls == []
    blas.relaunch_benchmark(on_cpu=True)  # a script that picks the CPU by a flag
    assert calls == [("relaunch", False), ("restore",)]
