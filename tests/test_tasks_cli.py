"""``mlxeff eval --task``: results and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_tasks import EVAL, needs_sets, write_corpus
from typer.testing import CliRunner

from mlxeff.cli.main import app
from mlxeff.errors import MlxeffError


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXEFF_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("clicorpus"))


def invoke(*args):
    return CliRunner().invoke(app, ["eval", *args])


def test_task_json(corpus_dir, tmp_path):
    r = invoke("--task", "kv-retrieval", "--docs", "3", "--limit", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["task"] == "kv-retrieval" and out["items"] == 2 and out["settings"]["docs"] == 3
    assert 0.0 <= out["ci95"][0] <= out["accuracy"] <= out["ci95"][1] <= 1.0
    r = invoke("--task", "multidoc-qa", "--data", str(corpus_dir), "--docs", "2",
               "--context-tokens", "160", "--limit", "2")
    assert r.exit_code == 0, r.output
    assert "exact match:" in r.stdout and "95% interval" in r.stdout and "by gold position:" in r.stdout
    assert list((tmp_path / "cache").glob("heldout-shared-*.npy"))  # the held-out overlap check was cached


@pytest.mark.parametrize("args,message", [
    (["--task", "nope"], "unknown task 'nope' (choose from multidoc-qa, kv-retrieval, copy"),
    (["--task", "copy", "--docs", "3"], "--docs does not apply to --task copy"),
    (["--task", "kv-retrieval", "--context-tokens", "100"], "--context-tokens does not apply"),
    (["--task", "kv-retrieval", "--limit", "0"], "--limit must be at least 1"),
    (["--task", "copy"], "--task copy needs --data"),
    (["--task", "arc_easy"], "--task arc_easy needs --data"),
])
def test_task_errors(args, message):
    r = invoke(*args)
    assert isinstance(r.exception, MlxeffError) and message in str(r.exception), r.output


def test_more_passages_than_available(corpus_dir):
    r = invoke("--task", "multidoc-qa", "--data", str(corpus_dir), "--docs", "80",
               "--context-tokens", "16000", "--limit", "1")
    assert isinstance(r.exception, MlxeffError)
    assert "80 passages of" in str(r.exception) and "need more text than the heldout books hold" in str(r.exception)
    r = invoke("--task", "multidoc-qa", "--data", str(corpus_dir), "--docs", "80", "--limit", "1")
    assert "do not fit in --context-tokens 2000" in str(r.exception)


@needs_sets
def test_set_errors_and_scores():
    r = invoke("--task", "kv75", "--data", str(EVAL), "--docs", "76", "--limit", "1")
    assert isinstance(r.exception, MlxeffError) and "--docs 76 is not between 1 and the 75" in str(r.exception)
    r = invoke("--task", "nq-open-oracle", "--data", str(EVAL), "--docs", "5000", "--limit", "1")
    assert "--docs 5000 is larger than the 2655 passages available" in str(r.exception)
    r = invoke("--task", "piqa", "--data", str(EVAL / "piqa.jsonl.gz"), "--limit", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["items"] == 3 and out["interval"] == "Wilson score" and "accuracy_norm" in out
    r = invoke("--task", "lambada_openai", "--data", str(EVAL), "--limit", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["items"] == 2


def test_one_line_on_stderr():
    r = subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "eval", "--task", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: unknown task")
    r = invoke()
    assert r.exit_code == 2 and "give either '--perplexity' FILE or '--task' NAME" in r.output
