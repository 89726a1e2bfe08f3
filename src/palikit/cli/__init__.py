"""The `palikit` command line: a typer app whose commands are thin wrappers over library functions.
Errors a user can fix are printed as one clear message (exit code 2); the traceback is shown only
with PALIKIT_DEBUG=1."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="palikit",
    help="Run, fine-tune, serve and evaluate PaliGemma / PaliGemma 2 on your own hardware.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from . import batch as _batch  # noqa: E402,F401  (registers commands)
from . import bench as _bench  # noqa: E402,F401
from . import check as _check  # noqa: E402,F401
from . import demo as _demo  # noqa: E402,F401
from . import evaluate as _evaluate  # noqa: E402,F401
from . import export as _export  # noqa: E402,F401
from . import info as _info  # noqa: E402,F401
from . import predict as _predict  # noqa: E402,F401
from . import quantize as _quantize  # noqa: E402,F401
from . import serve as _serve  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ImportError, OSError)


def main(argv: list[str] | None = None) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)  # click returns (not raises) the exit code of Exit/Ctrl-C here
        return rc if isinstance(rc, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become messages
        import click

        # typer vendors its own click (typer._click): its usage errors (an unknown option, a bad value) are
        # TyperExceptions, not click.ClickExceptions; both print their usage line, never a traceback
        if isinstance(e, (click.ClickException, typer.TyperException)) and hasattr(e, "show"):
            e.show()
            return e.exit_code
        if os.environ.get("PALIKIT_DEBUG") == "1" or not isinstance(e, USER_ERRORS):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
