"""The command line: a thin typer layer over the stage functions (``tledge --help``)."""

from tledge.cli.commands import app, main

__all__ = ["app", "main"]
