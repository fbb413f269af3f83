"""``forgetless eval``: the command-line face of ``forgetless.eval.evaluate``."""

from __future__ import annotations

from pathlib import Path

import typer

from forgetless.cli.options import (
    confirm_code_option,
    device_option,
    dtype_option,
    split,
    unisolated_code_option,
)
from forgetless.errors import ForgetlessError


def eval_command(
    model: str = typer.Option(
        "smollm2-135m", "--model", "-m", help="Alias, folder, .gguf or Hub id."
    ),
    base: str | None = typer.Option(None, "--base", "-b", help="Base model for drift metrics."),
    suite: list[str] | None = typer.Option(
        None, "--suite", "-s",
        help="Held-out tasks, comma-separated or repeated: built-in names or task .yaml files "
        "(default arc_easy,piqa; 'none' for no suite).",
    ),
    limit: int | None = typer.Option(200, "--limit", "-n", help="Items per task (0 = all)."),
    target: str | None = typer.Option(None, "--target", "-t", help="gsm8k, a registered target "
                                      "or a .jsonl of prompt/response rows."),
    target_limit: int = typer.Option(100, "--target-limit", help="Target items (0 = all)."),
    seed: int = typer.Option(0, "--seed", help="Seed choosing the items."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="Few-shot examples."),
    batch_size: int = typer.Option(16, "--batch-size", help="Contexts per forward pass."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the result JSON."),
    device: str = device_option(": where both models run"),
    dtype: str = dtype_option(": the precision both models load in"),
    confirm_run_unsafe_code: bool = confirm_code_option(),
    allow_unisolated_code: bool = unisolated_code_option(),
) -> None:
    """Measure held-out accuracy, target skill and drift from the base model."""
    # the job's modules (torch, transformers): only when it runs
    from forgetless.devices import resolve_device, resolve_dtype
    from forgetless.eval.consent import require_code_consent
    from forgetless.eval.evaluator import DEFAULT_SUITE, evaluate
    from forgetless.eval.targets import get_target
    from forgetless.eval.tasks import load_spec
    from forgetless.models import load_model
    from forgetless.runs import make_dir

    tasks = split(suite) or list(DEFAULT_SUITE)
    if tasks == ["none"]:
        tasks = []
    if not tasks and target is None and base is None:
        raise ForgetlessError("nothing to evaluate: give a --suite, a --target or a --base")
    specs = [load_spec(t) for t in tasks]  # a bad task file fails before any model loads
    require_code_consent(specs, confirm_run_unsafe_code, allow_unisolated_code)
    if target is not None:
        get_target(target)
    if output is not None:  # an output that cannot be written fails now, not after the run
        make_dir(Path(output).parent or Path("."), "folder for --output")
    place = resolve_device(device)
    precision = resolve_dtype(dtype, place)
    tuned, tokenizer = load_model(model, dtype=precision, device=place)
    base_model = load_model(base, dtype=precision, device=place)[0] if base else None
    result = evaluate(
        tuned, tokenizer, suite=specs, limit=limit or None, seed=seed, target=target,
        target_limit=target_limit or None, base_model=base_model, batch_size=batch_size,
        num_fewshot=num_fewshot, model_name=model, base_name=base,
    )
    typer.echo(result.table())
    if output:
        typer.echo(f"wrote {result.save(output)}")
