"""The ``tledge`` command: the typer app, its shared helpers, and ``main`` (the console script).

Exit codes: 0 success, 1 a user error (one line on stderr, no traceback), 2 bad command-line usage,
3 a failed release gate (``tledge gate``)."""

from __future__ import annotations

import sys

import typer

from tledge.errors import TledgeError

app = typer.Typer(
    name="tledge",
    help="Fine-tune a pretrained vision model, export it to ONNX, quantize it to INT8 and measure what it costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def examples(*lines: str) -> str:
    # "\b" keeps click from re-wrapping the example block.
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def print_warnings(warnings: list[str]) -> None:
    """Warnings about the figures go to stderr, where a CI log shows them even when stdout is parsed (--json)."""
    for warning in warnings:
        print(f"tledge: warning: {warning}", file=sys.stderr)


def typed_flags(ctx: typer.Context, fields: dict[str, str]) -> set[str]:
    """The settings the user typed on the command line (``fields`` maps setting names to parameter names)."""
    # by name: typer vendors its own click, whose ParameterSource is private
    return {field for field, param in fields.items() if getattr(ctx.get_parameter_source(param), "name", "") == "COMMANDLINE"}


def main() -> None:
    # Typer handles usage errors (exit 2) and --help itself; a TledgeError from a stage becomes one line and exit 1.
    import signal

    signal.signal(signal.SIGTERM, _terminated)  # CI cancels a job with SIGTERM: unwind (temporary files go), one line
    try:
        app()
    except Terminated:
        print("\ntledge: terminated; no manifest vouches for the unfinished run: run the command again", file=sys.stderr)
        sys.exit(143)
    except TledgeError as exc:
        print(f"tledge: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _say_interrupted()
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130 and _caused_by_interrupt(exc):  # typer turns Ctrl-C into a silent exit 130
            _say_interrupted()
        raise
    except OSError as exc:  # the machine's refusal mid-run (disk full, a folder removed): its reason, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"tledge: error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(1)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that ``finally`` blocks run; not an Exception, so nothing swallows it."""


def _terminated(signum, frame):
    raise Terminated()


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _say_interrupted() -> None:
    # atomic writes leave no half file and the manifest goes first, so what is left vouches for nothing half-done
    print("\ntledge: interrupted; no manifest vouches for the unfinished run: run the command again", file=sys.stderr)
