"""Training loop: loss goes down, exact resume, same seed same curve, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import interruptible, make_model, tiny_args
from mlx.utils import tree_flatten

from mlxeff import data
from mlxeff.errors import MlxeffError
from mlxeff.train import (
    TrainConfig, cross_entropy_terms, list_checkpoints, lm_loss, lr_schedule, train_loop,
)
from test_data import write_corpus

# A learnable stream: a fixed pseudo-random token walk with repeats.
STREAM = np.random.default_rng(0).integers(3, 96, size=257).repeat(2)
STREAM = np.tile(STREAM, 12)
DATASET = data.PackedDataset(STREAM, 32, seed=0)


def batch_fn(k):
    return mx.array(DATASET.batch(k, 4))


def run(out, steps=24, seed=0, dtype="float32", accum=1, save_every=8, batches=batch_fn, **kw):
    model = make_model(tiny_args(vocab_size=96), seed=seed)
    cfg = TrainConfig(steps=steps, batch_size=4, seq_len=32, accum=accum, warmup=4, lr=3e-3,
                      dtype=dtype, save_every=save_every, seed=seed, log_every=4)
    result = train_loop(model, lambda m, b: lm_loss(m, b, 1e-4), batches, cfg, out_dir=out,
                        log=lambda rec: None, **kw)
    return model, result


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mlxeff.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_lm_loss_and_z_loss():
    model = make_model()
    batch = mx.array(DATASET.batch(0, 2))
    logits = model(batch[:, :-1])
    nll, lse = cross_entropy_terms(logits, batch[:, 1:])
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ref = -mx.take_along_axis(logp, batch[:, 1:, None], axis=-1).squeeze(-1)
    assert mx.allclose(nll, ref, atol=1e-5)
    loss0, m = lm_loss(model, batch, 0.0)
    loss1, _ = lm_loss(model, batch, 0.5)
    assert abs(loss0.item() - m["ce"].item()) < 1e-6
    assert abs(loss1.item() - loss0.item() - 0.5 * mx.square(lse).mean().item()) < 1e-4


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    s = lr_schedule(cfg)
    lrs = [s(mx.array(i)).item() for i in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)


@pytest.mark.parametrize("dtype,accum", [("float32", 1), ("bfloat16", 2)])
def test_resume_after_interruption_is_exact(tmp_path, dtype, accum):
    _, full = run(tmp_path / "full", dtype=dtype, accum=accum)

    def interrupted(k):
        if k == 19 * accum:  # during step 20, after the checkpoint of step 16
            raise KeyboardInterrupt
        return batch_fn(k)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", dtype=dtype, accum=accum, batches=interrupted)
    # The interrupt saved the last completed step next to the periodic checkpoint of step 16
    # (two are kept).
    ckpts = list_checkpoints(tmp_path / "cut")
    assert [p.name for p in ckpts] == ["step-0000016", "step-0000019"]
    assert not [p for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith(".")]
    shutil.copytree(tmp_path / "cut", tmp_path / "periodic")
    shutil.rmtree(tmp_path / "periodic" / "checkpoints" / "step-0000019")
    for where, start in (("cut", 19), ("periodic", 16)):
        _, resumed = run(tmp_path / where, dtype=dtype, accum=accum, resume=True)
        assert resumed["start_step"] == start
        # Same operations on the same values: the CPU reproduces the uninterrupted run bit for bit.
        assert resumed["history"]["loss"] == full["history"]["loss"]
        assert resumed["history"]["step"] == list(range(1, 25))


def test_same_seed_same_curve_and_loss_falls(tmp_path):
    model, a = run(tmp_path / "a", steps=30, save_every=0)
    _, b = run(tmp_path / "b", steps=30, save_every=0)
    _, c = run(tmp_path / "c", steps=30, save_every=0, seed=1)
    assert a["history"]["loss"] == b["history"]["loss"]
    assert a["history"]["loss"] != c["history"]["loss"]
    assert np.mean(a["history"]["loss"][-5:]) < 0.7 * a["history"]["loss"][0]
    # no compile gives the same curve
    m2 = make_model(tiny_args(vocab_size=96))
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=32, warmup=4, lr=3e-3, compile=False, log_every=4)
    d = train_loop(m2, lambda m, b: lm_loss(m, b, 1e-4), batch_fn, cfg, out_dir=tmp_path / "d",
                   log=lambda rec: None)
    assert d["history"]["loss"] == a["history"]["loss"]


def test_automatic_checkpoints(tmp_path, monkeypatch):
    import mlxeff.train.loop as loop

    assert not loop.auto_save_due(599.0, 1.0) and loop.auto_save_due(600.0, 1.0)
    # A slow checkpoint (30 s) waits 50x as long, so checkpoints stay under 2% of the time.
    assert not loop.auto_save_due(1499.0, 30.0) and loop.auto_save_due(1500.0, 30.0)
    assert TrainConfig().save_every is None  # automatic by default
    monkeypatch.setattr(loop, "AUTO_SAVE_SECONDS", 0.0)
    saved = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda out, step, *a: saved.append(step) or
                        real(out, step, *a))
    run(tmp_path, steps=12, save_every=None)
    assert len(saved) > 1 and saved[-1] == 12 and saved == sorted(set(saved))


def test_progress_bar_shows_loss_lr_and_tokens_per_s(tmp_path, capsys, monkeypatch):
    import mlxeff.progress

    monkeypatch.setattr(mlxeff.progress, "_enabled", None)
    model = make_model(tiny_args(vocab_size=96))
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup=1, log_every=2)
    train_loop(model, lm_loss, batch_fn, cfg, out_dir=tmp_path / "a", progress=True)
    err = capsys.readouterr().err
    assert "training" in err and "4/4" in err
    assert all(k in err for k in ("loss=", "lr=", "tok/s=")), err
    train_loop(model, lm_loss, batch_fn, cfg, out_dir=tmp_path / "b")  # stderr is no terminal
    lines = capsys.readouterr().err.splitlines()  # no bar: the first and the last step as lines
    assert [ln.split("  ")[0] for ln in lines if ln.startswith("step ")] == ["step 2/4", "step 4/4"]
    assert not [ln for ln in lines if "training" in ln or "\r" in ln]


def test_frozen_parameters_stay_frozen(tmp_path):
    model = make_model(tiny_args(vocab_size=96))
    model.freeze()
    model.transformer.layers[-1].unfreeze()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    cfg = TrainConfig(steps=5, batch_size=4, seq_len=32, warmup=1, log_every=5)
    train_loop(model, lambda m, b: lm_loss(m, b), batch_fn, cfg, out_dir=tmp_path, log=lambda r: None)
    after = dict(tree_flatten(model.parameters()))
    changed = {k for k in before if not np.array_equal(before[k], np.array(after[k]))}
    assert changed and all(k.startswith("transformer.layers.3.") for k in changed)


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    import mlxeff.train.checkpoints as t

    real = t.mx.save_safetensors
    calls = {"n": 0}

    def flaky(path, arrays, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's optimizer file
            raise OSError("disk full")
        return real(path, arrays, *a, **k)

    monkeypatch.setattr(t.mx, "save_safetensors", flaky)
    with pytest.raises(OSError):
        run(tmp_path, steps=24)
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step-0000008"]
    assert sorted(f.name for f in ckpts[0].iterdir()) == [
        "optimizer.safetensors", "params.safetensors", "state.json"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resume_refuses_other_config(tmp_path):
    run(tmp_path, steps=8)
    model = make_model(tiny_args(vocab_size=96))
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=32, warmup=4, lr=1e-3, save_every=8, log_every=4)
    with pytest.raises(MlxeffError, match="different training config \\(lr"):
        train_loop(model, lm_loss, batch_fn, cfg, out_dir=tmp_path, resume=True, log=lambda r: None)
    other = make_model(tiny_args(vocab_size=96, num_gqa_groups=2))
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=32, warmup=4, lr=3e-3, save_every=8, log_every=4)
    with pytest.raises(MlxeffError, match="different model"):
        train_loop(other, lm_loss, batch_fn, cfg, out_dir=tmp_path, resume=True, log=lambda r: None)
    with pytest.raises(MlxeffError, match="--resume"):
        train_loop(model, lm_loss, batch_fn, cfg, out_dir=tmp_path, log=lambda r: None)


@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs the MLX CUDA backend (GPU machine)")
def test_cuda_bf16_training_and_resume(tmp_path):
    with mx.stream(mx.gpu):
        _, full = run(tmp_path / "full", dtype="bfloat16", steps=24)
        assert np.mean(full["history"]["loss"][-4:]) < 0.7 * full["history"]["loss"][0]

        def interrupted(k):
            if k == 19:
                raise KeyboardInterrupt
            return batch_fn(k)

        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "cut", dtype="bfloat16", batches=interrupted)
        _, resumed = run(tmp_path / "cut", dtype="bfloat16", resume=True)
    # GPU kernels may reduce in a different order from run to run; allow float noise.
    np.testing.assert_allclose(resumed["history"]["loss"], full["history"]["loss"], rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# the CLI


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d / "train", n_files=2, sentences=1500)
    write_corpus(d / "valid", n_files=1, sentences=300)
    return d


TINY = ["--layers", 2, "--model-dim", 64, "--head-dim", 16, "--ffn-divisor", 16, "--seq-len", 64,
        "--batch-size", 8, "--warmup", 20, "--lr", 3e-3, "--min-lr", 3e-4, "--log-every", 50]


def test_cli_train_lowers_validation_loss(corpus, tmp_path):
    out = tmp_path / "run"
    r = cli("train", "--train", corpus / "train" / "part-*", "--valid", corpus / "valid" / "part-0.txt",
            "--vocab-size", 300, "--steps", 150, "--eval-every", 75, "--eval-tokens", 4096,
            *TINY, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["valid_loss"] < math.log(300) - 2.0  # a uniform guess scores ln(V) = 5.7
    valid = summary["history"]["valid"]
    assert [v["step"] for v in valid] == [75, 150] and valid[1]["loss"] < valid[0]["loss"]
    assert summary["tokens_seen"] == 150 * 8 * 64
    assert (out / "model" / "model.safetensors").is_file()
    g = cli("generate", "The little", "--model", out / "model", "--max-tokens", 20, "--json")
    assert g.returncode == 0, g.stderr
    assert json.loads(g.stdout)["generation_tokens"] >= 1
    e = cli("eval", out / "model", "--perplexity", corpus / "valid" / "part-0.txt", "--window", 64,
            "--max-tokens", 3000, "--json")
    assert e.returncode == 0, e.stderr
    ev = json.loads(e.stdout)
    assert ev["tokens"] == 2999 and ev["ppl"] < 300 / math.e ** 2


def test_cli_bad_input_is_one_line(corpus, tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Caf\u00e9 cr\u00e8me\n".encode("latin-1") * 100)
    r = cli("train", "--train", f, "--vocab-size", 300, "--steps", 4, *TINY, "--out", tmp_path / "run")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == f"error: {f}: not valid UTF-8 (byte 3: b'\\xe9 cr')"
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "run").exists()


def _cli_in_process(*args) -> dict:
    """``mlxeff ARGS --json`` through typer in this process: the printed summary."""
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    r = CliRunner().invoke(app, list(map(str, args)))
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(r.stdout)


def _train_in_process(train, out, extra=()):
    """``mlxeff train`` through typer in this process; errors surface as exceptions, which the
    installed entry point (``mlxeff.cli.main.main``) prints as one line and exit code 1."""
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    args = ["train", "--train", str(train), "--vocab-size", "300", "--steps", "4",
            *map(str, TINY), "--out", str(out), *map(str, extra)]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("case", ["empty", "heads", "resume_other", "two_tokenizers",
                                  "small_vocab", "steps", "eval_tokens"])
def test_cli_bad_input(corpus, tmp_path, case):
    from mlxeff.models import ConfigError

    train = corpus / "train" / "part-0.txt"
    out = tmp_path / "run"
    if case == "empty":
        train = tmp_path / "empty.txt"
        train.write_text("")
        r, expect = _train_in_process(train, out), "the corpus is empty"
    elif case == "heads":
        r, expect = _train_in_process(train, out, ["--model-dim", 100]), "not a multiple of head_dim"
    elif case == "two_tokenizers":
        r = _train_in_process(train, out, ["--tokenizer", tmp_path])
        expect = "give either --tokenizer DIR or --vocab-size N"
    elif case == "small_vocab":  # found by the tokenizer trainer, after OUT was made: removed again
        r, expect = _train_in_process(train, out, ["--vocab-size", 100]), "--vocab-size must be"
    elif case == "steps":
        r, expect = _train_in_process(train, out, ["--steps", 0]), "steps must be at least 1"
    elif case == "eval_tokens":
        r = _train_in_process(train, out, ["--eval-tokens", 8])
        expect = "--eval-tokens (8) must cover one sequence"
    else:
        first = _train_in_process(train, out)
        assert first.exit_code == 0, first.output
        r = _train_in_process(train, out, ["--layers", 3, "--resume"])
        expect = "checkpoint is for a different model ("
    assert isinstance(r.exception, (MlxeffError, ConfigError)), r.output
    assert expect in str(r.exception) and "\n" not in str(r.exception)
    if case != "resume_other":
        assert not (out / "model").exists() and not list_checkpoints(out)
        assert not out.exists()  # no empty or half-filled output folder


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])  # Ctrl-C; a scheduler's or timeout's stop
def test_cli_ctrl_c_checkpoints_and_resume_is_exact(tmp_path, tiny_tokenizer, stop):
    """SIGINT during ``mlxeff train``: exit 130, a checkpoint of the last completed step, and
    ``--resume`` ends where an uninterrupted run ends, bit for bit."""
    import signal
    import time

    from conftest import TEXT

    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    (tmp_path / "train.txt").write_text(TEXT * 20)
    args = ["train", "--train", tmp_path / "train.txt", "--tokenizer", tok, "--steps", 300,
            "--layers", 1, "--model-dim", 32, "--head-dim", 16, "--ffn-divisor", 16, "--seq-len", 16,
            "--batch-size", 2, "--warmup", 5, "--log-every", 100, "--json"]
    cut = tmp_path / "cut"
    # The same BLAS as this process (no OpenBLAS re-launch), so the runs below can be in-process.
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlxeff.cli.main", *map(str, args),
                             "--out", str(cut), "--save-every", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    # Any complete checkpoint (only the newest two are kept: step 10 may be gone by the next poll).
    while not list_checkpoints(cut) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.send_signal(getattr(signal, stop))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(cut)]
    assert 10 <= steps[-1] < 300, steps
    assert f"interrupted at step {steps[-1]}/300: checkpoint {list_checkpoints(cut)[-1]}" in err
    assert not [p for p in (cut / "checkpoints").iterdir() if p.name.startswith(".")]
    resumed = _cli_in_process(*args, "--out", cut, "--resume")
    full = _cli_in_process(*args, "--out", tmp_path / "full")
    assert resumed["resumed_from"] == steps[-1]
    assert resumed["history"]["step"] == list(range(1, 301))
    assert resumed["history"]["loss"] == full["history"]["loss"]


def test_sigterm_handler_is_installed_and_restored():
    import signal

    from mlxeff.train import loop

    before = signal.getsignal(signal.SIGTERM)
    restore = loop.terminate_as_interrupt()
    assert signal.getsignal(signal.SIGTERM) is not before
    with pytest.raises(KeyboardInterrupt):
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_report_without_a_bar_writes_step_lines_sparingly():
    from mlxeff.train.report import TrainReport

    lines = []
    report = TrainReport(20, 0, say=lines.append, show=False)
    for step in (5, 10, 15):
        report({"step": step, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.0})
    report({"step": 15, "valid_loss": 2.0})
    report({"step": 20, "loss": 2.25, "lr": 1e-4, "tokens_per_s": 5678.0})
    report.close()
    assert lines == ["step 5/20  loss 2.5000  lr 1.00e-03  1,234 tok/s",
                     "step 15/20  valid loss 2.0000  ppl 7.39",
                     "step 20/20  loss 2.2500  lr 1.00e-04  5,678 tok/s"]


def test_cli_init_continues_from_a_quantized_model(corpus, tmp_path):
    """``--init DIR``: the run starts from DIR's weights (affine layers dequantized) with DIR's shape
    and tokenizer; with a learning rate of ~0 the saved model is DIR's, dequantized."""
    import mlxeff
    from mlxeff.io import default_model_dir
    from mlxeff.quant.affine import dequantize_affine

    out = tmp_path / "cont"
    summary = _cli_in_process("train", "--init", default_model_dir(), "--train",
                              corpus / "train" / "part-0.txt", "--steps", 1, "--seq-len", 64,
                              "--batch-size", 2, "--lr", 1e-12, "--min-lr", 1e-13, "--warmup", 0,
                              "--weight-decay", 0, "--out", out, "--json")
    assert summary["init"] == str(default_model_dir())
    base, _ = mlxeff.load(default_model_dir())
    dequantize_affine(base)
    cont, tok = mlxeff.load(out / "model")
    assert tok is not None and cont.args.num_transformer_layers == base.args.num_transformer_layers
    a, b = dict(tree_flatten(base.parameters())), dict(tree_flatten(cont.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k].astype(mx.float16), b[k], atol=0, rtol=0).item(), k


@pytest.mark.parametrize("extra,expect", [(["--vocab-size", 300], "--vocab-size does not apply"),
                                          ([], "not a model directory (no config.json)")])
def test_cli_init_bad_input(corpus, tmp_path, extra, expect):
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    init = tmp_path / "nomodel" if not extra else __import__("mlxeff").io.default_model_dir()
    r = CliRunner().invoke(app, ["train", "--init", str(init), "--train",
                                 str(corpus / "train" / "part-0.txt"), "--steps", "1",
                                 "--out", str(tmp_path / "run"), *extra])
    assert isinstance(r.exception, MlxeffError) and expect in str(r.exception)
    assert not (tmp_path / "run").exists()
