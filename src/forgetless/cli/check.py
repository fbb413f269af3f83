"""``forgetless check``: the command-line face of ``forgetless.check.check`` (a CI gate)."""

from __future__ import annotations

import json

import typer

from forgetless.cli.options import (
    confirm_code_option,
    device_option,
    dtype_option,
    unisolated_code_option,
)


def check_command(
    model: str = typer.Option(..., "--model", help="Tuned model: folder, .gguf, alias, Hub id."),
    base: str = typer.Option(..., "--base", help="Reference model it must not fall behind."),
    max_drop: float = typer.Option(2.0, "--max-drop", help="Allowed accuracy drop in points."),
    max_logprob_drop: float | None = typer.Option(
        None, "--max-logprob-drop",
        help="Also gate on the mean drop of the gold choice's log-probability among the choices "
        "(nats; same rule; off by default).",
    ),
    suite: str = typer.Option("arc_easy,piqa", "--suite", help="Comma-separated benchmarks."),
    limit: int = typer.Option(200, "--limit", min=1, help="Items per benchmark (same for both)."),
    seed: int = typer.Option(0, "--seed", help="Item sampling seed."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    confirm_run_unsafe_code: bool = confirm_code_option(),
    allow_unisolated_code: bool = unisolated_code_option(),
) -> None:
    """Retention gate for CI: exit 1 when a held-out benchmark dropped by more than --max-drop.

    Per benchmark, FAIL when the point drop exceeds --max-drop AND the paired 95% CI of the
    change lies entirely below 0 (a significant drop); WARN (exit 0) when the drop exceeds the
    limit but the CI includes 0 - raise --limit to decide; PASS otherwise.
    """
    from forgetless.check import check  # the job (torch, transformers): only when it runs

    names = [s.strip() for s in suite.split(",") if s.strip()]
    result = check(model, base, suite=names, limit=limit, max_drop=max_drop, seed=seed,
                   batch_size=batch_size, device=device, dtype=dtype,
                   max_logprob_drop=max_logprob_drop,
                   confirm_run_unsafe_code=confirm_run_unsafe_code,
                   allow_unisolated_code=allow_unisolated_code)
    print(json.dumps(result.to_dict(), indent=1) if as_json else result.table())
    if not result.passed:
        raise typer.Exit(code=1)
