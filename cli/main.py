"""``mlxeff``: convert, compress and run layer-wise scaled language models on MLX."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="mlxeff",
    help="Efficiency toolkit for OpenELM-style language models on MLX: convert, compress, "
    "train, evaluate and generate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each command module adds its commands to the app.
from . import generate as _generate  # noqa: E402
from . import convert as _convert  # noqa: E402
from . import info as _info  # noqa: E402
from . import kv_prediction as _kv_prediction  # noqa: E402
from . import train as _train  # noqa: E402
from . import eval as _eval  # noqa: E402
from . import m2r2 as _m2r2  # noqa: E402

for _module in (_generate, _info, _convert, _train, _eval, _kv_prediction, _m2r2):
    _module.register(app)

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


def _reexec_with_openblas() -> None:
    """On Linux, MLX's CPU wheel bundles reference BLAS (~100x slower matmul than OpenBLAS).

    When Debian's OpenBLAS is installed, run again with it preloaded; results are identical.
    ``MLXEFF_NO_OPENBLAS=1`` opts out.
    """
    if sys.platform != "linux" or os.environ.get("MLXEFF_NO_OPENBLAS"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)
    if lib is None:
        return
    env = dict(os.environ, MLXEFF_NO_OPENBLAS="1")
    env["LD_PRELOAD"] = ":".join(filter(None, [lib, os.environ.get("LD_PRELOAD")]))
    # orig_argv repeats the interpreter's own flags (-P, -m ...) exactly as the user gave them.
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, "-m", "mlxeff.cli.main", *sys.argv[1:]])
    try:
        sys.stdout.flush()
        os.execve(sys.executable, argv, env)
    except OSError:
        return


def main() -> None:
    from mlxeff.errors import MlxeffError
    from mlxeff.models import ConfigError

    _reexec_with_openblas()
    try:
        app()
    except (MlxeffError, ConfigError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
