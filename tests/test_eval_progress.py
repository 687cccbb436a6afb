"""Progress of long evaluations: a bar on stderr when asked (or on a terminal), none with --json."""

from __future__ import annotations

import json

import numpy as np
from conftest import make_model, tiny_args

from mlxeff import eval as ev
from mlxeff import progress


def test_perplexity_and_scorers_report_progress(capsys, tiny_tokenizer):
    model = make_model(tiny_args(vocab_size=96), seed=1)
    tokens = np.random.default_rng(0).integers(3, 96, size=200)
    quiet = ev.perplexity(model, tokens, window=16, stride=8, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""
    loud = ev.perplexity(model, tokens, window=16, stride=8, batch_size=4, progress=True)
    err = capsys.readouterr().err
    assert "perplexity" in err and "24/24" in err and "window" in err  # 24 windows of 16, stride 8
    assert loud == quiet
    m = make_model(tiny_args(vocab_size=len(tiny_tokenizer)), seed=2)
    items = [{"query": "Once upon a", "choices": ["time", "girl"], "gold": 0}] * 3
    ev.multiple_choice(m, tiny_tokenizer, items, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_json_output_has_no_progress(tmp_path, saved_dir, monkeypatch):
    import gzip

    from conftest import TEXT
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    path, _ = saved_dir
    f = tmp_path / "t.txt.gz"
    f.write_bytes(gzip.compress(TEXT.encode()))
    monkeypatch.setattr(progress, "_enabled", True)  # as on a terminal
    r = CliRunner().invoke(app, ["eval", str(path), "--perplexity", str(f), "--window",
                                                 "32", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tokens"] > 0 and "window" not in r.stderr
    r = CliRunner().invoke(app, ["eval", str(path), "--perplexity", str(f), "--window", "32"])
    assert r.exit_code == 0 and "perplexity" in r.stderr and "window" in r.stderr


def test_a_bar_shows_on_a_terminal_that_reports_no_size():
    """A pseudo-terminal nobody sized reports 0 x 0; tqdm alone then prints nothing at all."""
    import os
    import pty
    import subprocess
    import sys

    from test_interrupt import read_until

    master, slave = pty.openpty()  # a new pseudo-terminal has no size
    code = ("import time; from mlxeff.progress import bar\n"
            "with bar(4, desc='sized', unit='steps') as b:\n    b.update(1); time.sleep(0.3)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    try:
        seen = read_until(master, (b"1/4",), 20)
        proc.wait(timeout=20)
    finally:
        os.close(master)
    assert b"sized:" in seen and b"1/4" in seen, seen
