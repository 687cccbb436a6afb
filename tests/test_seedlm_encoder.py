"""SeedLM encoder: full 65535-seed search on a few hundred blocks (fast on the CPU)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxeff.quant import lfsr
from mlxeff.quant import seedlm_encoder as E

SMALL = E.EncoderConfig(batch=128)


@pytest.fixture
def on_cpu():
    """float32 matmuls in exact IEEE arithmetic for the comparisons with float64 brute force (a GPU
    backend may use reduced-precision matmul inputs)."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def dense(enc: E.EncodedMatrix, C, P, in_features):
    """Independent reconstruction: step the register for every block (no cycle table, no MLX)."""
    out, nb = enc.seeds.shape
    W = np.zeros((out, nb * C))
    for r in range(out):
        for b in range(nb):
            U = lfsr.seed_matrix(int(enc.seeds[r, b]), C, P).astype(np.float64)
            scale = 2.0 ** (int(enc.exps[r, b]) + enc.exp_base)
            W[r, b * C:(b + 1) * C] = scale * U @ enc.coeffs[r, b].astype(np.float64)
    return W[:, :in_features]


def test_planted_blocks_are_found_exactly():
    # w = 2^e U_s c for random seeds and codes: a full search must reach zero error
    C, P = 8, 3
    rng = np.random.default_rng(1)
    seeds = rng.integers(1, 65536, size=24)
    coeffs = rng.integers(-8, 8, size=(24, P))
    coeffs[:, 0] = 7  # make the exponent rule's choice unambiguous
    U = lfsr.seed_matrices(seeds, C, P).astype(np.float64)
    W = (0.25 * np.einsum("ncp,np->nc", U, coeffs)).astype(np.float32).reshape(3, 8 * C)
    enc = E.encode_matrix(W, C, P, config=SMALL)
    assert enc.sq_error < 1e-10 * enc.sq_norm
    np.testing.assert_allclose(dense(enc, C, P, 8 * C), W, rtol=0, atol=1e-6)
    assert (enc.seeds.reshape(-1) == seeds).mean() > 0.9  # the planted seed is (almost always) unique


@pytest.mark.parametrize("bits,C,P,n_blocks,bound", [(4, 8, 3, 512, 0.1254), (3, 12, 4, 384, 0.2286)])
def test_gaussian_relative_error(bits, C, P, n_blocks, bound):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((n_blocks // 16, 16 * C)).astype(np.float32)
    enc = E.encode_matrix(W, C, P, config=SMALL)
    rel = np.sqrt(enc.sq_error / enc.sq_norm)
    assert rel <= bound, f"{bits}-bit relative error {rel:.4f} > {bound}"
    # the error the encoder reports is the error of what it returns
    indep = np.linalg.norm(dense(enc, C, P, W.shape[1]) - W) / np.linalg.norm(W)
    assert abs(indep - rel) < 1e-5
    assert enc.exps.max() == 15  # the largest exponent sits at the top of the tensor's range


def test_topk_matches_brute_force(on_cpu):
    C, P = 8, 3
    rng = np.random.default_rng(2)
    W = rng.standard_normal((6, C)).astype(np.float32)
    U = lfsr.seed_matrices(np.arange(1, 65536), C, P).astype(np.float64)
    Q, _ = np.linalg.qr(U)
    energy = np.square(np.einsum("scp,nc->nsp", Q, W.astype(np.float64))).sum(-1)  # (n, S)
    t = E.search_tables(C, P, C)
    got = np.array(E.topk_seeds(mx.array(W), t, 8))
    for i in range(len(W)):
        want = np.argsort(-energy[i])[:8]
        assert set(got[i].tolist()) == set(want.tolist())
        assert (np.diff(got[i]) > 0).all()  # ascending seed order (the tie-break order)


def test_refit_never_worse_than_rounding():
    C, P = 8, 3
    rng = np.random.default_rng(3)
    W = mx.array(rng.standard_normal((64, C)).astype(np.float32))
    t = E.search_tables(C, P, C)
    cand = E.topk_seeds(W, t, 1)
    _, e, c, err = E.quantise_candidates(W, cand, t, mx.array(-126.0), mx.array(127.0), 1)
    seed = np.array(cand)[:, 0]
    Wn = np.array(W).astype(np.float64)
    for i in range(64):
        U = lfsr.seed_matrix(int(seed[i]) + 1, C, P).astype(np.float64)
        coef = np.linalg.lstsq(U, Wn[i], rcond=None)[0]
        e0 = np.ceil(np.log2(np.abs(coef).max() / 7.5))
        rnd = np.clip(np.round(coef / 2**e0), -8, 7)
        naive = np.square(Wn[i] - 2**e0 * U @ rnd).sum()
        assert float(err[i]) <= naive * (1 + 1e-5) + 1e-12


def test_zero_blocks_partial_blocks_and_range():
    C, P = 8, 3
    rng = np.random.default_rng(4)
    W = rng.standard_normal((6, 20)).astype(np.float32)  # 20 = 2 full blocks + a 4-wide tail
    W[0] = 0.0
    W[1] *= 30.0  # a 900x spread of magnitudes fits the 2^15 range of the exponent code
    W[2] /= 30.0
    enc = E.encode_matrix(W, C, P, config=SMALL)
    assert enc.seeds.shape == (6, 3) and enc.coeffs.shape == (6, 3, P)
    assert (enc.seeds[0] == 1).all() and (enc.coeffs[0] == 0).all() and (enc.exps[0] == 0).all()
    assert enc.seeds.min() >= 1 and 0 <= enc.exps.min() and enc.exps.max() == 15
    rec = dense(enc, C, P, 20)
    # tails (4 valid weights < C) are fitted on their own rows only; P=3 of 4 leaves little error
    for r in range(1, 6):
        rel = np.linalg.norm(rec[r] - W[r]) / np.linalg.norm(W[r])
        assert rel < 0.3, (r, rel)
    assert abs(np.square(rec - W).sum() - enc.sq_error) < 1e-4 * enc.sq_norm


def test_deterministic():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((4, 64)).astype(np.float32)
    a = E.encode_matrix(W, 8, 3, config=SMALL)
    b = E.encode_matrix(W, 8, 3, config=SMALL)
    assert (a.seeds == b.seeds).all() and (a.exps == b.exps).all() and (a.coeffs == b.coeffs).all()


SCRIPT = textwrap.dedent("""
    import json, sys
    import mlx.core as mx, numpy as np
    from mlxeff.quant import seedlm_encoder as E
    g = mx.distributed.init()
    W = np.random.default_rng(6).standard_normal((12, 44)).astype(np.float32)
    enc = E.encode_matrix(W, 8, 3, config=E.EncoderConfig(batch=16), group=g)
    if g.rank() == 0:
        json.dump({"size": g.size(), "seeds": enc.seeds.tolist(), "exps": enc.exps.tolist(),
                   "coeffs": enc.coeffs.tolist(), "exp_base": enc.exp_base}, open(sys.argv[1], "w"))
""")


def test_two_ranks_equal_one(tmp_path):
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed next to this Python")
    script = tmp_path / "enc.py"
    script.write_text(SCRIPT)
    out = tmp_path / "two.json"
    r = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--", sys.executable, str(script),
                        str(out)], timeout=180, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mlx.launch with the ring backend did not run here: {r.stderr.strip()[-200:]}")
    two = json.loads(out.read_text())
    W = np.random.default_rng(6).standard_normal((12, 44)).astype(np.float32)
    one = E.encode_matrix(W, 8, 3, config=E.EncoderConfig(batch=16))  # same batch grid, one rank
    assert two["size"] == 2
    assert np.array_equal(one.seeds, two["seeds"]) and np.array_equal(one.exps, two["exps"])
    assert np.array_equal(one.coeffs, two["coeffs"]) and one.exp_base == two["exp_base"]


def test_convert_on_two_ranks_writes_what_one_process_writes(tmp_path, tiny_tokenizer):
    """``mlxeff convert --quantize seedlm`` under ``mlx.launch -n 2 --backend ring``: the encoding
    is shared out, rank 0 alone writes, and the files equal a one-process convert's byte for byte.
    One layer (four weight matrices to share out): the exhaustive encoder's time grows with the
    weights, and three processes encode here (27 s per convert with the fixture's four layers)."""
    import mlxeff
    from conftest import make_model

    from mlxeff.models import layerwise_config

    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed next to this Python")
    src = tmp_path / "tiny"
    one_layer = layerwise_config(1, 64, 16, vocab_size=len(tiny_tokenizer), ffn_dim_divisor=32)
    mlxeff.save(make_model(one_layer), tiny_tokenizer, src)
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    cmd = [sys.executable, "-m", "mlxeff.cli.main", "convert", str(src), "--quantize", "seedlm",
           "--bits", "4", "--dtype", "float32", "-o"]
    one = subprocess.run(cmd + [str(tmp_path / "one")], timeout=300, capture_output=True,
                         text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--"] + cmd
                         + [str(tmp_path / "two")], timeout=300, capture_output=True, text=True,
                         env=env)
    if two.returncode != 0 and "Traceback" not in two.stderr + two.stdout:
        pytest.skip(f"mlx.launch with the ring backend did not run here: {two.stderr.strip()[-200:]}")
    assert two.returncode == 0, two.stderr + two.stdout
    assert two.stdout.count("converted ") == 1 and "on 2 ranks" in two.stdout  # rank 0 reports
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "tiny", "two"]  # no leftovers
