"""Small pieces every verb's module shares: options several verbs take, list options and
``key=value`` overrides."""

from __future__ import annotations

import typer

from forgetless.eval.consent import CONFIRM_HELP, UNISOLATED_HELP


def confirm_code_option() -> bool:
    """``--confirm-run-unsafe-code``: the opt-in before a code task runs model-written code."""
    return typer.Option(False, "--confirm-run-unsafe-code", help=CONFIRM_HELP)


def unisolated_code_option() -> bool:
    """``--allow-unisolated-code``: also where the sandbox cannot isolate the programs."""
    return typer.Option(False, "--allow-unisolated-code", help=UNISOLATED_HELP)


def device_option(where: str = "") -> str:
    """``--device`` of a verb that loads models (``where``: what runs there, for the help)."""
    return typer.Option("auto", "--device", help="auto (CUDA when available, else CPU), cpu, "
                        f"cuda or cuda:N{where}.")


def dtype_option(where: str = "") -> str:
    """``--dtype`` of a verb that loads models (``where``: what it applies to, for the help)."""
    return typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, else float32), "
                        f"bfloat16, float16 or float32{where}.")


def split(values: list[str] | None) -> list[str]:
    """A repeatable option whose values may also be comma-separated, as one flat list."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def config_first(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """A first argument that is an override (``method=attn``), not a YAML file, joins them."""
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *(overrides or [])]
    return config, list(overrides or [])


def parse(pairs: list[str] | None) -> dict:
    """``key=value`` overrides as keyword arguments (values read as YAML)."""
    from forgetless.config import parse_overrides  # pydantic: not for --help

    return parse_overrides(pairs or [])
