"""``mlxeff``: convert, compress and run layer-wise scaled language models on MLX.

Every failure the user can cause ends in one line on stderr: ``error: ...`` with exit 1 for bad
files and values the library rejects, exit 2 for usage errors (unknown options, values outside
their range), as click/typer use them; Ctrl-C prints ``interrupted`` and exits 130 (the commands
write into temporary places and rename, so nothing is left half-written). On Linux with MLX's CPU
wheel, compute commands re-launch themselves with OpenBLAS preloaded (``cli/blas.py``).
"""

from __future__ import annotations

import sys

import typer

from . import blas

# typer >= 0.2x carries its own copy of click: take the exception classes from typer's MRO.
_CLICK_ERRORS = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickException, UsageError = _CLICK_ERRORS["ClickException"], _CLICK_ERRORS["UsageError"]

# Commands that do no numerical work: no re-launch with OpenBLAS, no hint.
_LIGHT_COMMANDS = {"info"}
# Commands after which the BLAS that ran is stated (on stderr, so --json stdout stays one object).
_STATE_BLAS_AFTER = {"eval", "generate"}
_from_main = False  # set by main(): typer's test runner invokes ``app`` without these extras
_command: str = ""  # the command being run


def _version(value: bool) -> None:
    if value:
        import mlx.core as mx

        import mlxeff

        typer.echo(f"mlxeff {mlxeff.__version__} (MLX {mx.__version__})")
        raise typer.Exit()


def _after_command(result, **_group_params):
    """Runs only after a command completed (not after --help or an error)."""
    if not _from_main or _command not in _STATE_BLAS_AFTER:
        return result
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        typer.echo(f"cpu blas: {blas.blas_summary()}", err=True)
    return result


app = typer.Typer(
    name="mlxeff",
    help="Efficiency toolkit for OpenELM-style language models on MLX: convert, compress, "
    "train, evaluate and generate. Every command takes -h/--help.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    result_callback=_after_command,
)


@app.callback()
def _options(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_version,
                                 help="Print the mlxeff and MLX versions and exit."),
):
    global _command
    _command = ctx.invoked_subcommand or ""


# Each command module adds its commands to the app.
from . import generate as _generate  # noqa: E402
from . import convert as _convert  # noqa: E402
from . import info as _info  # noqa: E402
from . import kv_prediction as _kv_prediction  # noqa: E402
from . import train as _train  # noqa: E402
from . import eval as _eval  # noqa: E402
from . import serve as _serve  # noqa: E402
from . import chat as _chat  # noqa: E402
from . import bench as _bench  # noqa: E402
from . import m2r2 as _m2r2  # noqa: E402

for _module in (_generate, _info, _convert, _train, _eval, _kv_prediction, _m2r2, _serve, _chat, _bench):
    _module.register(app)


def _computes(args) -> bool:
    """Whether ``mlxeff ARGS`` runs a command that does numerical work (not help, version, info)."""
    if not args or any(a in ("-h", "--help", "--version", "-V") for a in args):
        return False
    return args[0] not in _LIGHT_COMMANDS


def _usage_error_line(e: ClickException, args) -> str:
    message = e.format_message()
    if isinstance(e, UsageError):
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            path = ctx.command_path
        else:  # the parser raises some errors (an option without its value) before a context exists
            names = {c.name for c in app.registered_commands}
            path = f"mlxeff {args[0]}" if args and args[0] in names else "mlxeff"
        message += f" (see '{path} -h')"
    return f"error: {message}"


class _StderrLineEnd:
    """``sys.stderr``, remembering whether the last text written ended its line: a progress bar
    cut short by Ctrl-C leaves the cursor after it, and ``interrupted`` must start a line."""

    def __init__(self, stream):
        self._stream = stream
        self.at_line_start = True

    def write(self, text):
        n = self._stream.write(text)
        if text:
            self.at_line_start = text.endswith("\n")
        return n

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main() -> None:
    global _from_main
    from mlxeff.errors import MlxeffError
    from mlxeff.models import ConfigError

    _from_main = True
    blas.restore_environment()
    stderr = sys.stderr = _StderrLineEnd(sys.stderr)
    message = None
    try:
        if _computes(sys.argv[1:]):
            blas.relaunch_with_openblas()
        code = app(standalone_mode=False)
    except ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare ``mlxeff``: the help, as typer shows it
            e.show()
        else:  # usage errors: one line, not click's box
            message = _usage_error_line(e, sys.argv[1:])
        code = e.exit_code
    except typer.Abort:  # end of input at a prompt
        message, code = "error: aborted", 1
    except (MlxeffError, ConfigError) as e:
        message, code = f"error: {e}", 1
    except KeyboardInterrupt:  # before the command ran (typer turns one inside it into exit 130)
        code = 130
    finally:
        _from_main = False
        sys.stderr = stderr._stream
    if code == 130:  # typer's code for KeyboardInterrupt; no command exits with it itself
        message = "interrupted"
    if message:
        print(message if stderr.at_line_start else "\n" + message, file=sys.stderr, flush=True)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
