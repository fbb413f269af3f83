"""Small pieces every verb's module shares: list options and ``key=value`` overrides."""

from __future__ import annotations


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
