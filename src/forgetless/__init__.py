"""forgetless: fine-tune language models without catastrophic forgetting, and prove it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forgetless.errors import ForgetlessError

if TYPE_CHECKING:
    from forgetless.monitor import ForgettingMonitor
    from forgetless.optim import MoFO

__version__ = "0.1.0"

__all__ = ["ForgetlessError", "ForgettingMonitor", "MoFO", "__version__"]


def __getattr__(name: str) -> Any:
    """``forgetless.MoFO`` and ``forgetless.ForgettingMonitor`` on first use: they import torch
    and transformers (seconds), which ``import forgetless`` (every CLI start, ``--help``
    included) should not pay."""
    if name == "MoFO":
        from forgetless.optim import MoFO

        return MoFO
    if name == "ForgettingMonitor":
        from forgetless.monitor import ForgettingMonitor

        return ForgettingMonitor
    raise AttributeError(f"module 'forgetless' has no attribute {name!r}")
