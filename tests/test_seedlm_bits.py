"""SeedLM's two-bit basis ("bits"): the stream, the basis, the reference, the encoder, the layers
and the table-lookup kernels (Metal bodies through metal-check, CUDA twins compiled with nvcc,
and on a CUDA GPU the kernels themselves)."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import use_metal_check
from test_seedlm import random_packed as make_packed
from test_seedlm_kernels import compile_units, mlx_cuda_source

from mlxeff.errors import MlxeffError
from mlxeff.quant import lfsr
from mlxeff.quant import seedlm as S
from mlxeff.quant import seedlm_bits_kernels as BK
from mlxeff.quant import seedlm_encoder as E
from mlxeff.quant import seedlm_format as F


def numpy_dense(seeds, exps, coeffs, exp_base, C, P, inp):
    out, nb = seeds.shape
    U = lfsr.bit_bases(seeds.reshape(-1), C, P).astype(np.float64).reshape(out, nb, C, P)
    W = np.einsum("rbcp,rbp->rbc", U, coeffs * 2.0 ** (exps[..., None] + exp_base))
    return W.reshape(out, nb * C)[:, :inp]


# ---- the stream and the basis -----------------------------------------------------------------

def test_stream_is_the_seed_then_the_new_top_bits():
    for seed in (1, 0x1234, 0xFFFF, 40503):
        b = lfsr.bit_stream([seed], 64)[0].astype(np.int64)
        assert int((b[:16] << np.arange(16)).sum()) == seed
        states = lfsr.lfsr_states(seed, 48)
        np.testing.assert_array_equal(b[16:], (states >> 15) & 1)
        for n in range(48):  # state n after the seed is bits b_n .. b_{n+15}
            if n + 16 <= 64:
                s = seed if n == 0 else int(states[n - 1])
                assert int((b[n:n + 16] << np.arange(16)).sum()) == s


def test_bit_basis_layout():
    C, P = 8, 3
    b = lfsr.bit_stream([777], 2 * C * P)[0].astype(np.float32)
    U = lfsr.bit_bases([777], C, P)[0]
    for p in range(P):
        for c in range(C):
            assert U[c, p] == 2 * b[2 * C * p + C + c] + b[2 * C * p + c] - 1.5
    assert set(np.unique(lfsr.bit_bases(np.arange(1, 2000), 12, 4))) == {-1.5, -0.5, 0.5, 1.5}


@pytest.mark.parametrize("C,P,inp", [(8, 3, 40), (12, 4, 30), (5, 2, 7)])
def test_reconstruct_equals_numpy(C, P, inp):
    seeds, codes, eb, exps, coeffs = make_packed(6, inp, C, P, seed=C)
    W = F.reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inp, basis="bits")
    np.testing.assert_array_equal(np.array(W), numpy_dense(seeds, exps, coeffs, eb, C, P, inp))


def test_spec_entry_and_basis_checks():
    assert "basis" not in F.spec_entry(4, 16, 8, 3)  # legacy files stay byte-identical
    spec = F.spec_entry(4, 16, 8, 3, basis="bits")
    assert spec["basis"] == "bits" and F.spec_config(spec).basis == "bits"
    assert F.spec_config({k: v for k, v in spec.items() if k != "basis"}).basis == "states"
    with pytest.raises(MlxeffError, match="unknown SeedLM basis"):
        F.spec_config({**spec, "basis": "trits"})
    with pytest.raises(ValueError, match="unknown SeedLM basis"):
        F.reconstruct(mx.ones((1, 1), mx.uint16), mx.zeros((1, 2), mx.uint8), 0, 8, 3, 8, basis="x")


# ---- the encoder and the layers ---------------------------------------------------------------

SMALL = E.EncoderConfig(batch=256)


def test_encoder_fits_the_bits_basis_better_than_the_states_basis():
    W = np.random.default_rng(0).standard_normal((32, 16 * 8)).astype(np.float32)
    rel = {}
    for basis in ("states", "bits"):
        enc = E.encode_matrix(W, 8, 3, config=SMALL, basis=basis)
        rel[basis] = np.sqrt(enc.sq_error / enc.sq_norm)
        codes = F.pack_codes(enc.exps, enc.coeffs)
        dense = np.array(F.reconstruct(mx.array(enc.seeds), mx.array(codes), enc.exp_base, 8, 3, W.shape[1],
                                       basis=basis))
        # the error the encoder reports is the error of what the format reconstructs
        assert abs(np.linalg.norm(dense - W) / np.linalg.norm(W) - rel[basis]) < 1e-5
    assert rel["bits"] < rel["states"] and rel["bits"] < 0.1254


def test_planted_bits_blocks_are_found_exactly():
    C, P = 8, 3
    rng = np.random.default_rng(1)
    seeds = rng.integers(1, 65536, size=16)
    coeffs = rng.integers(-8, 8, size=(16, P))
    coeffs[:, 0] = 7
    U = lfsr.bit_bases(seeds, C, P).astype(np.float64)
    W = (0.25 * np.einsum("ncp,np->nc", U, coeffs)).astype(np.float32).reshape(2, 8 * C)
    enc = E.encode_matrix(W, C, P, config=SMALL, basis="bits")
    assert enc.sq_error < 1e-10 * enc.sq_norm


def test_quantize_model_writes_the_bits_basis(tmp_path):
    import mlxeff
    from test_seedlm import FAST, small_model

    model = small_model()
    x = mx.array([[1, 5, 9, 2, 33]])
    S.quantize_model(model, bits=4, progress=False, config=FAST, basis="bits")
    specs = model.mlxeff_meta["quantization"]
    assert {s["basis"] for s in specs.values()} == {"bits"}
    layers = [m for _, m in model.named_modules() if isinstance(m, S.SeedLMLinear)]
    assert layers and all(m.basis == "bits" for m in layers)
    mlxeff.save(model, None, tmp_path / "q")
    loaded, _ = mlxeff.load(tmp_path / "q")
    assert all(m.basis == "bits" for _, m in loaded.named_modules() if isinstance(m, S.SeedLMLinear))
    assert mx.array_equal(loaded(x), model(x)).item()


# ---- the kernels' Metal bodies on the CPU -----------------------------------------------------

@pytest.fixture(scope="module")
def metal_check():
    use_metal_check()


@pytest.mark.parametrize("C,P,out,inf,kw", [
    (8, 3, 70, 300, {}),                              # Metal layout (2 tables of 4 bits), tail tile
    (8, 3, 40, 256, {"groups": 1, "warps": 2}),       # the CUDA layout (one 8-bit table)
    (8, 3, 300, 2000, {"warps": 2, "rows": 3}),       # many chunks, both table buffers in turn
    (8, 3, 100, 1100, {"warps": 3, "buffers": 1}),    # one table buffer, two barriers a chunk
    (8, 3, 70, 600, {"groups": 1, "jump_per_lane": True}),  # the CUDA jump table, one per lane
    (12, 4, 40, 100, {"jump_per_lane": True, "rows": 5}),
    (12, 4, 40, 100, {}),                             # 3-bit: fields straddle words
    (5, 2, 33, 23, {}),                               # odd code bytes, a partial block
    (9, 7, 5, 40, {"warps": 1, "rows": 40}),          # P = 7, one warp, more rows than lanes
    (8, 3, 70, 2000, {"lane_blocks": 2, "warps": 2, "rows": 3}),  # 64-block chunks, a partial last one
    (8, 3, 40, 256, {"lane_blocks": 3, "groups": 1, "buffers": 1}),  # one chunk, blocks past the end
    (12, 4, 33, 700, {"lane_blocks": 2, "jump_per_lane": True}),
])
def test_metal_matvec_body_equals_reference(metal_check, monkeypatch, C, P, out, inf, kw):
    monkeypatch.setitem(BK.TABLE_BYTES, "metal", 40 * 1024)  # metal-check has no 32 KiB limit
    seeds, codes, eb, exps, coeffs = make_packed(out, inf, C, P, seed=C + P)
    x = np.random.default_rng(out).standard_normal(inf).astype(np.float32)
    ref = numpy_dense(seeds, exps, coeffs, eb, C, P, inf) @ x.astype(np.float64)
    got = BK.matvec_metal_check(x, seeds, codes, eb, C, P, inf, **kw)
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def test_metal_matvec_body_float16(metal_check):
    seeds, codes, eb, exps, coeffs = make_packed(64, 512, 8, 3, seed=5, exp_base=-14)
    x = np.random.default_rng(0).standard_normal(512).astype(np.float16)
    ref = numpy_dense(seeds, exps, coeffs, -14, 8, 3, 512) @ x.astype(np.float64)
    got = BK.matvec_metal_check(x, seeds, codes, -14, 8, 3, 512)
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float64) - ref).max() <= 2 ** -10 * np.abs(ref).max()


@pytest.mark.parametrize("C,P,out,inf", [(8, 3, 9, 100), (12, 4, 5, 130), (5, 2, 7, 23)])
def test_metal_dequant_body_is_the_reference_bit_for_bit(metal_check, C, P, out, inf):
    seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=3)
    got = BK.dequantize_metal_check(seeds, codes, eb, C, P, inf)
    want = F.reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inf, basis="bits")
    np.testing.assert_array_equal(got, np.array(want))


def test_metal_tables_fit_threadgroup_memory():
    # 32 KiB in all on Metal: two table buffers and the 2 KiB jump table
    for C in (8, 12, 5, 9):
        G = BK.table_groups(C, "metal")
        spec = BK.matvec_plan(64, 64 * C, C, 3, backend="metal")["spec"]
        defines = dict(spec.defines)
        assert defines["SLB_NBUF"] == "2" and defines["SLB_JREP"] == "0" and spec.shared_memory == 0
        assert 2 * 4 * 32 * G * (1 << (C // G)) + 2048 <= 32 * 1024


@pytest.mark.parametrize("limit_kb,buffers,dynamic", [(227, 2, 64 * 1024), (99, 2, 64 * 1024), (64, 1, 0),
                                                      (48, 1, 0)])
def test_cuda_launch_fits_the_gpus_shared_memory(monkeypatch, limit_kb, buffers, dynamic):
    # H100 (227 KiB a block), RTX 30/40 (99), T4 (64), unknown (48): two 32 KiB table buffers in
    # dynamic shared memory where they fit with the jump table, else one static buffer
    monkeypatch.setattr(BK, "cuda_shared_memory_limit", lambda: limit_kb * 1024)
    BK.matvec_plan.cache_clear()
    try:
        spec = BK.matvec_plan(4096, 4096, 8, 3, mx.float16, backend="cuda")["spec"]
        assert dict(spec.defines)["SLB_NBUF"] == str(buffers) and spec.shared_memory == dynamic
        if limit_kb < 64 + 64:
            with pytest.raises(ValueError, match="shared memory"):
                BK.matvec_plan(4096, 4096, 8, 3, mx.float16, backend="cuda", buffers=2, jump_per_lane=True)
        else:
            jrep = BK.matvec_plan(4096, 4096, 8, 3, mx.float16, backend="cuda", jump_per_lane=True)["spec"]
            assert jrep.shared_memory == 2 * 32 * 1024 + 32 * 2048
    finally:
        BK.matvec_plan.cache_clear()


def test_one_kernel_per_configuration_not_per_shape():
    specs = {BK.matvec_plan(o, i, 8, 3, mx.float16, backend="cuda")["spec"]
             for o, i in ((2048, 2048), (6144, 2048), (2048, 8192), (16384, 256), (9000, 200))}
    assert len(specs) == 1  # one build, whatever the shape: no split, no partial-sum variant
    dq = {BK.dequant_plan(o, i, 8, 3, mx.float16, backend="cuda")["spec"] for o, i in ((64, 48), (96, 40))}
    assert len(dq) == 1


# ---- the CUDA twins --------------------------------------------------------------------------

def test_cuda_bodies_compile_with_nvcc(tmp_path, monkeypatch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed (the CUDA twins are compile-checked where it is)")
    monkeypatch.setattr(BK, "cuda_shared_memory_limit", lambda: 227 * 1024)  # an H100's
    mv = lambda xd: [xd, mx.uint16, mx.uint8, mx.int32, mx.uint32, mx.int32]  # noqa: E731
    plan = BK.matvec_plan.__wrapped__
    units = [
        mlx_cuda_source(plan(8192, 8192, 8, 3, mx.float16, backend="cuda"), mv(mx.float16)),
        mlx_cuda_source(plan(8192, 8192, 8, 3, mx.float16, backend="cuda", jump_per_lane=True), mv(mx.float16)),
        mlx_cuda_source(plan(256, 8192, 8, 3, mx.float16, backend="cuda", buffers=1), mv(mx.float16)),
        mlx_cuda_source(plan(8192, 8192, 8, 3, mx.float16, backend="cuda", rows=4, lane_blocks=2), mv(mx.float16)),
        mlx_cuda_source(BK.matvec_plan(4096, 4096, 12, 4, mx.bfloat16, backend="cuda"), mv(mx.bfloat16)),
        mlx_cuda_source(BK.dequant_plan(4096, 4096, 8, 3, mx.float16, backend="cuda"),
                        [mx.uint16, mx.uint8, mx.int32, mx.uint32, mx.int32]),
    ]
    compile_units(nvcc, units, tmp_path, no_spills=4)


def _cuda():
    return getattr(mx, "cuda", None) is not None and mx.cuda.is_available()


cuda_only = pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend and an NVIDIA GPU")


@cuda_only
@pytest.mark.parametrize("C,P,out,inf", [(8, 3, 8192, 8192), (8, 3, 300, 2000), (12, 4, 1000, 3000),
                                         (5, 2, 33, 23)])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_cuda_matvec_equals_reference(C, P, out, inf, dtype):
    seeds, codes, _, exps, coeffs = make_packed(out, inf, C, P, seed=7, exp_base=-14)
    x = np.random.default_rng(1).standard_normal(inf).astype(np.float32)
    with mx.stream(mx.gpu):
        y = BK.seedlm_matvec(mx.array(x).astype(dtype)[None], mx.array(seeds), mx.array(codes), -14, C, P, inf)
        got = np.array(y.astype(mx.float32))[0]
    xr = np.array(mx.array(x).astype(dtype).astype(mx.float32)).astype(np.float64)
    ref = numpy_dense(seeds, exps, coeffs, -14, C, P, inf) @ xr
    tol = (2 ** -10 if dtype == mx.float16 else 1e-6) * np.abs(ref).max()
    assert np.abs(got - ref).max() <= tol


@cuda_only
@pytest.mark.parametrize("C,P,out,inf", [(8, 3, 512, 1000), (12, 4, 100, 130)])
def test_cuda_dequant_is_the_reference_bit_for_bit(C, P, out, inf):
    seeds, codes, eb, _, _ = make_packed(out, inf, C, P, seed=2)
    with mx.stream(mx.gpu):
        got = np.array(BK.seedlm_dequantize(mx.array(seeds), mx.array(codes), eb, C, P, inf, dtype=mx.float32))
    with mx.stream(mx.cpu):
        want = np.array(F.reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inf, basis="bits"))
    np.testing.assert_array_equal(got, want)


# ---- the convert command ---------------------------------------------------------------------

def test_convert_seedlm_basis_option(tmp_path, monkeypatch, capsys):
    import mlxeff
    from conftest import make_model, write_hf_openelm
    from test_convert_cli import assert_clean_failure, run_inprocess

    from mlxeff.models import layerwise_config

    # one layer: the exhaustive encoder's time grows with the weights (four layers took 39 s)
    hf = write_hf_openelm(make_model(layerwise_config(1, 64, 16, vocab_size=96, ffn_dim_divisor=32)),
                          tmp_path / "hf")
    out = tmp_path / "out"
    code, _, err = run_inprocess(monkeypatch, capsys, "convert", hf, "--out", out, "--no-tokenizer", "--quantize", "seedlm",
                                 "--seedlm-basis", "bits", "--json")
    assert code == 0, err
    loaded, _ = mlxeff.load(out)
    assert {s.get("basis") for s in loaded.mlxeff_meta["quantization"].values()} == {"bits"}
    code, stdout, err = run_inprocess(monkeypatch, capsys, "info", out)
    assert code == 0 and "seedlm 4-bit bits basis" in stdout, stdout + err
    bad = tmp_path / "bad"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, "convert", hf, "--out", bad, "--seedlm-basis", "bits"),
                         bad, "--seedlm-basis applies to --quantize seedlm")
    assert_clean_failure(run_inprocess(monkeypatch, capsys, "convert", hf, "--out", bad, "--quantize", "seedlm",
                                       "--seedlm-basis", "trits"), bad, "unknown basis 'trits'")
