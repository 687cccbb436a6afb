"""``mlxeff bench``: rows, statistics, the machine line and every output format, on a tiny model."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

import mlxeff
from conftest import make_model, tiny_args
from mlxeff import bench
from mlxeff.errors import MlxeffError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("bench") / "tiny"
    mlxeff.save(make_model(tiny_args(vocab_size=len(tiny_tokenizer)), seed=1), tiny_tokenizer, path)
    return path


def run_cli(*args, cwd=None):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    return subprocess.run([sys.executable, "-m", "mlxeff.cli.main", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_run_bench_rows_and_reports(tiny):
    model, _ = mlxeff.load(tiny)
    combos = [bench.Combination("tiny", model, {}, "baseline", tiny, model.args.num_parameters(), 1),
              bench.Combination("tiny", model, {"lookup": {}}, "--lookup", tiny,
                                model.args.num_parameters(), 1)]
    result = bench.run_bench(combos, [16, 8], [6], reps=3)
    assert [(r.techniques, r.test) for r in result.rows] == [
        ("baseline", "pp16"), ("baseline", "pp8"), ("baseline", "tg6"),
        ("--lookup", "pp16"), ("--lookup", "pp8"), ("--lookup", "tg6")]
    for r in result.rows:
        assert len(r.tps) == 3 and all(x > 0 for x in r.tps) and r.tps_std >= 0
        assert len(r.ttft_s) == 3 and r.ttft_ms_mean > 0
    pp16 = result.rows[0]
    assert pp16.tps_mean == pytest.approx(sum(16 / t for t in pp16.ttft_s) / 3)
    assert result.rows[2].tokens_per_forward is None and result.rows[5].tokens_per_forward >= 1.0
    md = bench.to_markdown(result)
    assert md.startswith("machine: ") and "backend cpu" in md and "MLX " in md
    assert md.count("| tiny |") == 6 and "| pp16 |" in md and "| tg6 |" in md
    rows = list(csv.DictReader(io.StringIO(bench.to_csv(result))))
    assert len(rows) == 6 and rows[0]["test"] == "pp16" and float(rows[0]["tps_mean"]) > 0
    data = json.loads(bench.to_json(result))
    assert data["machine"]["backend"] == "cpu" and len(data["rows"]) == 6
    assert data["rows"][0]["tps"] == pp16.tps


def test_run_bench_checks_sizes(tiny):
    model, _ = mlxeff.load(tiny)
    combo = [bench.Combination("tiny", model, {})]
    for kw, needle in ((dict(prompt_sizes=[], gen_sizes=[1]), "-n"),
                       (dict(prompt_sizes=[0], gen_sizes=[]), "-p"),
                       (dict(prompt_sizes=[], gen_sizes=[]), "nothing"),
                       (dict(prompt_sizes=[4], gen_sizes=[], reps=0), "-r")):
        with pytest.raises(MlxeffError, match=needle):
            bench.run_bench(combo, **kw)


def test_machine_info():
    m = bench.machine_info()
    assert m["backend"] in ("cpu", "gpu (Metal)", "gpu (CUDA)")
    assert m["mlx"] != "unknown" and m["mlxeff"] != "unknown"
    assert bench.machine_line(m)


def test_bench_command_writes_table_json_csv_and_plot(tiny, tmp_path):
    proc = run_cli("--model", tiny, "-p", "32", "-n", "8", "-r", "3", "--combo", "--lookup --lookup-draft 4",
                   "--plot", tmp_path / "bench.png", "--json", tmp_path / "bench.json",
                   "--csv", tmp_path / "bench.csv")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("machine: ")
    assert "| baseline | pp32 |" in proc.stdout and "| --lookup --lookup-draft 4 | tg8 |" in proc.stdout
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["test"] for r in data["rows"]] == ["pp32", "tg8", "pp32", "tg8"]
    assert all(len(r["tps"]) == 3 for r in data["rows"])
    assert len(list(csv.DictReader(open(tmp_path / "bench.csv")))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_plot_comes_with_its_numbers(tiny, tmp_path):
    proc = run_cli("--model", tiny, "-p", "8", "-n", "4", "-r", "1", "--plot", tmp_path / "b.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["test"] for r in data["rows"]] == ["pp8", "tg4"] and data["machine"]["mlx"]


def test_bench_command_outputs_and_flags(tiny):
    proc = run_cli("--model", tiny, "-p", "8,16", "-n", "0", "-r", "1", "-o", "json", "--no-baseline",
                   "--lookup")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [(r["techniques"], r["test"]) for r in data["rows"]] == [("--lookup", "pp8"), ("--lookup", "pp16")]


@pytest.mark.parametrize("args,needle", [
    (["--combo", "--nope"], "--nope"),
    (["--combo", "--lookup-draft"], "--lookup-draft"),
    (["--combo", "--lookup-draft 0"], "--lookup-draft"),
    (["-n", "1"], "-n"),
    (["-p", "x"], "-p"),
    (["-p", "0", "-n", "0"], "nothing"),
    (["-o", "xml"], "--output"),
    (["--plot", "/nonexistent/dir/b.png"], "no such directory"),
])
def test_bench_command_refuses_bad_options(tiny, args, needle):
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    result = CliRunner().invoke(app, ["bench", "--model", str(tiny), "-r", "1", *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_bench_help_lists_every_option():
    from typer.testing import CliRunner

    from mlxeff.cli.main import app

    out = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--model", "--n-prompt", "-p", "--n-gen", "-n", "--repetitions", "-r", "--combo",
                 "--no-baseline", "--output", "--json", "--csv", "--plot", "--prefill-step-size",
                 "--seed", "--dtype", "--lazy", "--lookup"):
        assert flag in out, flag
