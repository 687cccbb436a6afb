"""SeedLM kernels: reference vs a numpy oracle, Metal bodies on the CPU (metal-check), CUDA twins.

The oracle is independent of the code under test: bases from ``lfsr.seed_matrices`` (the cycle
table), codes packed here by hand from the documented layout, float64 arithmetic.
"""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from conftest import use_metal_check

from mlxeff.kernels import cuda_translation_unit as mlx_cuda_source
from mlxeff.kernels import kernel_sources
from mlxeff.quant import lfsr
from mlxeff.quant import seedlm_kernels as sk
from mlxeff.quant.seedlm_format import check_packed, reconstruct



# ---- packed tensors and the oracle ------------------------------------------------------------

def make_packed(out, in_features, C, P, seed=0, exp_base=-9, e_range=(0, 16), coeffs=range(-8, 8)):
    """Random packed tensor: seeds (out, nb) uint16, codes (out, width) uint8, and the unpacked
    exponent codes (out, nb) and coefficients (out, nb, P) it encodes."""
    rng = np.random.default_rng(seed)
    nb = -(-in_features // C)
    seeds = rng.integers(1, 1 << 16, (out, nb)).astype(np.uint16)
    e = rng.integers(*e_range, (out, nb))
    c = rng.choice(np.array(list(coeffs)), (out, nb, P))
    # nibbles [e, c_0 .. c_{P-1}] per block, row-major; nibble n in byte n // 2, low nibble first
    nib = np.concatenate([e[..., None], c & 15], axis=-1).reshape(out, nb * (P + 1))
    codes = np.zeros((out, -(-nb * (P + 1) // 2)), np.uint8)
    for n in range(nb * (P + 1)):
        codes[:, n // 2] |= (nib[:, n] << (4 * (n % 2))).astype(np.uint8)
    return seeds, codes, exp_base, e, c


def oracle_weight(seeds, e, c, exp_base, C, P, in_features):
    out, nb = seeds.shape
    U = lfsr.seed_matrices(seeds.reshape(-1), C, P).reshape(out, nb, C, P).astype(np.float64)
    w = (U * c[:, :, None, :]).sum(-1) * np.exp2(e + exp_base)[..., None]
    return w.reshape(out, nb * C)[:, :in_features]


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


CONFIGS = [  # (C, P, out, in): 4-bit, 3-bit, ragged rows, odd field widths, P = C, P = 7
    (8, 3, 24, 200), (12, 4, 10, 130), (5, 2, 9, 23), (3, 3, 7, 10), (7, 1, 6, 50), (9, 7, 5, 40),
]


# ---- the register as the kernels see it -------------------------------------------------------

def test_jump_table_is_the_register_for_every_state():
    J = sk.jump_table_np().astype(np.int64)
    s = np.arange(1, 1 << 16, dtype=np.int64)
    want = np.zeros_like(s)
    t = s.copy()
    for i in range(32):
        t = lfsr.lfsr_next(t, 16)
        want |= ((t >> 15) & 1) << i
    got = J[s & 255] ^ J[256 + (s >> 8)]
    assert np.array_equal(got, want)


def test_table_constants_make_exact_floats():
    T = sk.tables_np()
    s = np.arange(0, 1 << 16, 37, dtype=np.uint32)
    for q in range(8):
        v = ((s << q) | T[512 + q]).view(np.float32)
        assert np.array_equal(v.astype(np.float64), 2.0 ** (23 - q) + s)
    for n in range(1, 5):  # SL_COEF: nibble n -> its two's-complement value
        nib = np.arange(16, dtype=np.uint32)
        f = (((nib << (4 * n)) & (15 << (4 * n))) ^ T[520 + n]).view(np.float32).astype(np.float64)
        got = f / 16.0 ** n - (2.0 ** (23 - 4 * n) + 8)
        assert np.array_equal(got, np.where(nib >= 8, nib.astype(np.int64) - 16, nib))


# ---- reference (plain MLX ops) vs oracle ------------------------------------------------------

@pytest.mark.parametrize("C,P,out,inf", CONFIGS)
def test_dequantize_reference_matches_oracle(C, P, out, inf):
    seeds, codes, eb, e, c = make_packed(out, inf, C, P)
    W = reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inf, dtype=mx.float32)
    assert W.shape == (out, inf) and W.dtype == mx.float32
    assert rel_err(W, oracle_weight(seeds, e, c, eb, C, P, inf)) < 1e-6


def test_dequantize_reference_single_term_is_exact():
    # P = 1 with power-of-two coefficients: each weight is one exact product u * c * 2^k, so the
    # reference must equal the oracle bit for bit.
    seeds, codes, eb, e, c = make_packed(5, 30, 6, 1, seed=3, coeffs=(-8, -4, -2, -1, 1, 2, 4))
    W = reconstruct(mx.array(seeds), mx.array(codes), eb, 6, 1, 30, dtype=mx.float32)
    assert np.array_equal(np.array(W), oracle_weight(seeds, e, c, eb, 6, 1, 30).astype(np.float32))


def test_matvec_reference_matches_oracle():
    C, P, out, inf = 12, 4, 10, 130
    seeds, codes, eb, e, c = make_packed(out, inf, C, P, seed=1)
    x = np.random.default_rng(2).standard_normal((3, inf)).astype(np.float32)
    # on the CPU: float32 matmul on a GPU backend need not be exact (MLX CUDA's differs by ~3e-4)
    with mx.stream(mx.cpu):
        y = sk.seedlm_matvec_reference(mx.array(x), mx.array(seeds), mx.array(codes), eb, C, P, inf)
        assert y.shape == (3, out)
        assert rel_err(y, x.astype(np.float64) @ oracle_weight(seeds, e, c, eb, C, P, inf).T) < 1e-5


def test_cpu_path_is_the_reference():
    if sk.kernel_available():
        pytest.skip("the default device has a GPU backend")
    seeds, codes, eb, _, _ = make_packed(6, 40, 8, 3)
    s, cd = mx.array(seeds), mx.array(codes)
    x = mx.random.normal((2, 3, 40), key=mx.random.key(0))
    y = sk.seedlm_matvec(x, s, cd, eb, 8, 3, 40)
    assert y.shape == (2, 3, 6)
    assert mx.array_equal(y, sk.seedlm_matvec_reference(x, s, cd, eb, 8, 3, 40))
    W = sk.seedlm_dequantize(s, cd, eb, 8, 3, 40, dtype=mx.float16)
    assert W.dtype == mx.float16
    assert mx.array_equal(W, reconstruct(s, cd, eb, 8, 3, 40, dtype=mx.float16))


def test_bad_input_is_rejected():
    seeds, codes, eb, _, _ = make_packed(4, 40, 8, 3)
    s, cd = mx.array(seeds), mx.array(codes)
    with pytest.raises(ValueError, match="blocks per row"):
        sk.seedlm_dequantize(s, cd, eb, 8, 3, 80)
    with pytest.raises(ValueError, match="codes must be uint8"):
        sk.seedlm_dequantize(s, cd[:, :-1], eb, 8, 3, 40)
    with pytest.raises(ValueError, match="seeds must be"):
        sk.seedlm_dequantize(s.astype(mx.int32), cd, eb, 8, 3, 40)
    with pytest.raises(ValueError, match="configuration"):
        sk.seedlm_dequantize(s, cd, eb, 3, 8, 40)
    with pytest.raises(ValueError, match="features"):
        sk.seedlm_matvec(mx.zeros((1, 41)), s, cd, eb, 8, 3, 40)


def test_launch_plans():
    # 8192 x 8192 at 4 bits, one x row, x staged: one split on CUDA (x slice 32 KiB), two on Metal
    p = sk.matvec_plan(1, 8192, 8192, 8, 3, mx.float16, backend="cuda", stage_x=True)
    assert p["ints"]["SL_SPLIT"] == 1 and p["out_shape"] == (1, 8192) and p["out_dtype"] == mx.float16
    assert sk.matvec_plan(1, 8192, 8192, 8, 3, backend="metal", stage_x=True)["ints"]["SL_SPLIT"] == 2
    # x read directly: never split, whatever the width
    for rows in (1, 8):
        p = sk.matvec_plan(rows, 64, 65536, 8, 3, backend="metal", stage_x=False)
        assert p["ints"]["SL_SPLIT"] == 1 and p["out_shape"] == (rows, 64) and p["ints"]["SL_STAGE"] == 0
    p = sk.matvec_plan(8, 4096, 8192, 8, 3, mx.bfloat16, backend="cuda", stage_x=True)
    assert p["ints"]["SL_SPLIT"] > 1 and p["out_dtype"] == mx.float32
    # the defaults follow MATVEC_DEFAULTS (by rows of x)
    for rows in range(1, sk.MAX_ROWS + 1):
        st, T, TR = sk.matvec_defaults(rows)
        i = sk.matvec_plan(rows, 4096, 4096, 8, 3, backend="cuda")["ints"]
        assert (i["SL_STAGE"], i["SL_T"], i["SL_TR"]) == (int(st), T, TR)
    for p in (p, sk.dequant_plan(100, 300, 12, 4, mx.float16, backend="cuda")):
        assert all(g % t == 0 for g, t in zip(p["grid"], p["threadgroup"]))  # CUDA does not trim
    assert sk.matvec_plan(1, 3, 64, 8, 3, backend="cuda")["ints"]["SL_TR"] == 3
    assert [sk.dequant_plan(4, n, C, 1, mx.float16, backend="cuda")["ints"]["SL_VEC"]
            for C, n in ((8, 64), (12, 48), (6, 36), (5, 40), (8, 60))] == [16, 8, 4, 0, 8]
    assert not sk.config_supported(16, 8) and sk.config_supported(12, 4)
    if not sk.kernel_available():
        assert not sk.kernel_available(8, 3)


# ---- one build per configuration, not per layer shape ----------------------------------------

# (out, in) of layers: small shapes, and OpenELM-270M-like ones (model 1280, odd FFN widths)
LAYER_SHAPES = [(64, 48), (96, 40), (128, 200), (1792, 1280), (1280, 1280), (1280, 5120), (1280, 4352),
                (3, 64), (9, 23)]


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_layer_shapes_share_kernel_builds(backend):
    # The KernelSpec (what mlxeff.kernels.build compiles, lru-cached) depends on the kind, (C, P),
    # rows of x, the dtypes and the launch shape, never on the layer shape: a model's layers share
    # one build per configuration instead of one per distinct shape.
    specs = {}
    for C, P in ((8, 3), (12, 4)):
        for out, inf in LAYER_SHAPES:
            for dtype in (mx.float16, mx.float32):
                for rows in range(1, sk.MAX_ROWS + 1):
                    for kw in ({}, {"stage_x": False, "threads": 32, "tile_rows": 16}):
                        p = sk.matvec_plan(rows, out, inf, C, P, dtype, backend=backend, **kw)
                        assert p["out_dtype"] in (dtype, mx.float32)  # float32: a split row's partial sums
                        launch = tuple(sorted(kw.items())) or sk.matvec_defaults(rows)
                        specs.setdefault(("matvec", C, P, rows, dtype, p["out_dtype"], launch), set()).add(p["spec"])
                    # dims: every number of the layer shape the kernel reads at run time
                    assert p["dims"][:3] == (inf, -(-inf // C), out)
                d = sk.dequant_plan(out, inf, C, P, dtype, backend=backend)
                specs.setdefault(("dequant", C, P, dtype), set()).add(d["spec"])
                assert d["dims"][:3] == (inf, -(-inf // C), out)
    assert all(len(v) == 1 for v in specs.values()), {k: len(v) for k, v in specs.items() if len(v) > 1}
    # ... and distinct configurations are distinct builds (by name too: MLX caches by name + source)
    names = [next(iter(v)).name for v in specs.values()]
    assert len(set(names)) == len(names)
    for v in specs.values():
        assert not any(k in ("SL_IN", "SL_NB", "SL_OUT", "SL_ROWW", "SL_ROWBITS", "SL_CB", "SL_FULL")
                       for k, _ in next(iter(v)).defines)
    # the direct-x paths (1-2 rows, the decode step) never split: exactly one build per dtype
    assert sum(1 for k in specs if k[0] == "matvec" and k[3] == 1) == 2 * 2 * 2


def test_no_cross_is_a_property_of_p():
    # SL_NOCROSS is compiled in: it must not depend on the layer (rows of odd P hold whole fields)
    for P in range(1, sk.MAX_P + 1):
        fb = 4 * (P + 1)
        for nb in range(1, 70):
            rowbits = sk._row_layout(nb, P)[0]
            assert sk._cp_defines(8, P)["SL_NOCROSS"] == int(32 % fb == 0 and rowbits % fb == 0)


def test_per_call_path_builds_once_and_reuses_dims(monkeypatch):
    # The per-call path through a stand-in kernel (no GPU here): several layer shapes reach one
    # build, and a layer's dims array is made once, not per call.
    built, seen = [], []

    def fake_build(spec, backend=None):
        built.append(spec)

        def kernel(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            seen.append(inputs[-1])
            return [mx.zeros(output_shapes[0], output_dtypes[0])]
        return kernel

    monkeypatch.setattr(sk, "_backend", lambda: "cuda")
    monkeypatch.setattr(sk, "build", fake_build)
    monkeypatch.setattr(sk, "_LAUNCH", {})
    for out, inf in [(64, 48), (96, 40), (128, 200)] * 2:
        seeds, codes, eb, _, _ = make_packed(out, inf, 8, 3)
        s, cd = mx.array(seeds), mx.array(codes)
        y = sk.seedlm_matvec(mx.zeros((1, inf), mx.float16), s, cd, eb, 8, 3, inf)
        assert y.shape == (1, out)
        assert sk.seedlm_dequantize(s, cd, eb, 8, 3, inf).shape == (out, inf)
    kinds = {}
    for spec in built:
        kinds.setdefault(spec.source_file, set()).add(spec)
    assert sorted(len(v) for v in kinds.values()) == [1, 1]  # one matvec build, one dequantise build
    assert all(a is b for a, b in zip(seen[:6], seen[6:]))  # the same dims arrays the second time
    assert [tuple(np.array(d)) for d in seen[0:6:2]] == [
        sk.matvec_plan(1, o, i, 8, 3, mx.float16, backend="cuda")["dims"] for o, i in [(64, 48), (96, 40), (128, 200)]]


# ---- the Metal bodies, executed on the CPU ----------------------------------------------------

@pytest.fixture(scope="module")
def metal_check():
    use_metal_check()
    return sk


@pytest.mark.parametrize("C,P,out,inf,rows,kw", [
    (8, 3, 20, 200, 1, {}),                         # 4-bit, one x row, tail tile overlaps
    (12, 4, 13, 130, 3, {}),                        # 3-bit: fields straddle words
    (5, 2, 9, 23, 8, {}),                           # 8 rows, odd codes byte count (padded)
    (9, 7, 5, 40, 2, {"tile_rows": 3}),             # P = 7 (nibbles from the high half)
    (8, 3, 11, 1000, 8, {"threads": 32, "stage_x": True}),  # splits: x slice > threadgroup memory
    (8, 3, 11, 1000, 8, {"threads": 32, "stage_x": False}),  # the same, x read directly
    (1, 1, 6, 17, 1, {}),                           # C = P = 1
    (8, 3, 20, 200, 1, {"stage_x": True}),          # both ways to read x, at each x row count
    (12, 4, 13, 130, 3, {"stage_x": False, "tile_rows": 5}),
    (5, 2, 9, 23, 8, {"stage_x": False}),
    (9, 7, 5, 40, 2, {"stage_x": True, "threads": 64}),
    (8, 3, 40, 512, 1, {"stage_x": False, "threads": 32, "tile_rows": 16}),  # several columns a thread
    (8, 3, 40, 512, 3, {"stage_x": False, "threads": 32, "tile_rows": 16}),  # more outputs than threads
])
def test_metal_matvec_body_equals_reference(metal_check, C, P, out, inf, rows, kw):
    seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=C * 10 + P)
    x = np.random.default_rng(rows).standard_normal((rows, inf)).astype(np.float32)
    if kw.get("threads") == 32 and kw.get("stage_x"):
        assert sk.matvec_plan(rows, out, inf, C, P, backend="metal")["ints"]["SL_SPLIT"] > 1
    got = sk.matvec_metal_check(x, seeds, codes, eb, C, P, inf, **kw)
    want = sk.seedlm_matvec_reference(mx.array(x), mx.array(seeds), mx.array(codes), eb, C, P, inf)
    assert got.shape == (rows, out) and got.dtype == np.float32
    assert rel_err(got, want) < 2e-5


def test_metal_matvec_body_float16(metal_check):
    seeds, codes, eb, _, _ = make_packed(16, 96, 8, 3, seed=5)
    x = np.random.default_rng(0).standard_normal((2, 96)).astype(np.float16)
    got = sk.matvec_metal_check(x, seeds, codes, eb, 8, 3, 96)
    want = sk.seedlm_matvec_reference(mx.array(x).astype(mx.float32), mx.array(seeds), mx.array(codes),
                                      eb, 8, 3, 96)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), np.array(want), rtol=2e-3,
                               atol=2e-3 * np.abs(np.array(want)).max())


@pytest.mark.parametrize("C,P,out,inf,dtype", [
    (8, 3, 9, 64, mx.float16),     # 16-byte stores
    (12, 4, 7, 130, mx.float16),   # 8-byte stores, partial last block
    (6, 2, 5, 36, mx.float16),     # 4-byte stores
    (5, 2, 6, 23, mx.float16),     # element stores
    (8, 3, 10, 100, mx.float32),   # 16-byte stores of float32, partial last block
    (9, 7, 3, 27, mx.float32),
])
def test_metal_dequant_body_equals_reference(metal_check, C, P, out, inf, dtype):
    seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=out)
    got = sk.dequantize_metal_check(seeds, codes, eb, C, P, inf, dtype=dtype)
    want = np.array(reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inf, dtype=mx.float32))
    assert got.shape == (out, inf)
    if dtype == mx.float32:
        # same operations in the same order; a backend may fuse the multiply-add (1 rounding)
        assert rel_err(got, want) < 1e-6
    else:
        np.testing.assert_array_equal(got, want.astype(np.float16))


@pytest.mark.parametrize("C,P,kw", [
    (8, 3, {}),                                                      # the 4-bit decode build
    (12, 4, {"rows": 2}),                                            # fields straddle words
    (12, 4, {"rows": 3, "stage_x": True, "threads": 32, "tile_rows": 16}),
    (5, 2, {"rows": 8, "stage_x": False, "tile_rows": 4}),
])
def test_metal_matvec_one_build_for_odd_shapes(metal_check, C, P, kw):
    # One build (same spec) for every shape below, each exact against the reference: in_features
    # not a multiple of C, out smaller than a threadgroup's row tile, codes rows that are not a
    # whole number of words (P even: fields cross words), a partial last tile, a split row.
    kw = dict(kw)
    rows = kw.pop("rows", 1)
    names, splits = set(), set()
    for out, inf in [(5, 8 * C + 3), (3, 10 * C - 5), (21, 23 * C + 1), (1, C), (40, 4 * C),
                     (17, 250 * C + 7)]:
        seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=out * inf)
        x = np.random.default_rng(out).standard_normal((rows, inf)).astype(np.float32)
        plan = sk.matvec_plan(rows, out, inf, C, P, mx.float32, backend="metal", **kw)
        names.add(plan["spec"].name)
        splits.add(plan["ints"]["SL_SPLIT"])
        got = sk.matvec_metal_check(x, seeds, codes, eb, C, P, inf, **kw)
        want = sk.seedlm_matvec_reference(mx.array(x), mx.array(seeds), mx.array(codes), eb, C, P, inf)
        assert got.shape == (rows, out)
        assert rel_err(got, want) < 2e-5, (out, inf, plan["ints"])
    assert len(names) == 1
    assert max(splits) > 1 if kw.get("stage_x") else splits == {1}


def test_metal_dequant_one_build_for_odd_shapes(metal_check):
    # float16 at C = 8: the build allows 16-byte stores; rows of 60 or 36 weights take 8-byte
    # stores, 23 or 115 element stores (a partial last block), each chosen at run time
    for C, P in ((8, 3), (12, 4)):
        names = set()
        for out, inf in [(3, 64), (5, 60), (2, 36), (9, 23), (4, 115), (11, 8 * C)]:
            seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=out + inf)
            plan = sk.dequant_plan(out, inf, C, P, mx.float16, backend="metal")
            names.add(plan["spec"].name)
            got = sk.dequantize_metal_check(seeds, codes, eb, C, P, inf, dtype=mx.float16)
            want = np.array(reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inf, dtype=mx.float32))
            np.testing.assert_array_equal(got, want.astype(np.float16), err_msg=str(plan["ints"]))
        assert len(names) == 1


# ---- the CUDA twins ---------------------------------------------------------------------------

def test_compact_source_keeps_one_backend_and_drops_spacing():
    from mlxeff.kernels import compact_source

    text = "\n".join([
        "#define A(x)      (x)   \\", "  + 1   // a comment", "#if defined(__CUDACC__)", "#define B 1",
        "#if SOMETHING", "#define C 2", "#else", "#define C 3", "#endif", "#else", "#define B 2", "#endif",
        "#if !defined(__CUDACC__)", "#define M 1", "#endif", "int   y = 0;", ""])
    cuda = compact_source(text, "cuda").splitlines()
    metal = compact_source(text, "metal").splitlines()
    assert cuda == ["#define A(x) (x) \\", "+ 1", "#define B 1", "#if SOMETHING", "#define C 2", "#else",
                    "#define C 3", "#endif", "int y = 0;"]
    assert metal == ["#define A(x) (x) \\", "+ 1", "#define B 2", "#define M 1", "int y = 0;"]
    # without a backend every branch stays
    assert "#if defined(__CUDACC__)" in compact_source(text)


def test_cuda_bodies_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed (the CUDA twins are compile-checked where it is)")
    # inputs: x, seeds, codes (uint8: CUDA passes the bytes), exp_base, tables, dims
    mv_in = lambda xd, cd=mx.uint32: [xd, mx.uint16, cd, mx.int32, mx.uint32, mx.int32]  # noqa: E731
    dq_in = [mx.uint16, mx.uint32, mx.int32, mx.uint32, mx.int32]
    units = [
        mlx_cuda_source(sk.matvec_plan(1, 8192, 8192, 8, 3, mx.float16, backend="cuda"),
                        mv_in(mx.float16, mx.uint8)),
        mlx_cuda_source(sk.matvec_plan(1, 8192, 8192, 8, 3, mx.float16, backend="cuda", stage_x=True),
                        mv_in(mx.float16, mx.uint8)),
        mlx_cuda_source(sk.matvec_plan(2, 300, 1333, 5, 2, mx.float32, backend="cuda", stage_x=False),
                        mv_in(mx.float32)),
        mlx_cuda_source(sk.matvec_plan(1, 4096, 4096, 12, 4, mx.bfloat16, backend="cuda", stage_x=False),
                        mv_in(mx.bfloat16, mx.uint8)),
        mlx_cuda_source(sk.matvec_plan(3, 4096, 4096, 12, 4, mx.bfloat16, backend="cuda"), mv_in(mx.bfloat16)),
        mlx_cuda_source(sk.matvec_plan(8, 1000, 8200, 9, 7, mx.float32, backend="cuda"), mv_in(mx.float32)),
        mlx_cuda_source(sk.dequant_plan(4096, 4096, 8, 3, mx.float16, backend="cuda"), dq_in),
        mlx_cuda_source(sk.dequant_plan(100, 130, 12, 4, mx.bfloat16, backend="cuda"), dq_in),
        mlx_cuda_source(sk.dequant_plan(100, 23, 5, 2, mx.float32, backend="cuda"), dq_in),
    ]
    compile_units(nvcc, units, tmp_path, no_spills=2)  # the decode kernels of the speed target


def compile_units(nvcc, units, tmp_path, no_spills: int) -> None:
    """Compile CUDA translation units with nvcc for sm_90 in parallel; each must compile, and the
    first ``no_spills`` must not spill registers."""
    procs = []
    for i, unit in enumerate(units):
        (tmp_path / f"u{i}.cu").write_text(unit)
        procs.append(subprocess.Popen(
            [nvcc, "-std=c++17", "-arch=sm_90", "-Xptxas", "-warn-spills", "-cubin", str(tmp_path / f"u{i}.cu"),
             "-o", str(tmp_path / f"u{i}.cubin")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for i, p in enumerate(procs):
        log = p.communicate()[0]
        assert p.returncode == 0, f"unit {i}:\n{log[-4000:]}"
        if i < no_spills:
            assert "spill" not in log.lower(), log


def _cuda():
    return getattr(mx, "cuda", None) is not None and mx.cuda.is_available()


cuda_only = pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend and an NVIDIA GPU")


@cuda_only
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("C,P,out,inf,rows", [
    (8, 3, 4096, 4096, 1), (8, 3, 1024, 4096, 8), (12, 4, 4096, 4096, 1), (12, 4, 777, 1000, 3),
    (5, 2, 300, 1333, 2), (8, 3, 512, 16384, 1),
])
def test_cuda_matvec_equals_reference(dtype, C, P, out, inf, rows):
    with mx.stream(mx.gpu):
        seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=inf + rows, e_range=(2, 9))
        s, cd = mx.array(seeds), mx.array(codes)
        x = mx.random.normal((rows, inf), key=mx.random.key(rows)).astype(dtype)
        got = sk.matvec_kernel(x, s, cd, eb, C, P, inf)
        want = sk.seedlm_matvec_reference(x.astype(mx.float32), s, cd, eb, C, P, inf)
        assert got.dtype == dtype and got.shape == (rows, out)
        tol = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}[dtype]
        assert rel_err(np.array(got.astype(mx.float32)), np.array(want)) < tol
        # the public entry point picks the kernel on a GPU; exp_base as the module holds it
        assert mx.array_equal(sk.seedlm_matvec(x, s, cd, eb, C, P, inf), got)
        assert mx.array_equal(sk.seedlm_matvec(x, s, cd, mx.array(eb, dtype=mx.int32), C, P, inf), got)


@cuda_only
@pytest.mark.parametrize("C,P,out,inf,rows", [
    (8, 3, 4096, 4096, 1), (8, 3, 1024, 4096, 8), (12, 4, 777, 1000, 3), (5, 2, 300, 1333, 2),
])
def test_cuda_matvec_other_launch_shapes(C, P, out, inf, rows):
    # the launch shapes the benchmark sweep times besides the default: x staged or not, other sizes
    with mx.stream(mx.gpu):
        seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=inf + rows, e_range=(2, 9))
        s, cd = mx.array(seeds), mx.array(codes)
        x = mx.random.normal((rows, inf), key=mx.random.key(rows))
        with mx.stream(mx.cpu):
            want = np.array(sk.seedlm_matvec_reference(x, s, cd, eb, C, P, inf))
        stage = sk.matvec_defaults(rows)[0]
        for kw in ({"stage_x": not stage}, {"stage_x": False, "threads": 32, "tile_rows": 16},
                   {"stage_x": True, "threads": 256, "tile_rows": 8}):
            got = sk.matvec_kernel(x, s, cd, eb, C, P, inf, **kw)
            assert got.shape == (rows, out)
            assert rel_err(np.array(got), want) < 2e-5, kw


@cuda_only
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("C,P,out,inf", [(8, 3, 4096, 4096), (12, 4, 1000, 1000), (5, 2, 77, 123)])
def test_cuda_dequantize_equals_reference(dtype, C, P, out, inf):
    with mx.stream(mx.gpu):
        seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=inf)
        s, cd = mx.array(seeds), mx.array(codes)
        got = sk.seedlm_dequantize(s, cd, eb, C, P, inf, dtype=dtype)
    # The oracle on the CPU: MLX's float32 matmul on the GPU is not exact (TF32-class rounding).
    with mx.stream(mx.cpu):
        want = reconstruct(s, cd, eb, C, P, inf, dtype=mx.float32)
        mx.eval(want)
    assert got.dtype == dtype and got.shape == (out, inf)
    if dtype == mx.float32:
        assert rel_err(np.array(got), np.array(want)) < 1e-6
    else:  # one rounding of the target dtype apart at most, plus the float32 difference of two
        # summation orders: a weight is a sum of P products that can cancel, so that part is
        # bounded by the weights' scale (1e-5 of the largest), not by the weight itself;
        # float16's subnormal spacing 2^-24 bounds the tiny weights
        ulp, tiny = {mx.float16: (2.0 ** -10, 2.0 ** -24), mx.bfloat16: (2.0 ** -7, 1e-38)}[dtype]
        g, w = np.array(got.astype(mx.float32)), np.array(want)
        assert (np.abs(g - w) <= ulp * np.abs(w) + tiny + 1e-5 * np.abs(w).max()).all()


@cuda_only
@pytest.mark.parametrize("C,P", [(8, 3), (12, 4), (5, 2)])
def test_cuda_one_build_for_odd_shapes(C, P):
    # One build per configuration on the GPU: odd layer shapes (in_features not a multiple of C,
    # out below a row tile, codes rows not a whole number of words, split rows, stores narrower
    # than the build's widest) through the same kernels, each against the reference.
    shapes = [(5, 8 * C + 3), (3, 10 * C - 5), (21, 23 * C + 1), (40, 4 * C), (300, 60 * C + 4),
              (17, 700 * C + 7)]
    specs = set()
    with mx.stream(mx.gpu):
        for out, inf in shapes:
            seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=out + inf, e_range=(2, 9))
            s, cd = mx.array(seeds), mx.array(codes)
            with mx.stream(mx.cpu):
                W = reconstruct(s, cd, eb, C, P, inf, dtype=mx.float32)
                mx.eval(W)
            for rows in (1, 3):
                x = mx.random.normal((rows, inf), key=mx.random.key(rows))
                with mx.stream(mx.cpu):
                    want = np.array(sk.seedlm_matvec_reference(x, s, cd, eb, C, P, inf))
                got = sk.matvec_kernel(x, s, cd, eb, C, P, inf)
                assert got.shape == (rows, out)
                assert rel_err(np.array(got), want) < 2e-5, (out, inf, rows)
                specs.add(sk.matvec_plan(rows, out, inf, C, P, mx.float32)["spec"])
            d32 = sk.seedlm_dequantize(s, cd, eb, C, P, inf, dtype=mx.float32)
            d16 = sk.seedlm_dequantize(s, cd, eb, C, P, inf, dtype=mx.float16)
            assert rel_err(np.array(d32), np.array(W)) < 1e-6, (out, inf)
            # the same weights, stored as float16 (whatever the store width): the same rounding
            assert np.array_equal(np.array(d16), np.array(d32.astype(mx.float16))), (out, inf)
            specs.add(sk.dequant_plan(out, inf, C, P, mx.float32)["spec"])
            specs.add(sk.dequant_plan(out, inf, C, P, mx.float16)["spec"])
    assert len(specs) == 4  # matvec at 1 and at 3 rows, dequantise to float32 and to float16


def test_per_call_path_caches_nothing_wrong():
    # the per-call shortcuts agree with what they shortcut
    from mlxeff.kernels import gpu_backend
    assert sk._backend() == gpu_backend()
    eb = mx.array(-5, dtype=mx.int32)
    assert sk._exp_base(eb, "cuda") is eb  # passed as it is, no new node
    assert sk._exp_base(-5, "cuda") is sk._exp_base(-5, "metal")  # one cached array per value
    for b in ("cuda", "metal", None):
        assert sk._exp_base(eb, b).item() == -5 and sk._exp_base(mx.array([-5], mx.int64), b).dtype == mx.int32
    assert sk._exp_base(eb, "metal").shape == (1,)
    codes = mx.zeros((3, 8), dtype=mx.uint8)
    assert sk._code_words(codes, "cuda") is codes
    assert sk._code_words(codes, "metal").dtype == mx.uint32 and sk._code_words(codes, "metal").size == 6
    odd = mx.arange(9, dtype=mx.uint8).reshape(3, 3)
    w = sk._code_words(odd, "cuda")
    assert w.dtype == mx.uint32 and w.size == 3
    assert np.array_equal(np.array(w).view(np.uint8)[:9], np.arange(9))
    # shape checks are cached by shape, and still raise every time
    s = mx.zeros((4, 5), dtype=mx.uint16)
    with pytest.raises(ValueError, match="codes"):
        check_packed(s, mx.zeros((4, 9), dtype=mx.uint8), 8, 3, 40)
    with pytest.raises(ValueError, match="codes"):
        check_packed(s, mx.zeros((4, 9), dtype=mx.uint8), 8, 3, 40)
    with pytest.raises(ValueError, match="configuration"):
        check_packed(s, mx.zeros((4, 10), dtype=mx.uint8), 8.0, 3, 40)
    assert check_packed(s, mx.zeros((4, 10), dtype=mx.uint8), 8, 3, 40) == (4, 5)
