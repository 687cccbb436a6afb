"""LFSR: period, worked example, normalisation, cycle table."""

import numpy as np
import pytest

from mlxeff.quant import lfsr


def test_period_k16_is_maximal():
    s, steps = 1, 0
    seen = np.zeros(1 << 16, dtype=bool)
    while True:
        assert not seen[s], "state repeated before the period closed"
        seen[s] = True
        s = lfsr.lfsr_next(s, 16)
        steps += 1
        if s == 1:
            break
    assert steps == 65535
    assert seen[1:].all() and not seen[0]


@pytest.mark.parametrize("K", sorted(lfsr.TAPS))
def test_every_default_tap_set_is_maximal(K):
    table, index = lfsr.cycle_table(K)
    assert len(table) == (1 << K) - 1
    assert sorted(table.tolist()) == list(range(1, 1 << K))


def test_non_maximal_taps_rejected():
    with pytest.raises(ValueError, match="not maximal"):
        lfsr.cycle_table(4, taps=(0, 2))  # x^4 + x^2 + 1 is reducible


def test_worked_example_general_code():
    want = [[2, 5], [6, 7], [3, 1], [4, 2]]
    got = lfsr.seed_matrix(4, C=4, P=2, K=3, taps=(0, 1), raw=True)
    assert got.tolist() == want
    # the cycle-table path gives the same matrix
    assert lfsr.seed_windows([4], C=4, P=2, K=3, taps=(0, 1))[0].tolist() == want
    assert lfsr.lfsr_states(4, 8, K=3, taps=(0, 1)).tolist() == [2, 5, 6, 7, 3, 1, 4, 2]


def test_normalize_constants():
    u = lfsr.normalize([1, 32768, 65535], 16)
    assert u.dtype == np.float32
    assert u.tolist() == [-1.0, 0.0, 1.0]
    table, _ = lfsr.cycle_table(16)
    full = lfsr.normalize(table, 16).astype(np.float64)
    assert abs(full.mean()) < 1e-9
    assert full.min() == -1.0 and full.max() == 1.0
    d = lfsr.kernel_defines(16)
    assert np.float32(float(d["SEEDLM_NORM_SCALE"].rstrip("f"))) == lfsr.norm_scale(16)
    assert int(d["SEEDLM_NORM_OFFSET"]) == 32768


def test_cycle_table_windows_match_stepping():
    rng = np.random.default_rng(0)
    seeds = rng.integers(1, 65536, size=20)
    seeds[0], seeds[1] = 1, 65535
    table, index = lfsr.cycle_table(16)
    assert table[0] == 1 and index[0] == -1 and index[1] == 0
    wins = lfsr.seed_windows(seeds, 8, 3)
    mats = lfsr.seed_matrices(seeds, 8, 3)
    for s, w, m in zip(seeds, wins, mats):
        assert (w == lfsr.seed_matrix(int(s), 8, 3, raw=True)).all()
        np.testing.assert_array_equal(m, lfsr.seed_matrix(int(s), 8, 3))
    # the window wraps around the end of the cycle
    last = int(table[-1])
    assert lfsr.seed_windows([last], 1, 2)[0].tolist() == [[1, int(table[1])]]


def test_invalid_seed():
    with pytest.raises(ValueError):
        lfsr.lfsr_states(0, 4)
    with pytest.raises(ValueError):
        lfsr.seed_windows([0], 8, 3)
    with pytest.raises(ValueError):
        lfsr.seed_windows([65536], 8, 3)
