"""The command line: a thin typer layer over the stage functions (``tledge --help``)."""

from tledge.cli import device, pipeline  # noqa: F401  (each registers its commands on the app)
from tledge.cli.app import app, main

__all__ = ["app", "main"]
