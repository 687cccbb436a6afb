"""Custom kernels: one body, two backends, one reference.

Each kernel body lives in ``metal/`` as ``NAME.inc`` and is written once against a few macros that
this module defines per backend (thread and group indices, barriers, shared memory, SIMD sums).
``build(spec)`` compiles it lazily with ``mx.fast.metal_kernel`` on Apple GPUs or
``mx.fast.cuda_kernel`` on NVIDIA GPUs; on the CPU there is no kernel and callers use their
reference implementation in plain MLX ops (which is also the test oracle).

Macros available to a body (both backends):

- ``KIDX_X/Y/Z``  thread position in the grid; ``TIDX_X/Y/Z`` position in the threadgroup;
  ``GIDX_X/Y/Z``   threadgroup position; ``TGSIZE_X`` threads per threadgroup along x;
- ``LANE``, ``WARP``  lane within the 32-wide SIMD group / warp, and that group's index;
- ``SIMD_SUM(x)``  sum over the 32 lanes (Metal ``simd_sum``; CUDA ``__shfl_xor_sync`` tree);
- ``SIMD_MAX(x)``  likewise for the maximum;
- ``EXP(x)``      fast float exponential (Metal ``fast::exp``; CUDA ``__expf``);
- ``BARRIER()``   threadgroup barrier;
- ``SHARED``      threadgroup/shared storage qualifier for arrays declared in the body;
- ``uint32`` / ``int32`` / ``half_t`` types.

Metal bodies are also executed on the CPU in the tests through the metal-check emulator (Metal's
SIMT semantics on the CPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Optional, Sequence, Tuple

import mlx.core as mx

METAL_PRELUDE = """
#define KIDX_X thread_position_in_grid.x
#define KIDX_Y thread_position_in_grid.y
#define KIDX_Z thread_position_in_grid.z
#define TIDX_X thread_position_in_threadgroup.x
#define TIDX_Y thread_position_in_threadgroup.y
#define TIDX_Z thread_position_in_threadgroup.z
#define GIDX_X threadgroup_position_in_grid.x
#define GIDX_Y threadgroup_position_in_grid.y
#define GIDX_Z threadgroup_position_in_grid.z
#define TGSIZE_X threads_per_threadgroup.x
#define LANE thread_index_in_simdgroup
#define WARP simdgroup_index_in_threadgroup
#define SIMD_SUM(x) simd_sum(x)
#define SIMD_MAX(x) simd_max(x)
#define EXP(x) fast::exp(x)
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define SHARED threadgroup
typedef uint uint32;
typedef int int32;
typedef half half_t;
"""

CUDA_HEADER = """
__device__ __forceinline__ float mlxeff_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float mlxeff_warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
typedef unsigned int uint32;
typedef int int32;
typedef __half half_t;
"""

CUDA_PRELUDE = """
#define KIDX_X (blockIdx.x * blockDim.x + threadIdx.x)
#define KIDX_Y (blockIdx.y * blockDim.y + threadIdx.y)
#define KIDX_Z (blockIdx.z * blockDim.z + threadIdx.z)
#define TIDX_X threadIdx.x
#define TIDX_Y threadIdx.y
#define TIDX_Z threadIdx.z
#define GIDX_X blockIdx.x
#define GIDX_Y blockIdx.y
#define GIDX_Z blockIdx.z
#define TGSIZE_X blockDim.x
#define LANE (threadIdx.x & 31u)
#define WARP (threadIdx.x >> 5)
#define SIMD_SUM(x) mlxeff_warp_sum(x)
#define SIMD_MAX(x) mlxeff_warp_max(x)
#define EXP(x) __expf(x)
#define BARRIER() __syncthreads()
#define SHARED __shared__
"""


class KernelUnavailable(RuntimeError):
    """Raised when a kernel is requested on a backend that has none (use the reference)."""


@dataclass(frozen=True)
class KernelSpec:
    name: str
    source_file: str  # a file in metal/, e.g. "seedlm_matvec.inc"
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]
    header_file: Optional[str] = None
    atomic_outputs: bool = False
    defines: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)
    # CUDA only: bytes of dynamic shared memory (``extern __shared__``), for more than 48 KB
    shared_memory: int = 0


def gpu_backend() -> Optional[str]:
    """``"metal"``, ``"cuda"`` or None (CPU default device, or no GPU backend)."""
    if mx.default_device() != mx.gpu:
        return None
    return _gpu_kind()


@lru_cache(maxsize=None)
def _gpu_kind() -> Optional[str]:
    # Which GPU backend this MLX build has does not change while the process runs; asking MLX
    # costs a microsecond or so, and kernels ask once per call.
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


# Shared memory one CUDA thread block may opt into, by compute capability (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability"); 48 KB (the static limit) elsewhere.
_CUDA_SHARED_OPTIN_KB = {(7, 0): 96, (7, 2): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99,
                         (9, 0): 227, (10, 0): 227, (10, 3): 227, (12, 0): 99, (12, 1): 99}


@lru_cache(maxsize=None)
def cuda_shared_memory_limit() -> int:
    """Bytes of shared memory a thread block may use on this process's CUDA GPU (static and
    dynamic together): the opt-in limit of its compute capability, 48 KB when unknown."""
    try:
        info = mx.device_info()
        cc = (int(info["compute_capability_major"]), int(info["compute_capability_minor"]))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
        return 48 * 1024
    return _CUDA_SHARED_OPTIN_KB.get(cc, 48) * 1024


_TYPE_NAMES = {
    "cuda": {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"},
    "metal": {mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat16_t"},
}


def type_name(dtype, backend: str) -> str:
    """The kernel-language name of a floating dtype (for a ``#define`` in place of a template)."""
    try:
        return _TYPE_NAMES[backend][dtype]
    except KeyError:
        raise ValueError(f"no {backend} type for {dtype}") from None


def read_source(filename: str) -> str:
    try:
        return resources.files("mlxeff.metal").joinpath(filename).read_text()
    except ModuleNotFoundError:
        # A source checkout used without installing: metal/ sits beside the mlxeff/ package.
        from pathlib import Path

        return (Path(__file__).resolve().parents[1] / "metal" / filename).read_text()


def compact_source(text: str, backend: Optional[str] = None) -> str:
    """``text`` without ``//`` comments, indentation, runs of spaces and blank lines, and, for a
    ``backend``, without the other backend's ``#if defined(__CUDACC__)`` branches. MLX writes a
    custom kernel's whole source into a new string on every call and hashes it when the call is
    evaluated, so a shorter source is a cheaper call (measured on CUDA: ~2 us per call for 12 kB).
    The kernel bodies use ``//`` only for comments and hold no string literals."""
    lines = [re.sub(r"[ \t]{2,}", " ", re.sub(r"//.*", "", line)).strip() for line in text.splitlines()]
    if backend is not None:
        lines = _drop_other_backend(lines, cuda=backend == "cuda")
    return "".join(line + "\n" for line in lines if line)


def _drop_other_backend(lines, cuda: bool):
    """Resolve ``#if defined(__CUDACC__)`` (and ``#if !defined(...)``) blocks, with their ``#else``,
    for one backend; other conditionals, and lines continued with a backslash, stay as they are."""
    out, stack = [], []  # stack: None (a block left as it is) or [keep this branch, resolved]
    continued = False
    for line in lines:
        directive = None if continued else re.match(r"#\s*(if|ifdef|ifndef|elif|else|endif)\b(.*)", line)
        continued = line.endswith("\\")
        if directive:
            kind, cond = directive.group(1), directive.group(2).strip()
            if kind in ("if", "ifdef", "ifndef"):
                if kind == "if" and cond in ("defined(__CUDACC__)", "!defined(__CUDACC__)"):
                    stack.append([cuda == (cond == "defined(__CUDACC__)")])
                    continue
                stack.append(None)
            elif stack and stack[-1] is not None:
                if kind == "else":
                    stack[-1][0] = not stack[-1][0]
                    continue
                if kind == "endif":
                    stack.pop()
                    continue
                raise ValueError(f"#{kind} inside a backend branch is not resolved: {line}")
            elif kind == "endif" and stack:
                stack.pop()
        if all(frame is None or frame[0] for frame in stack):
            out.append(line)
    return out


def kernel_sources(spec: KernelSpec, backend: str) -> Tuple[str, str]:
    """The (header, body) that ``build`` passes to MLX for ``backend``."""
    defines = "".join(f"#define {k} {v}\n" for k, v in spec.defines)
    header = compact_source(read_source(spec.header_file), backend) if spec.header_file else ""
    body = compact_source(read_source(spec.source_file), backend)
    if backend == "metal":
        return header, METAL_PRELUDE + defines + body
    if backend == "cuda":
        return CUDA_HEADER + header, CUDA_PRELUDE + defines + body
    raise KernelUnavailable(f"no kernel backend {backend!r}")


_CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.uint8: "uint8_t",
               mx.int32: "int32_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t"}


def cuda_translation_unit(plan: dict, input_dtypes, name: str = "k") -> str:
    """The translation unit ``mx.fast.cuda_kernel`` compiles for a launch ``plan`` (a kernel
    module's ``*_plan``: spec, template, output dtype) whose inputs have ``input_dtypes``, for
    compiling it with nvcc apart from MLX (the tests' compile check, ``benchmarks/seedlm_sass.py``).
    As MLX 0.32 assembles it (``mlx/backend/cuda/custom_kernel.cpp``): the header, then ``namespace
    mlx::core::cu`` with a ``__global__`` function taking ``const T*`` inputs and ``T*`` outputs and
    the template arguments as ``using``; standard includes stand in for MLX's device header."""
    spec = plan["spec"]
    header, body = kernel_sources(spec, "cuda")
    src = ("#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
           "#include <cooperative_groups.h>\n")
    src += header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    params = [f"    const {_CUDA_TYPES[d]}* {n}" for n, d in zip(spec.input_names, input_dtypes)]
    params += [f"    {_CUDA_TYPES[plan['out_dtype']]}* {n}" for n in spec.output_names]
    src += f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
    src += "".join(f"  using {n} = {_CUDA_TYPES[v]};\n" for n, v in plan["template"])
    return src + "\n" + body + "\n}\n\n} // namespace mlx::core::cu\n"


@lru_cache(maxsize=None)
def build(spec: KernelSpec, backend: Optional[str] = None):
    """Compile ``spec`` for the current GPU backend (cached). Raises ``KernelUnavailable`` on CPU."""
    backend = backend or gpu_backend()
    if backend is None:
        raise KernelUnavailable(f"{spec.name}: no GPU backend on this device (use the reference)")
    header, body = kernel_sources(spec, backend)
    if backend == "metal":
        return mx.fast.metal_kernel(
            name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names),
            source=body, header=header, atomic_outputs=spec.atomic_outputs,
        )
    return mx.fast.cuda_kernel(
        name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names),
        source=body, header=header, shared_memory=spec.shared_memory,
    )


def run_plan(kernel, plan: dict, inputs: Sequence) -> mx.array:
    """Call a built kernel with a launch plan's grid, threadgroup, template and output (a dict with
    those keys, as the kernel modules' ``*_plan`` functions return); the one output."""
    return kernel(inputs=list(inputs), template=plan["template"], grid=plan["grid"],
                  threadgroup=plan["threadgroup"], output_shapes=[plan["out_shape"]],
                  output_dtypes=[plan["out_dtype"]])[0]


def metal_check_run(spec: KernelSpec, inputs: Sequence, **kwargs):
    """Run the Metal body of ``spec`` on the CPU with the metal-check emulator (tests only)."""
    import metal_check as mc  # the tests put the emulator on sys.path

    header, body = kernel_sources(spec, "metal")
    return mc.run(
        spec.name, list(spec.input_names), list(spec.output_names), body, header, list(inputs),
        atomic_outputs=spec.atomic_outputs, **kwargs,
    )
