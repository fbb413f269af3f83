"""``forgetless compare``: the command-line face of ``forgetless.compare.compare``."""

from __future__ import annotations

import typer

from forgetless.cli.options import confirm_code_option, unisolated_code_option
from forgetless.eval.consent import consent_overrides


def compare_command(
    config: str = typer.Argument(..., help="Compare YAML (train:, methods:, eval:, ...)."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, dotted into sections: train.max_steps=5 eval.limit=50"
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in the output folder)."
    ),
    report_only: bool = typer.Option(
        False, "--report-only", help="Only redraw the report from the output's results.json."
    ),
    confirm_run_unsafe_code: bool = confirm_code_option(),
    allow_unisolated_code: bool = unisolated_code_option(),
) -> None:
    """Fine-tune several methods under one budget and report learning vs forgetting."""
    # the job (torch, transformers, mlflow): only when it runs
    from forgetless.compare import compare, redraw
    from forgetless.report import summary_text, verdict_lines

    if report_only:
        files = redraw(config, overrides or [])
        print(f"[forgetless compare] report: {files['html']} (and report.md)")
        return
    overrides = [*(overrides or []), *consent_overrides(confirm_run_unsafe_code,
                                                         allow_unisolated_code)]
    result = compare(config, overrides, tracking_uri=tracking_uri)
    if not result.results:  # not the main process of an ``accelerate launch``
        return
    out = result.output_dir
    uri = result.results["tracking"]["uri"]
    print("\n".join(verdict_lines(result.results)))  # what it found, then the table
    print(summary_text(result.results))
    print(f"[forgetless compare] done in {result.results['compare_seconds']:.0f} s "
          f"({result.results['compare_cpu_seconds']:.0f} CPU s)")
    print(f"[forgetless compare] report: {out / 'report.html'} (and report.md, results.json)")
    print(f"[forgetless compare] MLflow UI: mlflow ui --backend-store-uri {uri}")
