"""Ctrl-C in the middle of long work: ``interrupted``, exit 130, nothing half-written.

A real ``mlxeff convert --quantize seedlm`` of a small random model runs in a subprocess whose
stderr is a terminal (a pseudo-terminal), as a user's is, so its progress shows; SIGINT arrives
once the encoding has started.
"""

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import interruptible, make_model

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and terminals")


def read_until(fd, needles, seconds: float) -> bytes:
    out, end = b"", time.monotonic() + seconds
    while not any(n in out for n in needles) and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            out += chunk
    return out


def test_ctrl_c_during_seedlm_encoding(tmp_path):
    import mlxeff
    from mlxeff.models import layerwise_config

    # ~2.3 M weights in the blocks' linear layers: minutes of SeedLM encoding on a CPU (interrupted
    # as soon as it starts, so the test takes seconds)
    model = make_model(layerwise_config(4, 256, 32, vocab_size=96, ffn_dim_divisor=32))
    src = tmp_path / "src"
    mlxeff.save(model, None, src)
    out = tmp_path / "out"

    master, slave = pty.openpty()
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlxeff.cli.main", "convert", str(src), "-o", str(out),
                             "--quantize", "seedlm", "--bits", "4", "--no-tokenizer", "--dtype", "float32"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env,
                            preexec_fn=interruptible)
    os.close(slave)
    try:
        # the encoding's progress has started (its label, its block count or a tqdm bar)
        seen = read_until(master, (b"seedlm", b"blocks", b"%|"), 90)
        assert proc.poll() is None, seen.decode(errors="replace")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
        seen += read_until(master, (b"\x00",), 2)  # the rest of stderr (the child has exited)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    stderr = seen.decode(errors="replace")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.replace("\r", "\n").rstrip().splitlines()[-1] == "interrupted", repr(stderr[-300:])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary directory left
