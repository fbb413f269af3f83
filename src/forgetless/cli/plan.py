"""``forgetless plan``: the command-line face of ``forgetless.plan.plan``."""

from __future__ import annotations

import typer

from forgetless.cli.options import split
from forgetless.errors import ForgetlessError


def plan_command(
    model: str = typer.Option("smollm2-135m", "--model", "-m",
                              help="Alias, folder, .gguf, config .json file or Hub id "
                              "(only its config is read)."),
    method: list[str] | None = typer.Option(
        None, "--method",
        help="Methods, comma-separated or repeated (default: every method family)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per device step."),
    max_length: int = typer.Option(512, "--max-length", help="Tokens per sequence."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (= bfloat16, what train picks on a "
                              "GPU), bfloat16, float16 or float32."),
    fp32_master_weights: bool = typer.Option(
        True, "--fp32-master-weights/--no-fp32-master-weights",
        help="Half dtype: trainable weights in float32 (train's default)."),
    attn_implementation: str = typer.Option("sdpa", "--attn-implementation",
                                            help="sdpa, eager or flash_attention_2."),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank (lora methods)."),
    update_stats: bool = typer.Option(True, "--update-stats/--no-update-stats",
                                      help="Count the update analytics (train's default: on)."),
    update_stats_sample: int | None = typer.Option(
        None, "--update-stats-sample",
        help="Coordinates the analytics track per tensor (default: train's "
        "update_stats_sample); 0 = every one (exact)."),
    gpu_mem: str | None = typer.Option(None, "--gpu-mem",
                                       help="GPU memory to fit in, e.g. 24GiB or 80GB."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Memory per method (weights, gradients, optimizer, activations) without loading weights."""
    # the job (torch, transformers on the meta device) and the config (it imports the methods,
    # hence torch): only when it runs
    from forgetless.config import UPDATE_STATS_SAMPLE, TrainConfig
    from forgetless.methods.options import method_options
    from forgetless.plan import parse_size, plan

    if lora_r < 1:
        raise ForgetlessError(f"--lora-r must be at least 1, got {lora_r}")
    if update_stats_sample is None:
        update_stats_sample = UPDATE_STATS_SAMPLE
    if update_stats_sample < 0:
        raise ForgetlessError("--update-stats-sample must be 0 (every coordinate) or more")
    names = split(method)
    options = method_options(TrainConfig(lora_r=lora_r))
    result = plan(model, names or None, batch_size=batch_size, max_length=max_length,
                  dtype=dtype, fp32_master_weights=fp32_master_weights,
                  attn_implementation=attn_implementation,
                  gpu_mem=parse_size(gpu_mem) if gpu_mem is not None else None, options=options,
                  update_stats=update_stats, update_stats_sample=update_stats_sample or None)
    if as_json:
        typer.echo(result.to_json())
    else:
        result.print()
