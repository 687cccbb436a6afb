"""`mlxeff train-kv-prediction` and `mlxeff generate --kv-prediction` as a user meets them."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import mlxeff
from conftest import TEXT, interruptible, make_model
from mlxeff.models import layerwise_config
from mlxeff.techniques.kv_prediction import KVPrediction
from mlxeff.techniques.kv_prediction_train import default_work_dir


def run_cli(*args, timeout=180):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    return subprocess.run([sys.executable, "-m", "mlxeff.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def run_in_process(*args):
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    return CliRunner().invoke(app, list(map(str, args)))


def assert_error(proc, *needles):
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("kvp")
    base = root / "base"
    mlxeff.save(make_model(layerwise_config(4, 64, 16, vocab_size=len(tiny_tokenizer),
                                            ffn_dim_divisor=32)), tiny_tokenizer, base)
    (root / "train.txt").write_text(TEXT * 10)
    (root / "valid.txt").write_text(TEXT * 2)
    proc = run_cli("train-kv-prediction", "--base", base, "--aux", "lp-0.5",
                   "--train", root / "train.txt", "--valid", root / "valid.txt", "--steps", 4,
                   "--seq-len", 16, "--batch-size", 2, "--eval-every", 2, "--eval-tokens", 32,
                   "--warmup", 1, "--json")
    assert proc.returncode == 0, proc.stderr
    # The work folder (checkpoints, token cache) was in the temporary directory, and is gone.
    assert not default_work_dir(base / "kv_prediction" / "lp-0.5", base).exists()
    return root, base, json.loads(proc.stdout)


def test_train_saves_a_loadable_artifact_inside_the_base(trained):
    root, base, summary = trained
    out = base / "kv_prediction" / "lp-0.5"
    assert summary["out"] == str(out) and summary["layer_map"] == [0, 0, 1, 1]
    assert summary["kv_weight"] == pytest.approx(0.25)
    assert summary["valid_initial"]["kv_l1"] > 0 and summary["valid_final"]["kv_l1"] > 0
    assert [h["step"] for h in summary["history"]["valid"]] == [2, 4]
    art = KVPrediction.load(out, base=mlxeff.load(base)[0])
    assert art.info["auxiliary"]["layers"] == [0, 2]
    assert not (base / "kv_prediction" / ".lp-0.5.train" / "checkpoints").exists()
    assert [p.name for p in (base / "kv_prediction").iterdir()] == ["lp-0.5"]
    again = run_cli("train-kv-prediction", "--base", base, "--aux", "lp-0.5",
                    "--train", root / "train.txt", "--steps", 1, "--seq-len", 16)
    assert_error(again, "already exists")


def test_generate_with_kv_prediction(trained):
    _, base, _ = trained
    for where in ("lp-0.5", base / "kv_prediction" / "lp-0.5"):
        proc = run_cli("generate", "Once upon a time there was a girl", "--model", base,
                       "--kv-prediction", where, "--max-tokens", 5, "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["generation_tokens"] >= 1 and out["ttft_s"] > 0


def test_bad_input_gives_one_line_errors(trained, tiny_tokenizer):
    root, base, _ = trained
    other = root / "other"
    mlxeff.save(make_model(layerwise_config(6, 64, 16, vocab_size=len(tiny_tokenizer),
                                            ffn_dim_divisor=32)), tiny_tokenizer, other)
    proc = run_cli("generate", "Once upon a time", "--model", other, "--kv-prediction",
                   base / "kv_prediction" / "lp-0.5", "--max-tokens", 3)
    assert_error(proc, "predictor predicts 4 layers", "6 layers")
    assert_error(run_cli("generate", "Once", "--model", base, "--kv-prediction", root / "nope"),
                 "no such KV prediction directory")
    train = ("--base", base, "--train", root / "train.txt", "--steps", 1, "--seq-len", 16,
             "--out", root / "x")
    assert_error(run_cli("train-kv-prediction", "--aux", "lp-0", *train), "kept fraction")
    assert_error(run_cli("train-kv-prediction", "--aux", root / "nomodel", *train), "no such model")
    assert_error(run_cli("train-kv-prediction", "--aux", "lp-0.5", "--kv-weight", -1, *train),
                 "--kv-weight")
    assert not (root / "x").exists()


def test_benchmark_runs_end_to_end(trained, tmp_path):
    import gzip

    root, base, _ = trained
    lam = tmp_path / "lambada.jsonl.gz"
    with gzip.open(lam, "wt") as f:
        for _ in range(2):
            f.write(json.dumps({"context": "Once upon a time there was a little",
                                "continuation": "girl"}) + "\n")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kv_prediction.py")
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, script, "--base", base, "--aux", base / "kv_prediction" / "lp-0.5",
         "--lengths", "16", "40", "--trials", "1", "--text", root / "valid.txt", "--items", "2",
         "--ctx", "8", "--cont", "4", "--lambada", lam, "--lambada-items", "2", "--json"],
        capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    row = res["ttft"]["40"]["kvp lp-0.5"]
    assert row["median_s"] > 0 and row["flops_reduction_exact"] > 1
    q = res["quality"]
    assert q["base"]["agree"] == 1.0 and set(q) == {"base", "kvp lp-0.5", "aux lp-0.5"}
    assert all(0 <= v["lambada_acc"] <= 1 and v["ppl"] > 1 for v in q.values())


def test_a_failed_run_leaves_no_work_folder(trained, tmp_path):
    """An error after the work folder was made (validation text shorter than one sequence, found
    after tokenizing) removes it: next to an explicit --out, and in the temporary directory."""
    root, base, _ = trained
    (tmp_path / "short.txt").write_text("Once upon a time")
    common = ("train-kv-prediction", "--base", base, "--train", root / "train.txt", "--valid",
              tmp_path / "short.txt", "--steps", 2, "--seq-len", 16, "--eval-tokens", 32)
    for out in (tmp_path / "mine", base / "kv_prediction" / "short"):
        work = default_work_dir(out, base)
        assert work.parent == (tmp_path if out.name == "mine" else Path(tempfile.gettempdir()))
        r = run_in_process(*common, "--out", out)
        assert "fewer than one sequence" in str(r.exception), r.output
        assert not work.exists() and not out.exists()
        assert [p.name for p in tmp_path.iterdir()] == ["short.txt"]
        assert not [p for p in (base / "kv_prediction").iterdir() if p.name.startswith(".")]


def test_ctrl_c_keeps_the_work_outside_the_base_and_resume_finishes(trained):
    import signal
    import time

    from mlxeff.train import list_checkpoints

    root, base, _ = trained
    out = base / "kv_prediction" / "lp-0.25"
    work = default_work_dir(out, base)
    args = ("train-kv-prediction", "--base", base, "--aux", "lp-0.25", "--train",
            root / "train.txt", "--steps", 100, "--seq-len", 16, "--batch-size", 2,
            "--eval-every", 5, "--warmup", 1, "--json")
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mlxeff.cli.main", *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=interruptible)
        deadline = time.monotonic() + 120
        while not list_checkpoints(work) and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert f"checkpoint {list_checkpoints(work)[-1]} (continue with --resume)" in err
        step = int(list_checkpoints(work)[-1].name.split("-")[1])
        assert 5 <= step < 100
        assert not out.exists()
        assert not [p for p in (base / "kv_prediction").iterdir() if p.name.startswith(".")]
        r = run_in_process(*args, "--resume")
        assert r.exit_code == 0, (r.output, r.exception)
        assert json.loads(r.stdout)["history"]["step"] == list(range(1, 101))
        assert KVPrediction.load(out, base=mlxeff.load(base)[0]).info["auxiliary"]["layers"] == [0]
        assert not [p for p in (base / "kv_prediction").iterdir() if p.name.startswith(".")]
        assert not work.exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_train_on_an_affine_base_saves_float_weights(tmp_path, tiny_tokenizer):
    """A base whose vocabulary matrix is 8-bit (the default model v2) stores its embedding as
    packed uint32: the artifact takes the base's float dtype, not that one."""
    import mlx.core as mx

    from mlxeff.quant.affine import quantize_affine

    model = make_model(layerwise_config(4, 64, 16, vocab_size=len(tiny_tokenizer), ffn_dim_divisor=32))
    quantize_affine(model, bits=4, group_size=32, embedding_bits=8)
    mlxeff.save(model, tiny_tokenizer, tmp_path / "base")
    (tmp_path / "train.txt").write_text(TEXT * 10)
    proc = run_in_process("train-kv-prediction", "--base", tmp_path / "base", "--aux", "lp-0.5",
                          "--train", tmp_path / "train.txt", "--steps", 2, "--seq-len", 16,
                          "--batch-size", 2, "--warmup", 1)
    assert proc.exit_code == 0, proc.output
    out = tmp_path / "base" / "kv_prediction" / "lp-0.5"
    dtypes = {str(v.dtype) for f in out.glob("*.safetensors") for v in mx.load(str(f)).values()}
    assert dtypes and dtypes <= {"mlx.core.float16", "mlx.core.bfloat16", "mlx.core.float32"}, dtypes
