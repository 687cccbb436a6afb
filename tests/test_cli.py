"""The command line as a user meets it: real subprocesses, one-line errors, no tracebacks."""

import json
import os
import subprocess
import sys

import pytest

import mlxeff
from conftest import make_model, tiny_args


def run_cli(*args, timeout=120):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    return subprocess.run([sys.executable, "-m", "mlxeff.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_json(saved_dir):
    path, _ = saved_dir
    proc = run_cli("generate", "Once upon a time", "--model", path, "--max-tokens", 5, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["generation_tokens"] >= 1 and out["prompt_tokens"] > 0 and out["ttft_s"] > 0
    assert isinstance(out["text"], str)


def test_generate_streams_and_prints_stats(saved_dir):
    path, _ = saved_dir
    proc = run_cli("generate", "Once upon a time", "--model", path, "--max-tokens", 5, "--seed", 0)
    assert proc.returncode == 0, proc.stderr
    for line in ("Prompt:", "Generation:", "Peak memory:", "Time to first token:"):
        assert line in proc.stdout


def test_info(saved_dir):
    path, model = saved_dir
    proc = run_cli("info", path, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["parameters"] == model.args.num_parameters()
    assert [r["query_heads"] for r in info["layers"]] == model.args.num_query_heads
    assert abs(info["bits_per_weight"] - 32.0) < 1e-6  # fp32 weights
    assert info["description"] == ""  # no README.md in the directory


def test_model_description(tmp_path):
    from mlxeff.summary import model_description

    assert model_description(tmp_path) == ""
    (tmp_path / "README.md").write_text("# A title\n\nA small model\ntrained on books.\n\nMore text.\n")
    assert model_description(tmp_path) == "A small model trained on books."


def test_missing_directory(tmp_path):
    assert_one_line_error(run_cli("generate", "hi", "--model", tmp_path / "nope"), "no such model directory")


def test_directory_without_config(tmp_path):
    assert_one_line_error(run_cli("generate", "hi", "--model", tmp_path), "config.json")


def test_unknown_model_type(saved_dir):
    path, _ = saved_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("generate", "hi", "--model", path), "config.json", "model_type")


def test_truncated_safetensors(saved_dir):
    path, _ = saved_dir
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", "hi", "--model", path), "model.safetensors", "truncated")


def test_shape_mismatch(saved_dir, tmp_path):
    path, _ = saved_dir
    other = tmp_path / "other"
    mlxeff.save(make_model(tiny_args(vocab_size=96, ffn_multipliers=(1.0, 2.0))), None, other)
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    assert_one_line_error(run_cli("generate", "hi", "--model", path), "shape")
