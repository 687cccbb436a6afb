"""benchmarks/seedlm_decode.py: a tiny CPU run has every field, and its byte counts are exact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import pytest

from mlxeff.quant import seedlm_format


def _benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "seedlm_decode.py"
    spec = importlib.util.spec_from_file_location("seedlm_decode_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def bench():
    device = mx.default_device()  # --cpu sets the default device; later tests get theirs back
    yield _benchmark_module()
    mx.set_default_device(device)


def block_shapes(args):
    """(out, in) of every Linear of the transformer blocks, from the config alone."""
    shapes = []
    for q, kv, f in zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims):
        d, hd = args.model_dim, args.head_dim
        shapes += [((q + 2 * kv) * hd, d), (d, q * hd), (2 * f, d), (d, f)]
    return shapes


def seedlm_bytes(shapes, C, P):
    """SeedLM's exact storage: per row ceil(in/C) uint16 seeds and ceil(nb(P+1)/2) code bytes
    (the last block zero-padded), plus a 4-byte exp_base per tensor."""
    total = 0
    for out, inf in shapes:
        nb = -(-inf // C)
        total += out * nb * 2 + out * (-(-nb * (P + 1) // 2)) + 4
    return total


def test_tiny_cpu_run_has_every_field_and_exact_bytes(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["--shapes", "tiny", "--formats", "fp16,seedlm4", "--max-tokens", "4", "--prompt-tokens", "16",
            "--trials", "1", "--cpu", "--json"]
    result = bench.main(argv)
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "seedlm_decode.json").read_text())
    assert printed == saved == json.loads(json.dumps(result))
    for key in ("command", "mlx", "platform", "device", "backend", "settings", "shapes"):
        assert key in saved, key
    assert saved["backend"] == "cpu" and saved["settings"]["max_tokens"] == 4

    (shape,) = saved["shapes"]
    assert shape["shape"] == "tiny"
    rows = {r["format"]: r for r in shape["formats"]}
    bases = seedlm_format.BASES
    assert set(rows) == {"fp16"} | {f"seedlm4-{b}" for b in bases if b in ("bits", "states")}
    assert "seedlm4-states" in rows

    args = bench.model_config("tiny")
    shapes = block_shapes(args)
    weights = sum(o * i for o, i in shapes)
    fp16 = rows["fp16"]["stored_bytes"]
    assert fp16["block_weights"] == weights and fp16["blocks"] == 2 * weights
    assert fp16["vocab"] == 2 * args.vocab_size * args.model_dim
    for name, row in rows.items():
        for key in ("build_s", "first_call", "build_to_first_token_s", "ttft_s", "prefill_tps", "decode_tps",
                    "ms_per_token", "floor_ms", "read_bytes_per_token", "compute_dtype"):
            assert key in row, (name, key)
        assert row["first_call"]["tokens"] == 4  # no end-of-sequence stops a run
        assert row["decode_tps"] > 0 and row["ttft_s"] > 0 and row["floor_ms"] > 0
        read = row["read_bytes_per_token"]
        assert read["total"] == read["blocks"] + read["vocab"] + read["norms"] + read["kv"]
        if name == "fp16":
            continue
        stored = row["stored_bytes"]
        assert stored["blocks"] == seedlm_bytes(shapes, 8, 3)
        assert 0.25 <= stored["blocks"] / fp16["blocks"] < 0.2502
        assert stored["block_bits_per_weight"] == pytest.approx(4.0, abs=0.01)
        assert stored["vocab"] == fp16["vocab"]  # embeddings / head stay float16 in every format
        assert row["decode_vs_fp16"] == pytest.approx(row["decode_tps"] / rows["fp16"]["decode_tps"])
        # on the CPU (no kernel) SeedLM computes from its dense float32 reconstruction, as fp16 does
        assert read["blocks"] == rows["fp16"]["read_bytes_per_token"]["blocks"] == 4 * weights


def test_seedlm3_bytes_count_the_padded_blocks(bench):
    args = bench.model_config("tiny")
    shapes = block_shapes(args)
    assert any(i % 12 for _, i in shapes)  # the tiny shape has rows that end in a padded block
    (fmt,) = bench.format_list("seedlm3-states", "states")
    model = bench.build(args, fmt)
    stored = bench.stored_bytes(model)
    assert stored["blocks"] == seedlm_bytes(shapes, 12, 4)
    assert stored["block_weights"] == sum(o * i for o, i in shapes)
    assert 3.0 < stored["block_bits_per_weight"] < 3.2
