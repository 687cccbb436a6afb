"""SeedLM format: packing, reference reconstruction, SeedLMLinear, model quantization, save/load."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_model
from mlx.utils import tree_flatten

import mlxeff
from mlxeff import progress
from mlxeff.errors import MlxeffError
from mlxeff.models import layerwise_config
from mlxeff.quant import apply_quantization_spec, lfsr
from mlxeff.quant import seedlm as S
from mlxeff.quant import seedlm_format as F
from mlxeff.quant.seedlm_encoder import EncoderConfig, encode_matrix

FAST = EncoderConfig(batch=64)


@pytest.fixture
def on_cpu():
    """The CPU path (dense reconstruction), also on a machine whose default device is a GPU."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def has_gpu() -> bool:
    cuda = getattr(mx, "cuda", None)
    return mx.metal.is_available() or (cuda is not None and cuda.is_available())


def random_packed(out, inp, C, P, seed=0, exp_base=-6):
    rng = np.random.default_rng(seed)
    nb = F.num_blocks(inp, C)
    seeds = rng.integers(1, 65536, size=(out, nb)).astype(np.uint16)
    exps = rng.integers(0, 16, size=(out, nb))
    coeffs = rng.integers(-8, 8, size=(out, nb, P))
    return seeds, F.pack_codes(exps, coeffs), exp_base, exps, coeffs


def numpy_reconstruct(seeds, exps, coeffs, exp_base, C, P, inp):
    out, nb = seeds.shape
    W = np.zeros((out, nb * C), np.float64)
    for r in range(out):
        for b in range(nb):
            U = lfsr.seed_matrix(int(seeds[r, b]), C, P).astype(np.float64)
            W[r, b * C:(b + 1) * C] = 2.0 ** (int(exps[r, b]) + exp_base) * (U @ coeffs[r, b])
    return W[:, :inp]


@pytest.mark.parametrize("nb,P", [(8, 3), (7, 4), (5, 2), (1, 1)])
def test_pack_unpack_roundtrip(nb, P):
    rng = np.random.default_rng(nb)
    exps = rng.integers(0, 16, size=(3, nb))
    coeffs = rng.integers(-8, 8, size=(3, nb, P))
    codes = F.pack_codes(exps, coeffs)
    assert codes.dtype == np.uint8 and codes.shape == (3, F.codes_width(nb, P))
    e, c = F.unpack_codes(mx.array(codes), nb, P)
    assert np.array_equal(np.array(e), exps) and np.array_equal(np.array(c), coeffs)
    # nibble order: block 0's exponent is the low nibble of byte 0, its c_0 the high nibble
    assert codes[0, 0] == (exps[0, 0] | ((coeffs[0, 0, 0] & 15) << 4))


@pytest.mark.parametrize("bits,C,P,per_block", [(4, 8, 3, 32), (3, 12, 4, 36)])
def test_packed_size_exact(bits, C, P, per_block):
    cfg = F.SeedLMConfig.for_bits(bits)
    assert (cfg.C, cfg.P, cfg.bits, cfg.bits_per_block) == (C, P, bits, per_block)
    inp = 8 * C  # whole blocks, even nibble count
    m = S.SeedLMLinear(inp, 16, C, P)
    blocks = 16 * (inp // C)
    assert (m.seeds.nbytes + m.codes.nbytes) * 8 == per_block * blocks
    assert (m.seeds.nbytes + m.codes.nbytes) * 8 / (16 * inp) == bits
    assert m.exp_base.nbytes == 4  # the declared per-tensor overhead


@pytest.mark.parametrize("C,P,inp", [(8, 3, 40), (12, 4, 30), (5, 5, 7)])
def test_reconstruct_matches_independent_reference(C, P, inp):
    seeds, codes, eb, exps, coeffs = random_packed(4, inp, C, P)
    got = np.array(F.reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inp))
    want = numpy_reconstruct(seeds, exps, coeffs, eb, C, P, inp)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("C,P,inp", [(8, 3, 64), (12, 4, 20)])
def test_linear_equals_dense_reconstruction(on_cpu, C, P, inp):
    seeds, codes, eb, _, _ = random_packed(24, inp, C, P, seed=1)
    m = S.SeedLMLinear(inp, 24, C, P)
    m.set_packed(seeds, codes, eb)
    W = F.reconstruct(m.seeds, m.codes, m.exp_base, C, P, inp)
    for rows in (1, 3, 17):
        x = mx.random.normal((rows, inp), key=mx.random.key(rows))
        assert mx.array_equal(m(x), x @ W.T).item()
    # replacing the packed arrays invalidates the cached reconstruction
    seeds2, codes2, _, _, _ = random_packed(24, inp, C, P, seed=2)
    m.set_packed(seeds2, codes2, eb)
    W2 = F.reconstruct(mx.array(seeds2), mx.array(codes2), eb, C, P, inp)
    assert mx.array_equal(m(x), x @ W2.T).item()


@pytest.mark.skipif(not has_gpu(), reason="needs a GPU backend (MLX CUDA or Metal)")
@pytest.mark.parametrize("rows", [1, 8, 33])
def test_linear_on_gpu_matches_dense_reconstruction(rows):
    # the fused kernels (matvec for <= 8 rows, dequantise above) against the CPU reference
    C, P, inp, out = 8, 3, 256, 96
    seeds, codes, eb, _, _ = random_packed(out, inp, C, P, seed=rows)
    m = S.SeedLMLinear(inp, out, C, P)
    m.set_packed(seeds, codes, eb)
    x = mx.random.normal((rows, inp), key=mx.random.key(0))
    with mx.stream(mx.cpu):
        want = np.array(x @ F.reconstruct(m.seeds, m.codes, m.exp_base, C, P, inp).T)
    got = np.array(m(x).astype(mx.float32))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())


def test_linear_bias_and_embedding(on_cpu):
    seeds, codes, eb, _, _ = random_packed(10, 16, 8, 3, seed=3)
    lin = S.SeedLMLinear(16, 10, 8, 3, bias=True)
    lin.set_packed(seeds, codes, eb)
    lin.bias = mx.arange(10, dtype=mx.float32)
    x = mx.ones((2, 16))
    W = F.reconstruct(lin.seeds, lin.codes, lin.exp_base, 8, 3, 16)
    assert mx.allclose(lin(x), x @ W.T + lin.bias).item()
    emb = S.SeedLMEmbedding(10, 16, 8, 3)
    emb.set_packed(seeds, codes, eb)
    ids = mx.array([[3, 0, 9]])
    assert mx.array_equal(emb(ids), W[ids]).item()
    assert mx.array_equal(emb.as_linear(x), x @ W.T).item()


def small_model():
    return make_model(layerwise_config(1, 32, 16, vocab_size=64, ffn_dim_divisor=16))


@pytest.mark.parametrize("bits", [4, 3])
def test_quantize_model_save_load_exact(tmp_path, bits):
    model = small_model()
    x = mx.array([[1, 5, 9, 2, 33]])
    ref = model(x)
    embed = model.transformer.token_embeddings.weight
    report = []
    S.quantize_model(model, bits=bits, progress=False, config=FAST, report=report)
    linears = [n for n, m in model.named_modules() if isinstance(m, S.SeedLMLinear)]
    assert len(linears) == 4 and not any(isinstance(m, nn.Linear) for _, m in model.named_modules())
    assert model.transformer.token_embeddings.weight is embed  # stays at full precision
    specs = model.mlxeff_meta["quantization"]
    assert sorted(specs) == sorted(linears)
    C, P = F.CONFIGS[bits]
    spec = specs["transformer.layers.0.attn.qkv_proj"]
    assert spec == {"method": "seedlm", "K": 16, "C": C, "P": P, "bits": bits,
                    "in_features": 32, "out_features": 96}
    assert all(r["rel_error"] < (0.2 if bits == 4 else 0.3) for r in report)
    y = model(x)
    assert float(mx.abs(y - ref).max()) < 0.5 * float(mx.abs(ref).max())

    out = tmp_path / "q"
    mlxeff.save(model, None, out)
    config = json.loads((out / "config.json").read_text())
    assert config["mlxeff"]["quantization"] == specs
    loaded, _ = mlxeff.load(out)
    assert mx.array_equal(loaded(x), y).item()
    for name in linears:
        a = dict(model.named_modules())[name]
        b = dict(loaded.named_modules())[name]
        assert isinstance(b, S.SeedLMLinear)
        for key in ("seeds", "codes", "exp_base"):
            assert a[key].dtype == b[key].dtype and mx.array_equal(a[key], b[key]).item()


def test_quantize_model_include_embeddings():
    model = small_model()
    S.quantize_model(model, bits=4, include_embeddings=True, progress=False, config=FAST)
    assert isinstance(model.transformer.token_embeddings, S.SeedLMEmbedding)
    assert "transformer.token_embeddings" in model.mlxeff_meta["quantization"]
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 64) and bool(mx.isfinite(logits).all())


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(20, 12, bias=True)


class _Biased(nn.Module):
    """A Linear with a bias inside a block, and an embedding (OpenELM's layers have no bias)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 20)
        self.layers = [_Block()]

    def __call__(self, ids):
        return self.layers[0].proj(self.embed(ids))


@pytest.mark.parametrize("make", [small_model, lambda: (mx.random.seed(3), _Biased())[1]])
def test_spec_path_builds_what_quantize_model_builds(on_cpu, make):
    # one construction path: the layers quantize_model makes from float weights and the layers
    # apply_quantization_spec makes from the recorded spec (as on load) are the same modules
    quantized, built = make(), make()
    x = mx.array([[1, 5, 9, 2]])
    S.quantize_model(quantized, bits=4, include_embeddings=True, progress=False, config=FAST)
    specs = quantized.mlxeff_meta["quantization"]
    apply_quantization_spec(built, specs)
    q_mods, b_mods = dict(quantized.named_modules()), dict(built.named_modules())
    assert specs and all(type(b_mods[p]) is type(q_mods[p]) for p in specs)
    assert {type(q_mods[p]) for p in specs} == {S.SeedLMLinear, S.SeedLMEmbedding}
    assert all(b_mods[p].spec() == q_mods[p].spec() == specs[p] for p in specs)
    q_params, b_params = dict(tree_flatten(quantized.parameters())), dict(tree_flatten(built.parameters()))
    assert {k: (v.shape, v.dtype) for k, v in q_params.items()} == {k: (v.shape, v.dtype) for k, v in b_params.items()}
    built.load_weights(list(q_params.items()))  # strict: same names, shapes and dtypes
    b_params = dict(tree_flatten(built.parameters()))
    for p in specs:
        for key in ("seeds", "codes", "exp_base"):
            assert mx.array_equal(b_params[f"{p}.{key}"], q_params[f"{p}.{key}"]).item()
    assert mx.array_equal(built(x), quantized(x)).item()


def test_quantize_model_keeps_the_bias(on_cpu):
    mx.random.seed(3)
    model = _Biased()
    bias = model.layers[0].proj.bias
    S.quantize_model(model, bits=4, progress=False, config=FAST)
    proj = model.layers[0].proj
    assert isinstance(proj, S.SeedLMLinear) and proj.bias is bias
    assert model.mlxeff_meta["quantization"]["layers.0.proj"]["bias"] is True
    W = F.reconstruct(proj.seeds, proj.codes, proj.exp_base, 8, 3, 20, basis=proj.basis)
    h = model.embed(mx.array([[1, 2]]))
    assert mx.array_equal(model(mx.array([[1, 2]])), h @ W.T + bias).item()


def test_interrupted_quantize_model_leaves_the_model_as_it_was(monkeypatch):
    model = small_model()
    before = dict(tree_flatten(model.parameters()))
    calls = []

    def encode(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode_matrix(*args, **kw)

    monkeypatch.setattr(S, "encode_matrix", encode)
    with pytest.raises(KeyboardInterrupt):
        S.quantize_model(model, bits=4, progress=False, config=FAST)
    assert not any(isinstance(m, (S.SeedLMLinear, S.SeedLMEmbedding)) for _, m in model.named_modules())
    assert not (getattr(model, "mlxeff_meta", None) or {}).get("quantization")
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_quantize_model_progress_bar(capsys):
    total = sum(m.weight.shape[0] * F.num_blocks(m.weight.shape[1], 8)
                for _, m in S.quantizable_modules(small_model()))
    progress.configure(True)  # as if stderr were a terminal
    try:
        S.quantize_model(small_model(), bits=4, config=FAST)
        err = capsys.readouterr().err
        assert "seedlm 4-bit" in err and f"{total}/{total}" in err and "blocks/s" in err
        S.quantize_model(small_model(), bits=4, progress=False, config=FAST)
        assert capsys.readouterr().err == ""
    finally:
        progress.configure(None)


# ---------------------------------------------------------------------------------------------
# bad input on load


def packed_dir(tmp_path, name="bad"):
    """A saved model with random (valid) SeedLM layers, built without running the encoder."""
    model = small_model()
    specs = {}
    for path, m in S.quantizable_modules(model):
        out_f, in_f = m.weight.shape
        specs[path] = {"method": "seedlm", "K": 16, "C": 8, "P": 3, "bits": 4,
                       "in_features": in_f, "out_features": out_f}
    apply_quantization_spec(model, specs)
    for i, (path, m) in enumerate(n for n in model.named_modules() if isinstance(n[1], S.SeedLMLinear)):
        seeds, codes, eb, _, _ = random_packed(m.out_features, m.in_features, 8, 3, seed=i)
        m.set_packed(seeds, codes, eb)
    model.mlxeff_meta = {"quantization": specs}
    out = tmp_path / name
    mlxeff.save(model, None, out)
    return out


def edit_weights(path, fn):
    file = path / "model.safetensors"
    w = dict(mx.load(str(file)))
    fn(w)
    mx.save_safetensors(str(file), w)
    return file


def edit_config(path, fn):
    file = path / "config.json"
    c = json.loads(file.read_text())
    fn(c)
    file.write_text(json.dumps(c))
    return file


QKV = "transformer.layers.0.attn.qkv_proj"


def test_good_packed_dir_loads(tmp_path):
    loaded, _ = mlxeff.load(packed_dir(tmp_path))
    assert isinstance(dict(loaded.named_modules())[QKV], S.SeedLMLinear)


def _set(key, value):
    def fn(w):
        w[key] = value(w[key])
    return fn


@pytest.mark.parametrize("edit,match", [
    (_set(f"{QKV}.seeds", lambda a: mx.concatenate([mx.zeros((1, a.shape[1]), a.dtype), a[1:]])),
     r"qkv_proj\.seeds\[0, 0\] is 0"),
    (_set(f"{QKV}.exp_base", lambda a: mx.array(113, dtype=mx.int32)), r"exp_base = 113 is out of range"),
    (_set(f"{QKV}.exp_base", lambda a: mx.array(-127, dtype=mx.int32)), r"exp_base = -127 is out of range"),
    (_set(f"{QKV}.codes", lambda a: a[:, :-1]), r"qkv_proj\.codes has shape"),
    (_set(f"{QKV}.seeds", lambda a: a[:-1]), r"qkv_proj\.seeds has shape"),
    (_set(f"{QKV}.seeds", lambda a: a.astype(mx.float32)), r"qkv_proj\.seeds has dtype"),
])
def test_bad_packed_values(tmp_path, edit, match):
    path = packed_dir(tmp_path)
    file = edit_weights(path, edit)
    with pytest.raises(MlxeffError, match=match) as e:
        mlxeff.load(path)
    assert str(path) in str(e.value)
    assert e.value.path in (str(file), str(path))


@pytest.mark.parametrize("change,match", [
    ({"C": 8, "P": 9}, r"unknown SeedLM configuration C=8, P=9"),
    ({"C": 0, "P": 0}, r"unknown SeedLM configuration"),
    ({"C": "8"}, r"unknown SeedLM configuration"),
    ({"K": 12}, r"unsupported SeedLM register width"),
    ({"bits": 3}, r"stores 4 bits per weight, the spec says 3"),
    ({"in_features": 31}, r"spec says 96x31"),
])
def test_bad_spec(tmp_path, change, match):
    path = packed_dir(tmp_path)
    file = edit_config(path, lambda c: c["mlxeff"]["quantization"][QKV].update(change))
    with pytest.raises(MlxeffError, match=match) as e:
        mlxeff.load(path)
    assert e.value.path == str(file) and QKV in str(e.value)


def test_config_validation_api():
    with pytest.raises(MlxeffError):
        F.SeedLMConfig.for_bits(5)
    with pytest.raises(MlxeffError):
        F.SeedLMConfig.for_bits(4, C=8)
    assert F.SeedLMConfig.for_bits(4, C=8, P=2).bits == 3.5


@pytest.mark.parametrize("basis", F.BASES)
@pytest.mark.parametrize("C,P", [(8, 3), (12, 4), (6, 1)])
def test_cycle_columns_are_the_basis_table_of_every_seed(basis, C, P):
    """Column p of every seed's basis, read where ``reconstruct`` reads it (column 0 of the seed
    p * step places further along the cycle), is ``basis_table``'s, bit for bit."""
    rows, position, step = F._cycle_columns(C, P, basis, F.K_DEFAULT)
    table = np.array(F.basis_table(C, P, basis))
    seeds = np.arange(1, 1 << F.K_DEFAULT)
    for p in range(P):
        np.testing.assert_array_equal(rows[position[seeds] + p * step].view(np.uint32),
                                      table[seeds, :, p].view(np.uint32), err_msg=f"column {p}")


def previous_reconstruct(seeds, codes, exp_base, C, P, inp, basis):
    """The reconstruction as first written (a gather of (out, nb, C, P) bases, summed over p in
    order in float32): the oracle the faster ``F.reconstruct`` must equal bit for bit."""
    out, nb = seeds.shape
    e, c = F.unpack_codes(codes, nb, P)
    coef = c.astype(mx.float32) * F.pow2(e + mx.array(exp_base, dtype=mx.int32))[..., None]
    U = F.basis_table(C, P, basis)[seeds.astype(mx.uint32)]
    W = U[..., 0] * coef[..., None, 0]
    for p in range(1, P):
        W = W + U[..., p] * coef[..., None, p]
    return mx.contiguous(W.reshape(out, nb * C)[:, :inp])


def bits_of(a) -> np.ndarray:
    return np.array(a.astype(mx.float32)).view(np.uint32)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("basis", F.BASES)
@pytest.mark.parametrize("C,P,out,inp", [(8, 3, 70, 1283), (12, 4, 70, 1283), (12, 4, 1, 30), (8, 3, 3, 8)])
def test_reconstruct_equals_previous_formula_bit_for_bit(on_cpu, monkeypatch, threads, basis, C, P, out, inp):
    """The fast reconstruction is the same arithmetic: every seed, every code, a padded last block
    (1283 is not a multiple of 8 or 12), both bases, over the whole exponent range, in chunks of
    rows (some of them short) on one thread or several."""
    monkeypatch.setattr(F, "_CHUNK_BLOCKS", 1000)
    monkeypatch.setattr(F, "_THREADS", threads)
    monkeypatch.setattr(F, "_THREAD_MIN_BLOCKS", 0)
    for exp_base in (-6, -21, F.EXP_BASE_MIN, -118, F.EXP_BASE_MAX - 4, F.EXP_BASE_MAX):
        seeds, codes, _, _, _ = random_packed(out, inp, C, P, seed=out + inp + abs(exp_base))
        seeds[0, :] = np.arange(1, seeds.shape[1] + 1)  # the lowest and highest seeds occur
        seeds[-1, -1] = 65535
        want = previous_reconstruct(mx.array(seeds), mx.array(codes), exp_base, C, P, inp, basis)
        for eb in (exp_base, mx.array(exp_base, dtype=mx.int32)):
            got = F.reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inp, basis=basis)
            assert got.dtype == mx.float32 and got.shape == (out, inp)
            np.testing.assert_array_equal(bits_of(got), bits_of(want), err_msg=f"exp_base={exp_base}")
        got16 = F.reconstruct(mx.array(seeds), mx.array(codes), exp_base, C, P, inp, dtype=mx.float16,
                              basis=basis)
        assert got16.dtype == mx.float16
        np.testing.assert_array_equal(np.array(got16).view(np.uint16),
                                      np.array(want.astype(mx.float16)).view(np.uint16))


def test_reconstruct_off_the_cpu_fills_a_numpy_array_then_copies(on_cpu, monkeypatch):
    """Where the default device is not the CPU the result's memory may be the device's, so the
    reconstruction is not written through a view of an MLX array: same bits either way."""
    C, P, out, inp = 8, 3, 40, 100
    seeds, codes, eb, _, _ = random_packed(out, inp, C, P, seed=5)
    want = F.reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inp)
    monkeypatch.setattr(F.mx, "default_device", lambda: mx.gpu)
    made = []
    real_zeros = F.mx.zeros
    monkeypatch.setattr(F.mx, "zeros", lambda *a, **k: made.append(a) or real_zeros(*a, **k))
    got = F.reconstruct(mx.array(seeds), mx.array(codes), eb, C, P, inp)
    assert not made  # no MLX array was allocated to be written in place
    np.testing.assert_array_equal(bits_of(got), bits_of(want))
