"""``forgetless continual``: the command-line face of ``forgetless.continual.continual``."""

from __future__ import annotations

import typer

from forgetless.cli.options import config_first, confirm_code_option, unisolated_code_option
from forgetless.eval.consent import consent_overrides


def continual_command(
    config: str = typer.Argument(None, help="Continual YAML (tasks:, methods:, train:, eval:)."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, dotted into sections: train.max_steps=20 eval.limit=50"
    ),
    confirm_run_unsafe_code: bool = confirm_code_option(),
    allow_unisolated_code: bool = unisolated_code_option(),
) -> None:
    """Tune through a task sequence (each stage from the last); report R, ACC, BWT, FWT."""
    from forgetless.continual import continual  # the job (torch, transformers): when it runs
    from forgetless.verdict import continual_verdict

    config, overrides = config_first(config, overrides)
    overrides += consent_overrides(confirm_run_unsafe_code, allow_unisolated_code)
    summary = continual(config, overrides)
    for line in continual_verdict(summary):  # what it found, then the numbers
        print(f"[forgetless continual] {line}")
    for name, data in summary["methods"].items():
        print(f"[forgetless continual] {name}: ACC {data['acc']:.3f}  BWT {data['bwt']:+.3f}  "
              f"FWT {data['fwt']:+.3f}")
    print(f"[forgetless continual] report: {summary['files']['markdown']} "
          f"({summary['seconds']:.0f} s)")
