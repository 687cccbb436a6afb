"""``mlxeff convert`` on bad input: one clear line, exit 1, no traceback, nothing left behind."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import mlx.core as mx
import pytest

from conftest import make_model, tiny_args, write_corenet, write_hf_openelm


def run_inprocess(monkeypatch, capsys, *args):
    """``mlxeff ARGS`` through ``mlxeff.cli.main.main`` in this process: (exit code, stdout, stderr)."""
    from mlxeff.cli.main import main

    monkeypatch.setenv("MLXEFF_NO_OPENBLAS", "1")
    monkeypatch.setattr(sys, "argv", ["mlxeff", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_subprocess(*args, timeout=120):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    p = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def assert_clean_failure(result, out_dir, *needles):
    code, stdout, stderr = result
    assert code == 1, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out_dir.exists()
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]
    assert leftovers == []


@pytest.fixture
def model():
    return make_model(tiny_args())


@pytest.fixture
def hf_dir(tmp_path, model):
    return write_hf_openelm(model, tmp_path / "hf")


def convert_args(src, out, *extra):
    return ("convert", src, "-o", out, "--no-tokenizer", "--dtype", "float32", *extra)


# --- bad checkpoints ------------------------------------------------------------------------

def test_truncated_zip(tmp_path, model, monkeypatch, capsys):
    pt = write_corenet(model, tmp_path / "c.pt")
    pt.write_bytes(pt.read_bytes()[:-5000])
    out = tmp_path / "out"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(pt, out)), out,
                         "c.pt", "truncated or corrupt zip")


def test_truncated_safetensors(tmp_path, hf_dir, monkeypatch, capsys):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    out = tmp_path / "out"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(hf_dir, out)), out,
                         "model.safetensors", "truncated safetensors file")


def test_missing_keys(tmp_path, model, monkeypatch, capsys):
    from mlx.utils import tree_flatten

    d = tmp_path / "hf"
    write_hf_openelm(model, d)
    weights = dict(tree_flatten(model.parameters()))
    del weights["transformer.layers.2.ffn.proj_1.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    out = tmp_path / "out"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(d, out)), out,
                         "missing weights: transformer.layers.2.ffn.proj_1.weight")


def test_unexpected_keys_corenet(tmp_path, model, monkeypatch, capsys):
    import numpy as np

    from conftest import corenet_state
    from mlxeff.convert import torch_save as ts

    state = corenet_state(model)
    state["layers.0.attn.extra_bias"] = ts.tensor(np.zeros(4, np.float32))
    pt = ts.save(state, tmp_path / "c.pt")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(model.args.to_dict()))
    out = tmp_path / "out"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(pt, out, "--config", cfg)), out,
                         "unexpected weights: layers.0.attn.extra_bias")


def test_shape_contradicting_the_config(tmp_path, model, monkeypatch, capsys):
    d = write_hf_openelm(model, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_query_heads"][1] += 4
    cfg["num_kv_heads"][1] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(d, out)), out,
                         "transformer.layers.1.attn.qkv_proj.weight has shape", "but the config implies")


def test_unknown_model_type(tmp_path, hf_dir, monkeypatch, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(hf_dir, out)), out,
                         "config.json", "unknown model_type 'gpt2'")


def test_unknown_config_name(tmp_path, model, monkeypatch, capsys):
    pt = write_corenet(model, tmp_path / "c.pt")
    out = tmp_path / "out"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(pt, out, "--config", "openelm-5B")), out,
                         "unknown config 'openelm-5B'")
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(pt, out)), out,
                         "does not match an official OpenELM size; pass --config")


def test_bad_options(tmp_path, hf_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    for extra, needle in [(("--quantize", "affine", "--bits", "7"), "supports bits"),
                          (("--quantize", "gptq"), "unknown quantization 'gptq'"),
                          (("--dtype", "int8"), "unknown dtype 'int8'"),
                          (("--from", "corenet"), "a CoreNet checkpoint is a .pt file")]:
        assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(hf_dir, out, *extra)), out, needle)


# --- tokenizer and output -----------------------------------------------------------------

def test_missing_tokenizer(tmp_path, hf_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    result = run_inprocess(monkeypatch, capsys, "convert", hf_dir, "-o", out)
    assert_clean_failure(result, out, "no tokenizer", "--tokenizer PATH", "--no-tokenizer")
    bad = tmp_path / "nothing.model"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, "convert", hf_dir, "-o", out, "--tokenizer", bad),
                         out, "no such tokenizer file or directory")
    notsp = tmp_path / "junk.model"
    notsp.write_bytes(b"not a sentencepiece model")
    assert_clean_failure(run_inprocess(monkeypatch, capsys, "convert", hf_dir, "-o", out, "--tokenizer", notsp),
                         out, "not a SentencePiece model")


def test_existing_output_refused_and_untouched(tmp_path, hf_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_inprocess(monkeypatch, capsys, *convert_args(hf_dir, out))
    assert code == 1 and err.strip() == f"error: {out}: output already exists (use --force to replace it)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, stdout, _ = run_inprocess(monkeypatch, capsys, *convert_args(hf_dir, out, "--force", "--json"))
    assert code == 0 and json.loads(stdout)["output"] == str(out)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_malicious_pickle_in_pytorch_model_bin(tmp_path, hf_dir, monkeypatch, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (hf_dir / "model.safetensors").unlink()
    with zipfile.ZipFile(hf_dir / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"transformer.norm.weight": Evil()}, protocol=2))
        zf.writestr("archive/version", "3\n")
    out = tmp_path / "out"
    assert_clean_failure(run_inprocess(monkeypatch, capsys, *convert_args(hf_dir, out)), out,
                         "pytorch_model.bin", "refusing to load")
    assert not marker.exists()


# --- the real entry point -----------------------------------------------------------------

def test_subprocess_malicious_corenet_checkpoint(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    pt = tmp_path / "checkpoint_best.pt"
    with zipfile.ZipFile(pt, "w") as zf:
        zf.writestr("checkpoint_best/data.pkl",
                    pickle.dumps({"model_state_dict": {"norm.weight": Evil()}}, protocol=2))
    out = tmp_path / "out"
    assert_clean_failure(run_subprocess(*convert_args(pt, out)), out, "refusing to load", "system")
    assert not marker.exists()


def test_subprocess_success_summary(tmp_path, model):
    pt = write_corenet(model, tmp_path / "c.pt", rows=128)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(model.args.to_dict()))
    out = tmp_path / "out"
    code, stdout, stderr = run_subprocess("convert", pt, "-o", out, "--config", cfg, "--no-tokenizer",
                                          "--quantize", "affine", "--group-size", "32")
    assert code == 0, stderr
    for field in ("parameters", "bits/weight", "size", "time", "quantization affine 4-bit"):
        assert field in stdout, stdout
    assert "kept 96 of 128 embedding rows" in stdout
    assert (out / "config.json").exists()
