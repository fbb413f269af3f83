"""``forgetless tune``: the command-line face of ``forgetless.tune.tune``."""

from __future__ import annotations

import typer

from forgetless.cli.options import confirm_code_option, unisolated_code_option
from forgetless.eval.consent import consent_overrides


def _say(message: str) -> None:
    print(f"[forgetless tune] {message}", flush=True)


def tune_command(
    config: str = typer.Argument(..., help="Tune YAML (train:, space:, budget:, search:, ...)."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, dotted into sections: search.n_trials=3"),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in the output folder)."
    ),
    confirm_run_unsafe_code: bool = confirm_code_option(),
    allow_unisolated_code: bool = unisolated_code_option(),
) -> None:
    """Search methods and settings for the best target score within a forgetting budget."""
    # the job (torch, optuna, mlflow): only when it runs
    from forgetless.jobs.tune_report import recipe_text
    from forgetless.tune import tune
    from forgetless.verdict import tune_verdict

    overrides = [*(overrides or []), *consent_overrides(confirm_run_unsafe_code,
                                                         allow_unisolated_code)]
    results = tune(config, overrides, tracking_uri=tracking_uri)
    counts, best = results["counts"], results["best"]
    _say(f"{counts['total']} trials ({counts['complete']} complete, {counts['pruned']} pruned) "
         f"in {results['search_seconds']:.0f} s; test phase {results['test_seconds']:.0f} s")
    for line in tune_verdict(results):  # the test phase's findings, in words
        _say(line)
    if best:
        _say(f"recommended: {recipe_text(best['recipe'])}")
    else:
        _say("no trial met the budget")
    for name, mean in results["test_means"].items():
        _say(f"test {name}: target {mean['target']:+.1f} pts, held-out {mean['heldout']:+.1f} "
             "pts")
    _say(f"report: {results['files']['markdown']} (and tune.html, best.yaml, optuna.db)")
