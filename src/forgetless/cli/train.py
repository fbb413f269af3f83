"""``forgetless train``: the command-line face of ``forgetless.train.train``."""

from __future__ import annotations

import typer

from forgetless.cli.options import config_first, parse


def train_command(
    config: str = typer.Argument(None, help="YAML config file (optional)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. method=attn."),
) -> None:
    """Fine-tune a model with one method (mofo, attn, lora, full, ...)."""
    from forgetless.train import train  # the job (torch, transformers): only when it runs

    config, overrides = config_first(config, overrides)
    result = train(config, **parse(overrides))
    metrics = result.metrics
    print(
        f"[forgetless] loss {metrics['first_loss']:.4f} -> {metrics['last_loss']:.4f} "
        f"in {metrics['steps']} steps ({metrics['train_seconds']:.0f} s)"
    )
    where = result.model_dir or result.run_dir
    print(f"[forgetless] saved to {where}")
