"""`pip install .` puts cli/, convert/ and metal/ inside the mlxeff namespace, nowhere else."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile",
         "-q", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed in this environment: " + proc.stderr.strip()[-200:])
    assert proc.returncode == 0, proc.stderr
    top = {p.name for p in target.iterdir()}
    assert "mlxeff" in top
    assert not {"cli", "convert", "metal", "tests", "benchmarks"} & top, top
    for sub in ("cli/main.py", "convert/__init__.py", "metal/__init__.py", "models/lws.py",
                "train/loop.py", "cli/train_options.py"):
        assert (target / "mlxeff" / sub).is_file(), sub
    # the command-line entry point resolves to the namespaced module
    entry = next(target.glob("mlxeff-*.dist-info/entry_points.txt")).read_text()
    assert "mlxeff = mlxeff.cli.main:main" in entry
