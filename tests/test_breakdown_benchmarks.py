"""benchmarks/prefill_breakdown.py computes what the plain prefill computes, piece by piece, and
benchmarks/seedlm_sass.py finds and splits a kernel's main loop in nvdisasm's output."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def small_model():
    from mlxeff.models import Model, layerwise_config

    mx.random.seed(0)
    model = Model(layerwise_config(6, 64, 16, num_gqa_groups=2, vocab_size=97, max_context_length=128))
    mx.eval(model.parameters())
    return model


def test_breakdown_pieces_compute_the_plain_prefill(small_model):
    pb = _module("prefill_breakdown")
    prompt = mx.array(np.random.default_rng(0).integers(0, 97, 40), dtype=mx.uint32)
    ref, ref_cache = pb.run_plain(small_model, prompt, 16)
    bounds = [0, 2, 4, 6]
    for logits, cache in (pb.run_positions(small_model, prompt, 16),
                          pb.run_last_in_chunk(small_model, prompt, 16),
                          pb.run_stages(small_model, prompt, bounds, False),
                          pb.run_stages(small_model, prompt, bounds, True),
                          pb.run_stages(small_model, prompt, bounds, True, host=False)):
        np.testing.assert_allclose(np.array(logits), np.array(ref), rtol=1e-5, atol=1e-5)
        for c, r in zip(cache, ref_cache):
            assert c.offset == r.offset == 40
            np.testing.assert_allclose(np.array(c.keys[:, :, :40]), np.array(r.keys[:, :, :40]), rtol=1e-5, atol=1e-5)
        assert all(getattr(c, "scores", None) is None for c in cache)  # the importance was taken


def test_breakdown_parses_schedules():
    pb = _module("prefill_breakdown")
    got = pb.parse_schedules("1:0.9,0.8:0.5")
    assert list(got) == ["lazy 1->0.9", "lazy 0.8->0.5"]
    assert (got["lazy 0.8->0.5"].keep_start, got["lazy 0.8->0.5"].keep_end) == (0.8, 0.5)


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_3:
        /*0010*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;
        /*0020*/              @P0 BRA `(.L_x_1) ;
        /*0030*/                   STS [R3], R2 ;
.L_x_1:
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   LDS R5, [R6] ;
        /*0060*/                   FFMA R7, R5, R8, R7 ;
.L_x_2:
        /*0070*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0080*/              @P1 BRA `(.L_x_2) ;
        /*0090*/              @!P2 BRA `(.L_x_3) ;
        /*00a0*/                   EXIT ;
"""


def test_sass_main_loop_is_the_longest_backward_branch_split_at_its_barrier():
    ss = _module("seedlm_sass")
    ins, labels = ss.parse_sass(SASS)
    assert labels == {".L_x_3": 0x10, ".L_x_1": 0x40, ".L_x_2": 0x70}
    chunk, rows = ss.main_loop(ins, labels)
    assert [ss.opcode(t) for t in chunk] == ["LDG", "BRA", "STS"]
    assert [ss.opcode(t) for t in rows] == ["BAR", "LDS", "FFMA", "IADD3", "BRA", "BRA"]
    with pytest.raises(SystemExit):
        ss.main_loop(*ss.parse_sass("        /*0000*/  EXIT ;\n"))
