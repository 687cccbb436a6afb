"""Which BLAS MLX's CPU backend runs on Linux, and re-launching ``mlxeff`` with OpenBLAS.

MLX's Linux CPU wheel (``mlx[cpu]``) links the reference (netlib) BLAS and LAPACK it bundles: a
float32 matmul ran 15-38x faster with OpenBLAS on a 2-core x86-64 VM (benchmarks/RESULTS.md,
"Fast CPU path"). libmlx resolves ``cblas_sgemm`` and the LAPACK routines
through the global symbol scope first, so an OpenBLAS in ``LD_PRELOAD`` takes over every call; the
loader reads that variable only when a process starts, hence the re-launch (``os.execve``: same
process id, arguments, standard streams and exit status).

Where the OpenBLAS comes from, first found wins:

1. ``MLXEFF_OPENBLAS_SEARCH``, when set: library files separated by ``os.pathsep``, the word
   ``pip`` standing for the wheel below (for packagers and tests; empty searches nothing).
2. The ``ngsolve-openblas`` wheel, a dependency on Linux x86-64: OpenBLAS built with DYNAMIC_ARCH
   (kernels chosen for the CPU at run time) and with standard, unprefixed symbols. It links
   ``libgfortran.so.5``, which a machine without the distribution's Fortran runtime lacks; MLX's
   own wheel bundles one (``mlx_cpu.libs``, renamed by auditwheel), so the re-launch points the
   loader at it through a private directory of symbolic links that the new process removes as
   soon as it starts.
3. The distribution's OpenBLAS (Debian/Ubuntu ``libopenblas0-pthread``, Fedora ``openblas``).

Choices: scipy-openblas32/64 wheels prefix their symbols (``scipy_cblas_sgemm``) and cannot stand
in without a compiled shim; cmeel-openblas is built for one CPU (SKYLAKEX on x86-64, NEOVERSEN2
on aarch64) and would stop with an illegal instruction elsewhere. A library the loader cannot
load with its dependencies would kill the re-launched process before Python starts, so a trial
start of the interpreter with the same environment (~15 ms) vets each candidate first.
Results agree with the reference BLAS to float32 rounding (summation order differs), not bit for bit.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional

NO_OPENBLAS = "MLXEFF_NO_OPENBLAS"  # "1": never re-launch (and no hint)
NO_HINT = "MLXEFF_NO_BLAS_HINT"  # "1": no hint line when only the slow BLAS is found
SEARCH = "MLXEFF_OPENBLAS_SEARCH"  # overrides the candidate list (see the module docstring)
RELAUNCHED = "MLXEFF_BLAS_RELAUNCH"  # set for the re-launched process only; it restores the rest

PIP_PACKAGE = "ngsolve-openblas"
SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)
HINT = (f"hint: MLX runs matrix products on its bundled reference BLAS here, many times slower than "
        f"OpenBLAS; `pip install {PIP_PACKAGE}` (Linux x86-64) or `apt-get install libopenblas0-pthread` "
        f"and mlxeff uses it ({NO_HINT}=1 hides this line)")


@dataclass
class Candidate:
    library: str  # the OpenBLAS shared library to preload
    source: str  # where it comes from, for the summary line
    fortran_runtime: Optional[str] = None  # a libgfortran.so.5 (under another name) to alias


# --- finding an OpenBLAS ----------------------------------------------------------------------

def _site_dirs(package: str) -> List[str]:
    """Directories holding ``package`` (found without importing it)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [str(p) for p in spec.submodule_search_locations]
    return [os.path.dirname(spec.origin)] if spec.origin else []


def bundled_libs(pattern: str) -> List[str]:
    """Files matching ``pattern`` among the libraries MLX's and NumPy's wheels bundle (``*.libs``)."""
    found = []
    for package in ("mlx", "numpy"):
        for d in _site_dirs(package):
            found += sorted(glob.glob(os.path.join(os.path.dirname(d), f"{package}*.libs", pattern)))
    return found


def reference_blas_bundled() -> bool:
    """Whether the installed MLX is the Linux CPU wheel that links its own reference BLAS."""
    return sys.platform == "linux" and bool([p for p in bundled_libs("libblas*.so*") if "mlx" in p])


def pip_candidate() -> Optional[Candidate]:
    """The ``ngsolve-openblas`` wheel's library, with a Fortran runtime from MLX's (or NumPy's) wheel."""
    for d in _site_dirs("ngsolve_openblas"):
        libs = sorted(glob.glob(os.path.join(d, "libopenblas*.so*")))
        if libs:
            runtimes = bundled_libs("libgfortran*.so.5*")
            return Candidate(libs[0], f"pip package {PIP_PACKAGE}", runtimes[0] if runtimes else None)
    return None


def candidates() -> List[Candidate]:
    """OpenBLAS libraries to try, in order (see the module docstring)."""
    spec = os.environ.get(SEARCH)
    entries = spec.split(os.pathsep) if spec is not None else ["pip", *SYSTEM_CANDIDATES]
    found = []
    for entry in filter(None, entries):
        if entry == "pip":
            c = pip_candidate()
            if c is not None:
                found.append(c)
        elif os.path.isfile(entry):
            found.append(Candidate(entry, "system" if spec is None else entry))
    return found


# --- the re-launch ----------------------------------------------------------------------------

def _join(*parts: Optional[str]) -> str:
    return ":".join(p for p in parts if p)


def _alias_dir(runtime: str) -> str:
    """A private directory where ``libgfortran.so.5`` names ``runtime`` (and its bundled siblings,
    found through the ``$ORIGIN`` run path of a renamed wheel library, are linked too)."""
    d = tempfile.mkdtemp(prefix="mlxeff-blas-")
    os.symlink(runtime, os.path.join(d, "libgfortran.so.5"))
    for sibling in glob.glob(os.path.join(os.path.dirname(runtime), "lib*.so*")):
        name = os.path.basename(sibling)
        if not name.startswith(("libblas", "liblapack", "libopenblas")):
            os.symlink(sibling, os.path.join(d, name))
    return d


def launch_environment(candidate: Candidate) -> dict:
    """The environment of a process that runs with ``candidate`` preloaded."""
    env = dict(os.environ)
    alias = _alias_dir(candidate.fortran_runtime) if candidate.fortran_runtime else None
    env[RELAUNCHED] = json.dumps({
        "library": candidate.library, "source": candidate.source, "alias_dir": alias,
        "LD_PRELOAD": os.environ.get("LD_PRELOAD"), "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH"),
    })
    env["LD_PRELOAD"] = _join(candidate.library, os.environ.get("LD_PRELOAD"))
    if alias:
        env["LD_LIBRARY_PATH"] = _join(alias, os.environ.get("LD_LIBRARY_PATH"))
    return env


def _remove_alias_dir(path: Optional[str]) -> None:
    """Remove an alias directory: its symbolic links, then the (then empty) directory itself."""
    if not path or not os.path.basename(path).startswith("mlxeff-blas-"):
        return
    try:
        for entry in os.scandir(path):
            if entry.is_symlink():
                os.unlink(entry.path)
        os.rmdir(path)
    except OSError:
        pass


def _discard(env: dict) -> None:
    _remove_alias_dir(json.loads(env[RELAUNCHED]).get("alias_dir"))


def _loads(env: dict) -> bool:
    """Whether a process starts with this environment and the loader complains of nothing: a
    missing dependency of a preloaded library is fatal, an unloadable library only a warning."""
    try:
        p = subprocess.run([sys.executable, "-S", "-I", "-c", ""], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return p.returncode == 0 and not p.stderr.strip()


_relaunch_info: Optional[dict] = None  # what the launch recorded, in a re-launched process
_hinted = False  # the hint is printed once per process


def user_preloaded_openblas() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def relaunch_with_openblas(hint: bool = True) -> None:
    """On Linux, run this command again with OpenBLAS preloaded (os.execve: no return).

    Returns (without re-launching) off Linux, for the re-launched process itself, with
    ``MLXEFF_NO_OPENBLAS=1``, when OpenBLAS is preloaded already, and when none loads; in the last
    case, if MLX's CPU wheel is what runs, prints one hint line to stderr (unless ``hint`` is false
    or ``MLXEFF_NO_BLAS_HINT=1``).
    """
    if sys.platform != "linux" or os.environ.get(NO_OPENBLAS):
        return
    if RELAUNCHED in os.environ or _relaunch_info is not None:  # this process is the re-launch
        return
    if user_preloaded_openblas():
        return
    # orig_argv repeats the interpreter's own flags (-P, -m ...) exactly as the user gave them; a
    # caller that rewrote sys.argv (a test running main() in-process) is not what it would re-run.
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if len(sys.argv) > 1 and argv[len(argv) - len(sys.argv) + 1:] != sys.argv[1:]:
        return
    for candidate in candidates():
        env = launch_environment(candidate)
        if not _loads(env):
            _discard(env)
            continue
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, argv, env)
        except OSError:
            _discard(env)
            return
    global _hinted
    if hint and not _hinted and not os.environ.get(NO_HINT) and reference_blas_bundled():
        print(HINT, file=sys.stderr, flush=True)
        _hinted = True


def relaunch_benchmark(on_cpu: Optional[bool] = None) -> None:
    """For a benchmark script: when it computes on MLX's CPU backend (``on_cpu``; None: the default
    device is the CPU), run it again with OpenBLAS preloaded as the ``mlxeff`` command does (no
    hint line), then give child processes the user's environment back. A preload the user gave is
    kept; otherwise nothing happens."""
    if on_cpu is None:
        import mlx.core as mx

        on_cpu = mx.default_device() == mx.cpu
    if not on_cpu:
        return
    relaunch_with_openblas(hint=False)
    restore_environment()


def child_environment() -> Optional[dict]:
    """The environment of a child Python process (a benchmark's run per device) with OpenBLAS
    preloaded as the re-launch would preload it; None where the re-launch would not happen. Pass
    the result to ``discard_child_environment`` when the child has finished."""
    if sys.platform != "linux" or os.environ.get(NO_OPENBLAS) or user_preloaded_openblas():
        return None
    for candidate in candidates():
        env = launch_environment(candidate)
        if _loads(env):
            return env
        _discard(env)
    return None


def discard_child_environment(env: Optional[dict]) -> None:
    """Remove what ``child_environment`` created (the runtime alias directory)."""
    if env and RELAUNCHED in env:
        _discard(env)


def restore_environment() -> Optional[dict]:
    """In a re-launched process: put ``LD_PRELOAD``/``LD_LIBRARY_PATH`` back as the user had them
    (child processes see the user's environment) and remove the alias directory (the loader has
    opened its files already). Returns what the launch recorded, or None."""
    global _relaunch_info
    raw = os.environ.pop(RELAUNCHED, None)
    if raw is None:
        return _relaunch_info
    try:
        info = json.loads(raw)
    except ValueError:
        info = {}
    _relaunch_info = info  # never re-launch twice, whatever the record held
    for var in ("LD_PRELOAD", "LD_LIBRARY_PATH"):
        if info.get(var) is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = info[var]
    _remove_alias_dir(info.get("alias_dir"))
    return info


# --- what runs --------------------------------------------------------------------------------

class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _global_provider(symbol: str) -> Optional[str]:
    """The file that provides ``symbol`` in the process's global scope (what libmlx binds first)."""
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p).value
        dladdr = process.dladdr
    except (AttributeError, OSError):
        return None
    info = _DlInfo()
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def blas_info() -> dict:
    """Which BLAS MLX's CPU backend calls in this process: ``name``, ``library``, ``source``,
    ``fast`` (False for the reference BLAS), and for OpenBLAS its ``config`` and ``threads``."""
    if sys.platform == "darwin":
        return {"name": "Accelerate", "library": None, "source": "macOS", "fast": True}
    if sys.platform != "linux":
        return {"name": "unknown", "library": None, "source": None, "fast": False}
    library = _global_provider("cblas_sgemm")
    if library is None:
        if not reference_blas_bundled():
            return {"name": "unknown", "library": None, "source": None, "fast": False}
        why = (f"{NO_OPENBLAS}=1" if os.environ.get(NO_OPENBLAS) else "no OpenBLAS found")
        return {"name": "reference BLAS bundled with MLX", "library": None, "source": why, "fast": False}
    # whatever else provides cblas_sgemm globally (OpenBLAS, BLIS, MKL) is fast, but netlib's libblas
    out = {"name": os.path.basename(library), "library": library, "source": None,
           "fast": not os.path.basename(library).startswith("libblas")}
    launched = restore_environment()
    if launched and launched.get("library") and os.path.realpath(launched["library"]) == os.path.realpath(library):
        out["source"] = launched["source"]
    elif user_preloaded_openblas():
        out["source"] = "LD_PRELOAD"
    try:
        lib = ctypes.CDLL(library)
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode()
        words = config.split()
        out.update(name=" ".join(words[:2]), config=" ".join(w for w in words[2:] if w != "NO_AFFINITY"),
                   threads=int(lib.openblas_get_num_threads()), fast=True)
    except (AttributeError, OSError, ValueError):
        pass
    return out


def blas_summary() -> str:
    """One line saying which BLAS the CPU backend runs, e.g. ``OpenBLAS 0.3.33 (DYNAMIC_ARCH
    SkylakeX MAX_THREADS=128, 2 threads; pip package ngsolve-openblas)``."""
    b = blas_info()
    details = [d for d in (b.get("config"), f"{b['threads']} threads" if "threads" in b else None) if d]
    inner = ", ".join(details)
    if b.get("source"):
        inner = f"{inner}; {b['source']}" if inner else b["source"]
    return f"{b['name']} ({inner})" if inner else b["name"]
