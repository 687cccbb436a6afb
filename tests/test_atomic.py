"""Replacing an output: killed at any step, `mlxeff convert --force` leaves the old or the new
complete OUT; the next run removes (or restores from) what the killed one left; modes follow the umask."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlxeff
from hostile import corenet_file, tiny_model
from mlxeff import atomic
from mlxeff.convert import convert

KILLER = r'''
import os, signal, sys
import mlxeff.atomic as a
import mlxeff.io as io

mode = sys.argv[1]
real_exchange, real_rename, real_write = a.exchange, os.rename, io.write_weights

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "while-writing":
    io.write_weights = lambda w, d: (real_write(w, d), die())
elif mode == "before-exchange":
    a.exchange = lambda x, y: die()
elif mode == "after-exchange":
    a.exchange = lambda x, y: (real_exchange(x, y), die())
elif mode == "between-renames":  # a filesystem without an atomic exchange
    a.exchange = lambda x, y: False
    def rename(x, y):
        real_rename(x, y)
        if ".old-" in os.fspath(y):
            die()
    os.rename = rename
from mlxeff.cli.main import main
sys.argv = ["mlxeff", "convert", *sys.argv[2:]]
main()
'''


def run(args, **kw):
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two checkpoints of the same architecture, their conversions (old, new) and the config."""
    import json

    root = tmp_path_factory.mktemp("atomic")
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    cfg = root / "config.json"
    cfg.write_text(json.dumps(a.args.to_dict()))
    pts = [corenet_file(root / "a.pt", a), corenet_file(root / "b.pt", b, seed=2)]
    refs = []
    for i, pt in enumerate(pts):
        convert(pt, root / f"ref{i}", config=cfg, tokenizer=False, dtype="float32", progress=False)
        refs.append(snapshot(root / f"ref{i}"))
    return {"cfg": cfg, "old": pts[0], "new": pts[1], "old_files": refs[0], "new_files": refs[1]}


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def leftovers(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def convert_args(src, out, cfg):
    return [str(src), "-o", str(out), "--config", str(cfg), "--no-tokenizer", "--dtype", "float32"]


@pytest.mark.parametrize("mode,expect", [("while-writing", "old"), ("before-exchange", "old"),
                                         ("after-exchange", "new"), ("between-renames", None)])
def test_kill_during_force_replacement(tmp_path, sources, mode, expect, monkeypatch):
    out = tmp_path / "OUT"
    convert(sources["old"], out, config=sources["cfg"], tokenizer=False, dtype="float32", progress=False)
    r = run(["-c", KILLER, mode, *convert_args(sources["new"], out, sources["cfg"]), "--force"])
    assert r.returncode == -9, r.stderr[-2000:]
    assert leftovers(out), "the killed run left nothing to clean (was it killed at the right step?)"
    if expect is None:
        # no exchange: the kill fell between moving OUT aside and moving the new one in
        assert not out.exists() and any(".old-" in n for n in leftovers(out))
        # the next run puts the old OUT back before anything else (here: refuses to overwrite it)
        r = run(["-m", "mlxeff.cli.main", "convert", *convert_args(sources["new"], out, sources["cfg"])])
        assert r.returncode == 1 and "already exists" in r.stderr
        expect = "old"
    assert snapshot(out) == sources[f"{expect}_files"]
    if mode != "between-renames":  # a later run (started after the killed one) cleans up
        monkeypatch.setattr(atomic, "RUN_START", time.time())
        atomic.recover(out)
    assert leftovers(out) == []
    assert snapshot(out) == sources[f"{expect}_files"]


def test_next_force_run_cleans_and_replaces(tmp_path, sources):
    out = tmp_path / "OUT"
    convert(sources["old"], out, config=sources["cfg"], tokenizer=False, dtype="float32", progress=False)
    r = run(["-c", KILLER, "after-exchange", *convert_args(sources["new"], out, sources["cfg"]), "--force"])
    assert r.returncode == -9 and leftovers(out)
    r = run(["-m", "mlxeff.cli.main", "convert", *convert_args(sources["old"], out, sources["cfg"]), "--force"])
    assert r.returncode == 0, r.stderr
    assert leftovers(out) == [] and snapshot(out) == sources["old_files"]


def test_replacement_uses_the_exchange(tmp_path, monkeypatch):
    calls = []
    real = atomic.exchange
    monkeypatch.setattr(atomic, "exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    out = tmp_path / "m"
    mlxeff.save(tiny_model(seed=0), None, out)
    mlxeff.save(tiny_model(seed=1), None, out, force=True)
    assert len(calls) == 1 and calls[0][1] == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded, _ = mlxeff.load(out)
    assert (loaded.transformer.norm.weight == tiny_model(seed=1).transformer.norm.weight).all().item()


@pytest.mark.parametrize("mask,mode", [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)])
def test_outputs_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        mlxeff.save(tiny_model(), None, tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == mode
    assert (tmp_path / "m" / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_rules(tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    out.mkdir()
    past = atomic.RUN_START - 10
    old_legacy = atomic.RUN_START - 2 * atomic.LEGACY_AGE
    entries = {
        f".OUT.tmp-{dead_pid()}-0123abcd": (past, False),        # a dead run's: removed
        f".OUT.old-{dead_pid()}-0123abcd": (past, False),
        f".OUT.tmp-{os.getpid()}-0123abcd": (past, True),        # a live process's: kept
        f".OUT.tmp-{dead_pid()}-89abcdef": (time.time() + 5, True),  # newer than this run: kept
        ".OUT.tmp-k2j4_x9a": (old_legacy, False),                # an earlier version's, old: removed
        ".OUT.tmp-q0w9e8r7": (past, True),                       # ... recent: kept
        ".OTHER.tmp-1-0123abcd": (past, True),                   # another output's: not ours to judge
    }
    for name, (mtime, _) in entries.items():
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (mtime, mtime))
    atomic.recover(out)
    kept = {p.name for p in tmp_path.iterdir()} - {"OUT"}
    assert kept == {n for n, (_, keep) in entries.items() if keep}


def test_recover_restores_a_missing_output(tmp_path):
    aside = tmp_path / f".OUT.old-{dead_pid()}-0123abcd"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    os.utime(aside, (atomic.RUN_START - 10, atomic.RUN_START - 10))
    atomic.recover(tmp_path / "OUT")
    assert (tmp_path / "OUT" / "config.json").read_text() == "{}" and not aside.exists()


def test_scratch_folders_of_killed_runs_are_cleaned(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"mlxeff-tokcheck-{dead_pid()}-0123abcd"
    legacy = tmp_path / "mlxeff-tokcheck-abcd1234"
    for d in (stale, legacy):
        d.mkdir()
    os.utime(stale, (atomic.RUN_START - 10,) * 2)
    os.utime(legacy, (atomic.RUN_START - 2 * atomic.LEGACY_AGE,) * 2)
    with atomic.scratch_directory("mlxeff-tokcheck-") as scratch:
        assert scratch.parent == tmp_path and scratch.stat().st_mode & 0o777 == 0o700
        assert sorted(p.name for p in tmp_path.iterdir()) == [scratch.name]
    assert list(tmp_path.iterdir()) == []


def test_exchange_swaps(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    if not atomic.exchange(a, b):
        assert (a / "x").exists() and not (b / "x").exists()  # nothing moved
        pytest.skip("no atomic exchange on this system or filesystem (the fallback is tested above)")
    assert (b / "x").exists() and not (a / "x").exists()
