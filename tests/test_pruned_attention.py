"""Pruned attention: the reference equals dense attention with a mask; the Metal body (executed on
the CPU by metal-check) and the CUDA twin (on an NVIDIA GPU) equal the reference."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import use_metal_check

from mlxeff.kernels import kernel_sources
from mlxeff.models import pruned_attention as pa



def _case(B=2, H=8, KVH=2, Lq=3, S=96, D=64, n=40, seed=0, dtype=mx.float32, per_batch=True):
    """Random q/k/v, distinct selected slots, and cache positions that are a shuffled subset of a
    longer sequence (as in a LazyLLM cache holding revived tokens out of order)."""
    rng = np.random.default_rng(seed)
    q = mx.array(rng.normal(size=(B, H, Lq, D)).astype(np.float32)).astype(dtype)
    k = mx.array(rng.normal(size=(B, KVH, S, D)).astype(np.float32)).astype(dtype)
    v = mx.array(rng.normal(size=(B, KVH, S, D)).astype(np.float32)).astype(dtype)
    rows = B if per_batch else 1
    idx = np.stack([rng.permutation(S)[:n] for _ in range(rows)]).astype(np.int32)
    kpos = np.stack([np.sort(rng.permutation(4 * S)[:S])[rng.permutation(S)] for _ in range(B)])
    # Query positions inside the key range, so that causal masking hides part of the keys.
    qpos = np.stack([np.sort(rng.choice(np.arange(S, 4 * S), Lq, replace=False)) for _ in range(B)])
    if not per_batch:
        idx = idx[0]
    return q, k, v, mx.array(idx), mx.array(qpos.astype(np.int32)), mx.array(kpos.astype(np.int32))


def _dense_masked(q, k, v, idx, scale, qpos=None, kpos=None):
    """mx.fast.scaled_dot_product_attention over every slot with a boolean mask."""
    B, _, Lq, _ = q.shape
    S = k.shape[2]
    idx = np.broadcast_to(np.array(idx).reshape(-1, np.array(idx).shape[-1]), (B, np.array(idx).shape[-1]))
    sel = np.zeros((B, S), bool)
    for b in range(B):
        sel[b, idx[b]] = True
    mask = np.broadcast_to(sel[:, None, None, :], (B, 1, Lq, S))
    if qpos is not None:
        mask = mask & (np.array(kpos)[:, None, None, :] <= np.array(qpos)[:, None, :, None])
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mx.array(mask))


@pytest.mark.parametrize("shape", [
    dict(B=1, H=4, KVH=4, Lq=1, S=64, n=16),  # MHA decode
    dict(B=2, H=8, KVH=2, Lq=1, S=96, n=40),  # GQA decode
    dict(B=2, H=12, KVH=3, Lq=5, S=128, n=77, D=32),  # GQA short prefill chunk
])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_equals_dense_with_mask(shape, causal):
    q, k, v, idx, qpos, kpos = _case(**shape)
    scale = q.shape[-1] ** -0.5
    kw = dict(q_positions=qpos, k_positions=kpos) if causal else {}
    ref = pa.pruned_attention_reference(q, k, v, idx, scale=scale, **kw)
    dense = _dense_masked(q, k, v, idx, scale, *((qpos, kpos) if causal else ()))
    np.testing.assert_allclose(np.array(ref), np.array(dense), rtol=1e-5, atol=1e-5)


def test_reference_shared_index_and_all_slots():
    q, k, v, idx, _, _ = _case(per_batch=False)
    scale = 0.125
    ref = pa.pruned_attention_reference(q, k, v, idx, scale=scale)
    np.testing.assert_allclose(np.array(ref), np.array(_dense_masked(q, k, v, idx, scale)), atol=1e-5)
    every = mx.arange(k.shape[2], dtype=mx.int32)
    full = pa.pruned_attention_reference(q, k, v, every, scale=scale)
    dense = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    np.testing.assert_allclose(np.array(full), np.array(dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_batch", [False, True])
def test_every_slot_equals_reference(per_batch):
    """index=None (every slot, causal by position): the dispatcher's CPU path (SDPA with a mask)
    equals the reference over arange(S)."""
    q, k, v, _, qpos, kpos = _case(B=2, H=6, KVH=3, Lq=4, S=50, n=10)
    if not per_batch:
        qpos, kpos = qpos[0], kpos[0]
    every = mx.arange(k.shape[2], dtype=mx.int32)
    ref = pa.pruned_attention_reference(q, k, v, every, scale=0.2, q_positions=qpos, k_positions=kpos)
    got = pa.pruned_attention(q, k, v, None, scale=0.2, q_positions=qpos, k_positions=kpos)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-5)


def test_row_without_visible_key_is_zero():
    q, k, v, idx, _, _ = _case(B=1, H=2, KVH=1, Lq=2, S=8, n=4, per_batch=False)
    kpos = mx.arange(10, 18, dtype=mx.int32)
    qpos = mx.array([5, 17], dtype=mx.int32)  # the first query precedes every key
    out = np.array(pa.pruned_attention_reference(q, k, v, idx, scale=0.5, q_positions=qpos, k_positions=kpos))
    assert np.all(out[:, :, 0] == 0) and np.all(np.isfinite(out)) and np.any(out[:, :, 1] != 0)
    every = np.array(pa.pruned_attention(q, k, v, None, scale=0.5, q_positions=qpos, k_positions=kpos))
    assert np.all(every[:, :, 0] == 0) and np.all(np.isfinite(every))


def test_bad_shapes_raise():
    q, k, v, idx, qpos, kpos = _case(B=1)
    with pytest.raises(ValueError, match="query heads"):
        pa.pruned_attention_reference(q[:, :7], k, v, idx, scale=1.0)
    with pytest.raises(ValueError, match="both"):
        pa.pruned_attention_reference(q, k, v, idx, scale=1.0, q_positions=qpos)
    with pytest.raises(ValueError, match="q_positions"):
        pa.pruned_attention_reference(q, k, v, idx, scale=1.0, q_positions=qpos[:, :1], k_positions=kpos)


def test_dispatch_on_cpu_uses_reference():
    if pa.gpu_backend() is not None:
        pytest.skip("the default device is a GPU")
    q, k, v, idx, qpos, kpos = _case()
    a = pa.pruned_attention(q, k, v, idx, scale=0.1, q_positions=qpos, k_positions=kpos)
    b = pa.pruned_attention_reference(q, k, v, idx, scale=0.1, q_positions=qpos, k_positions=kpos)
    assert mx.array_equal(a, b)


def test_launch_config_splits():
    # A decode step over 1024 of 4096 slots, OpenELM-270M's last layer (20 query, 5 KV heads).
    cfg = pa.launch_config((1, 20, 1, 64), (1, 5, 4096, 64), 1024)
    assert cfg["grid"][0] % cfg["threadgroup"][0] == 0  # whole threadgroups: CUDA does not trim
    assert cfg["ints"]["ROWS"] == 4 and cfg["grid"][1] == 1 and cfg["grid"][2] == 5
    # 1024 keys over 5 KV heads: 16 splits of 64 keys (80 threadgroups) and a merge
    assert cfg["ints"]["NSPLIT"] == 1024 // pa.KEYS_PER_SPLIT == 16
    assert cfg["grid"][0] == 16 * cfg["threadgroup"][0]
    # a batch whose KV heads fill the GPU: fewer splits; enough of them: one walk, no merge
    assert pa.launch_config((8, 20, 1, 64), (8, 5, 4096, 64), 1024)["ints"]["NSPLIT"] == 4
    assert pa.launch_config((32, 20, 1, 64), (32, 5, 4096, 64), 1024)["ints"]["NSPLIT"] == 1
    assert (cfg["ints"]["WARPS"], cfg["ints"]["UNROLL"]) == pa.default_launch(4, 64)
    assert cfg["threadgroup"][0] == 32 * cfg["ints"]["WARPS"] <= 32 * pa.MAX_WARPS
    long = pa.launch_config((1, 20, 1, 64), (1, 5, 65536, 64), 16384)["ints"]["NSPLIT"]
    assert long == 24  # capped by the threadgroup target (26 for 5 KV heads), then a listed count
    # a growing index (LazyLLM decoding) meets few split counts: few kernels to compile
    counts = {pa.default_splits(n, 3) for n in range(1, 20000)}
    assert counts <= set(pa.SPLIT_COUNTS) and len(counts) <= 12
    with pytest.raises(ValueError, match="warps"):
        pa.launch_config((1, 20, 1, 64), (1, 5, 4096, 64), 1024, warps=32)
    assert pa.launch_config((1, 4, 1, 64), (1, 4, 64, 64), 8)["ints"]["NSPLIT"] == 1


# ---- the Metal body, executed on the CPU ---------------------------------------------------

@pytest.fixture(scope="module")
def metal_check():
    use_metal_check()
    return pa.pruned_attention_metal_check


@pytest.mark.parametrize("case,n_splits", [
    (dict(B=1, H=8, KVH=2, Lq=1, S=96, n=40), 1),  # decode, single kernel
    (dict(B=1, H=8, KVH=2, Lq=1, S=96, n=40), 3),  # decode, partial + combine (ragged splits)
    (dict(B=2, H=8, KVH=2, Lq=1, S=96, n=40, per_batch=False), 2),  # one (n,) index for the batch
    (dict(B=2, H=6, KVH=1, Lq=3, S=80, n=37, D=32), 2),  # GQA prefill chunk, two row blocks
    (dict(B=1, H=20, KVH=5, Lq=1, S=200, n=50, D=128), None),  # default split count
    (dict(B=1, H=4, KVH=2, Lq=2, S=120, n=70, warps=2, unroll=3), 2),  # other launch shapes
    (dict(B=1, H=4, KVH=2, Lq=1, S=120, n=70, warps=8, unroll=1), 1),
])
@pytest.mark.parametrize("causal", [False, True])
def test_metal_body_equals_reference(metal_check, case, n_splits, causal):
    case = dict(case)
    launch = {k: case.pop(k) for k in ("warps", "unroll") if k in case}
    q, k, v, idx, qpos, kpos = _case(**case)
    kw = dict(q_positions=qpos, k_positions=kpos) if causal else {}
    scale = q.shape[-1] ** -0.5
    ref = pa.pruned_attention_reference(q, k, v, idx, scale=scale, **kw)
    got = metal_check(q, k, v, idx, scale=scale, n_splits=n_splits, **launch, **kw)
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-5, atol=2e-6)


def test_metal_body_float16(metal_check):
    q, k, v, idx, qpos, kpos = _case(B=1, H=4, KVH=2, Lq=2, S=64, n=33, dtype=mx.float16)
    ref = pa.pruned_attention_reference(q, k, v, idx, scale=0.125, q_positions=qpos, k_positions=kpos)
    got = metal_check(q, k, v, idx, scale=0.125, q_positions=qpos, k_positions=kpos, n_splits=2)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), np.array(ref.astype(mx.float32)), atol=2e-3)


# ---- the CUDA twin ----------------------------------------------------------------------------

CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
              mx.int32: "int32_t"}


def mlx_cuda_translation_unit(spec, inputs, output_dtypes, template, name="k"):
    """The CUDA source mx.fast.cuda_kernel compiles (mlx/backend/cuda/custom_kernel.cpp), with a
    stand-in for MLX's device utils header: inputs as ``const T*`` plus ``NAME_shape``/``_strides``/
    ``_ndim`` when the body names them, outputs as ``T*``, template arguments as constexprs."""
    header, body = kernel_sources(spec, "cuda")
    src = ("#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
           "#include <cuda/std/array>\n#include <cooperative_groups.h>\n"
           "namespace mlx::core::cu {\nusing Shape = cuda::std::array<int32_t, 10>;\n"
           "using Strides = cuda::std::array<int64_t, 10>;\n}\n")
    src += header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    params = []
    for nm, (dtype, ndim) in zip(spec.input_names, inputs):
        params.append(f"    const {CUDA_TYPES[dtype]}* {nm}")
        if ndim > 0:
            for suffix, ty in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
                if nm + suffix in body:
                    params.append(f"    const __grid_constant__ {ty} {nm}{suffix}")
    params += [f"    {CUDA_TYPES[d]}* {nm}" for nm, d in zip(spec.output_names, output_dtypes)]
    src += f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
    for nm, val in template:
        if isinstance(val, bool):
            src += f"  constexpr bool {nm} = {'true' if val else 'false'};\n"
        elif isinstance(val, int):
            src += f"  constexpr int {nm} = {val};\n"
        else:
            src += f"  using {nm} = {CUDA_TYPES[val]};\n"
    return src + "\n" + body + "\n}\n\n} // namespace mlx::core::cu\n"


def test_cuda_body_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed (the CUDA twin is compile-checked where it is)")
    ints = dict(D=64, ROWS=4, WARPS=4, UNROLL=4, NSPLIT=16)
    units = [
        mlx_cuda_translation_unit(
            pa.specialise(pa.PARTIAL_SPEC, "cuda", mx.float16, True, 0.125, **ints),
            [(mx.float16, 4)] * 3 + [(mx.int32, 2)] * 3, [mx.float32, mx.float32], [], name="partial"),
        mlx_cuda_translation_unit(
            pa.specialise(pa.SINGLE_SPEC, "cuda", mx.bfloat16, False, 0.088,
                          D=128, ROWS=8, WARPS=8, UNROLL=2, NSPLIT=1),
            [(mx.bfloat16, 4)] * 3 + [(mx.int32, 1)], [mx.bfloat16], [], name="single"),
        mlx_cuda_translation_unit(
            pa.specialise(pa.COMBINE_SPEC, "cuda", mx.float32, D=64, NSPLIT=16),
            [(mx.float32, 3), (mx.float32, 3)], [mx.float32], [], name="combine"),
    ]
    for i, unit in enumerate(units):
        src = tmp_path / f"unit{i}.cu"
        src.write_text(unit)
        res = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-c", str(src), "-o",
                              str(tmp_path / f"unit{i}.o")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-4000:]


def _cuda():
    return getattr(mx, "cuda", None) is not None and mx.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("case,n_splits", [
    (dict(B=1, H=20, KVH=5, Lq=1, S=4096, n=1024), None),
    (dict(B=1, H=16, KVH=4, Lq=1, S=4096, n=1024), 1),
    (dict(B=2, H=8, KVH=2, Lq=4, S=512, n=130, D=128), 5),
    (dict(B=3, H=6, KVH=1, Lq=7, S=300, n=77, D=32), None),
    (dict(B=3, H=6, KVH=1, Lq=7, S=300, n=77, D=32, per_batch=False), 3),
    (dict(B=1, H=16, KVH=4, Lq=1, S=4096, n=1024, warps=16, unroll=8), 8),
    (dict(B=1, H=12, KVH=3, Lq=2, S=999, n=333, warps=16, unroll=2), None),
])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_equals_reference(dtype, case, n_splits, causal):
    case = dict(case)
    launch = {k: case.pop(k) for k in ("warps", "unroll") if k in case}
    with mx.stream(mx.gpu):
        q, k, v, idx, qpos, kpos = _case(dtype=dtype, **case)
        kw = dict(q_positions=qpos, k_positions=kpos) if causal else {}
        scale = q.shape[-1] ** -0.5
        ref = pa.pruned_attention_reference(q, k, v, idx, scale=scale, **kw).astype(mx.float32)
        got = pa.pruned_attention_kernel(q, k, v, idx, scale=scale, n_splits=n_splits, **launch, **kw)
        assert got.dtype == dtype and got.shape == q.shape
        tol = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 2e-2}[dtype]
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(ref), atol=tol, rtol=tol)


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("n_splits", [None, 4])
def test_cuda_repeated_calls_equal_reference(n_splits):
    # the decode fast path: the same shapes again and again (cached launches, then a compiled graph)
    pa._FAST.clear()
    with mx.stream(mx.gpu):
        _, k, v, idx, _, _ = _case(B=1, H=8, KVH=2, Lq=1, S=512, n=200, dtype=mx.float16, per_batch=False)
        for i in range(pa.COMPILE_AFTER + 3):
            q = mx.random.normal((1, 8, 1, 64), key=mx.random.key(i)).astype(mx.float16)
            got = pa.pruned_attention_kernel(q, k, v, idx, scale=0.125, n_splits=n_splits)
            ref = pa.pruned_attention_reference(q, k, v, idx, scale=0.125)
            np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(ref.astype(mx.float32)),
                                       atol=3e-3, rtol=3e-3)
    assert [entry[2] is not None for entry in pa._FAST.values()] == [True]  # the compiled graph ran


# ---- the benchmark -------------------------------------------------------------------------

def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pruned_attention.py"
    spec = importlib.util.spec_from_file_location("pruned_attention_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_runs_and_checks_itself(capsys, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    bench = _benchmark_module()
    bench.main(["--context", "256", "--batch", "2", "--reps", "2", "--trials", "1", "--warmup", "0",
                "--shapes", "layer,step", "--chained", "--compiled", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["selected"] == 64 and res["batch"] == 2 and res["chained"] is True
    tol = 1e-5 if res["pruned_impl"] == "reference" else 3e-3  # the kernel runs in float16 on a GPU
    for name, layers in (("layer", 1), ("step", 16)):
        e = res["shapes"][name]
        assert e["layers"] == layers and e["max_abs_err_vs_reference"] < tol
        assert set(e["seconds_per_step"]) == {"dense_all", "sdpa_gathered", "pruned", "dense_all_compiled",
                                              "pruned_compiled"}
        assert all(t > 0 for t in e["seconds_per_step"].values())


def test_benchmark_chained_steps_depend_on_the_previous_layer():
    bench = _benchmark_module()
    layers = bench.make_layers([(4, 2, 32), (6, 3, 32)], 1, 64, 16, 2, mx.float32, seed=0)
    seen = []

    def record(L, q):
        seen.append(q)
        return bench.variants(False)["pruned"](L, q)

    bench.eager(record, layers, chained=True)(0)
    bench.eager(record, layers, chained=True)(1)
    # the first query of a fresh chain is the layer's own; every later one has the previous output added
    assert mx.array_equal(seen[0], layers[0]["qs"][0])
    assert not mx.array_equal(seen[1], layers[1]["qs"][0])
    independent = bench.eager(lambda L, q: q, layers)(0)
    assert all(mx.array_equal(q, L["qs"][0]) for q, L in zip(independent, layers))


def test_benchmark_rejects_bad_launches():
    bench = _benchmark_module()
    assert bench.parse_launches("16:2:0,8:4:16") == [(16, 2, None), (8, 4, 16)]
    with pytest.raises(SystemExit):
        bench.main(["--sweep", "--launches", "16:2"])
