"""The ``forgetless`` command line: one sub-command per job, each thin over the Python API."""

from __future__ import annotations

import sys

import typer

from forgetless.errors import ForgetlessError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune language models without catastrophic forgetting, and measure it.",
)

# Sub-commands register themselves here, one line each (their code lives in their own modules).


def main() -> None:
    """Console entry point: a ForgetlessError becomes one line on stderr and exit code 2."""
    try:
        app()
    except ForgetlessError as err:
        print(f"forgetless: error: {err}", file=sys.stderr)
        sys.exit(2)
