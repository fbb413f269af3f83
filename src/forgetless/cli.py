"""The ``forgetless`` command line: one sub-command per job, each thin over the Python API."""

from __future__ import annotations

import sys

import typer

from forgetless.check import check_command
from forgetless.compare import compare_command
from forgetless.continual import continual_command
from forgetless.errors import ForgetlessError
from forgetless.eval.cli import eval_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune language models without catastrophic forgetting, and measure it.",
)


@app.callback()
def _root() -> None:
    """Keep sub-commands even while only one is registered (typer would otherwise flatten)."""


@app.command("train")
def train_command(
    config: str = typer.Argument(None, help="YAML config file (optional)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. method=attn."),
) -> None:
    """Fine-tune a model with one method (mofo, attn, lora, full, ...)."""
    from forgetless.train import train

    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides, config = [config, *(overrides or [])], None
    result = train(config, **_overrides(overrides))
    metrics = result.metrics
    print(
        f"[forgetless] loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f} "
        f"in {metrics['steps']} steps ({metrics['train_seconds']:.0f} s)"
    )
    where = result.model_dir or result.run_dir
    print(f"[forgetless] saved to {where}")


def _overrides(pairs: list[str] | None) -> dict:
    from forgetless.config import parse_overrides

    return parse_overrides(pairs or [])


# Further sub-commands register themselves here, one line each (code in their own modules).
app.command("eval")(eval_command)
app.command("continual")(continual_command)
app.command("check")(check_command)
app.command("compare")(compare_command)


def main() -> None:
    """Console entry point: a ForgetlessError becomes one line on stderr and exit code 2."""
    try:
        app()
    except ForgetlessError as err:
        print(f"forgetless: error: {err}", file=sys.stderr)
        sys.exit(2)
