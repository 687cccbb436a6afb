"""Every bad value on the command line gets one line naming the option; -h, --version, info's default.

The cases run ``mlxeff.cli.main.main`` in this process (the real entry point: argument parsing,
usage errors, the one-line error handler) and a few through a subprocess, as a user meets them.
The source given to ``convert`` does not exist, so a value the options check accepts ends in the
"no such file" error instead: either way one line, exit code non-zero, no traceback.
"""

import random

import pytest

from test_convert_cli import run_inprocess, run_subprocess

MISSING_SRC = "no-such-checkpoint.pt"


def error_line(result, *needles, code=None):
    """The one stderr line of a failed run, checked: non-zero exit, no traceback, nothing on stdout."""
    rc, stdout, stderr = result
    assert rc != 0 if code is None else rc == code, (rc, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    assert stdout == "", stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def convert(monkeypatch, capsys, *extra):
    return run_inprocess(monkeypatch, capsys, "convert", MISSING_SRC, "-o", "never-written", *extra)


# --- convert: the values the issue names, and their neighbours ---------------------------------

BAD_CONVERT = [
    (("--bits", "3"), ("--bits", "--quantize")),  # silently ignored before
    (("--quantize", "seedlm", "--bits", "2"), ("--bits", "3 or 4")),  # said "give C and P" before
    (("--quantize", "seedlm", "--bits", "8"), ("--bits", "3 or 4")),
    (("--quantize", "affine", "--bits", "7"), ("--bits", "2, 3, 4, 5, 6 or 8")),
    (("--quantize", "affine", "--bits", "0"), ("--bits",)),
    (("--quantize", "affine", "--bits", "-4"), ("--bits",)),
    (("--group-size", "32"), ("--group-size", "--quantize affine")),
    (("--quantize", "seedlm", "--group-size", "64"), ("--group-size", "--quantize affine")),
    (("--quantize", "affine", "--group-size", "48"), ("--group-size", "32, 64 or 128")),
    (("--quantize", "affine", "--group-size", "0"), ("--group-size",)),
    (("--embedding-bits", "4"), ("--embedding-bits", "--quantize affine")),
    (("--quantize", "seedlm", "--embedding-bits", "0"), ("--embedding-bits", "--quantize affine")),
    (("--quantize", "affine", "--embedding-bits", "1"), ("--embedding-bits", "or 0")),
    (("--quantize", "affine", "--embedding-bits", "16"), ("--embedding-bits",)),
    (("--quantize", "gptq"), ("--quantize", "affine or seedlm")),
    (("--quantize", ""), ("--quantize",)),
    (("--dtype", "int8"), ("--dtype", "float16")),
    (("--dtype", "fp16"), ("--dtype",)),
    (("--from", "onnx"), ("--from", "corenet, hf or mlxeff")),
    (("--vocab-size", "0"), ("--vocab-size", "at least 1")),
    (("--vocab-size", "-32000"), ("--vocab-size",)),
    (("--tokenizer", "t.model", "--no-tokenizer"), ("--tokenizer", "--no-tokenizer")),
]


@pytest.mark.parametrize("extra,needles", BAD_CONVERT, ids=[" ".join(c[0]) for c in BAD_CONVERT])
def test_convert_bad_values(monkeypatch, capsys, extra, needles):
    error_line(convert(monkeypatch, capsys, *extra), *needles, code=1)


USAGE = [
    (("--bits", "abc"), "'--bits'"),
    (("--bits", "3.5"), "'--bits'"),
    (("--group-size", ""), "'--group-size'"),
    (("--vocab-size", "1e3"), "'--vocab-size'"),
    (("--bitz", "3"), "--bitz"),
    (("--bits",), "--bits"),
]


@pytest.mark.parametrize("extra,needle", USAGE, ids=[" ".join(c[0]) for c in USAGE])
def test_convert_usage_errors_exit_2_in_one_line(monkeypatch, capsys, extra, needle):
    line = error_line(convert(monkeypatch, capsys, *extra), needle, code=2)
    assert "mlxeff convert -h" in line


def test_convert_missing_output_option(monkeypatch, capsys):
    error_line(run_inprocess(monkeypatch, capsys, "convert", MISSING_SRC), "'--out'", code=2)


def test_convert_fuzzed_values(monkeypatch, capsys):
    """Random strings for every value option, alone and with each --quantize: always one line that
    names the option, unless the value is one the option accepts (then the missing source is next)."""
    from mlxeff.quant.affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

    accepted = {  # option -> values valid alongside the given --quantize
        ("--bits", "affine"): set(SUPPORTED_BITS), ("--bits", "seedlm"): {3, 4},
        ("--group-size", "affine"): set(SUPPORTED_GROUP_SIZES),
        ("--embedding-bits", "affine"): set(SUPPORTED_BITS) | {0},
    }
    pool = ["", " ", "-", "0", "-1", "1", "2", "3", "4", "8", "32", "48", "64", "128", "+4", " 4", "4 ",
            "07", "1e3", "0x10", "nan", "inf", "3.0", "99999999999999999999", "four", "--bits", "ü"]
    rng = random.Random(0)
    for _ in range(60):
        option = rng.choice(["--bits", "--group-size", "--embedding-bits", "--vocab-size"])
        quantize = rng.choice([None, "affine", "seedlm"])
        value = rng.choice(pool)
        extra = [f"{option}={value}"] + (["--quantize", quantize] if quantize else [])
        rc, out, err = convert(monkeypatch, capsys, *extra)
        line = error_line((rc, out, err))
        try:
            number = int(value)
        except ValueError:
            number = None
        valid = (number is not None and
                 (number >= 1 if option == "--vocab-size" else number in accepted.get((option, quantize), ())))
        if valid:
            assert MISSING_SRC in line and rc == 1, (extra, line)
        else:
            assert option in line and rc in (1, 2), (extra, line)


# --- info, eval and the app itself --------------------------------------------------------------

def test_info_defaults_to_the_embedded_model(monkeypatch, capsys):
    import json

    from mlxeff.io import default_model_dir

    rc, out, err = run_inprocess(monkeypatch, capsys, "info", "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["path"] == str(default_model_dir()) and s["parameters"] > 0
    # the embedded model says what it is: its README's first paragraph
    assert "default" in s["description"] and s["context_length"] == 2048
    rc, out, err = run_inprocess(monkeypatch, capsys, "info")
    assert rc == 0 and out.startswith("model:"), err
    assert "about:" in out and s["description"] in out


def test_info_bad_path(monkeypatch, capsys, tmp_path):
    error_line(run_inprocess(monkeypatch, capsys, "info", tmp_path / "nope"), "nope")


@pytest.mark.parametrize("args,needle", [
    (("eval", "--perplexity", "x.txt", "--window", "wide"), "'--window'"),
    (("eval",), "'--perplexity'"),
    (("generate", "hi", "--max-tokens", "many"), "'--max-tokens'"),
    (("generate",), "prompt"),
    (("conver", "x"), "'conver'"),
    (("--verbose",), "--verbose"),
])
def test_usage_errors_elsewhere(monkeypatch, capsys, args, needle):
    error_line(run_inprocess(monkeypatch, capsys, *args), needle, code=2)


@pytest.mark.parametrize("command", ["", "generate", "info", "convert", "train", "eval", "train-kv-prediction"])
def test_short_help_everywhere(monkeypatch, capsys, command):
    args = [command] if command else []
    short = run_inprocess(monkeypatch, capsys, *args, "-h")
    long = run_inprocess(monkeypatch, capsys, *args, "--help")
    assert short[0] == 0 and "Usage" in short[1] and short[2] == ""
    assert short == long


def test_version_and_help_as_a_user_runs_them():
    import mlx.core as mx

    import mlxeff

    rc, out, err = run_subprocess("--version")
    assert rc == 0 and out.strip() == f"mlxeff {mlxeff.__version__} (MLX {mx.__version__})", (out, err)
    rc, out, err = run_subprocess("-h")
    assert rc == 0 and "Usage" in out and "--version" in out and "convert" in out, err
    error_line(run_subprocess("convert", MISSING_SRC, "-o", "x", "--quantize", "seedlm", "--bits", "2"), "--bits")
    error_line(run_subprocess("convert", MISSING_SRC, "-o", "x", "--bits", "x"), "'--bits'", code=2)
