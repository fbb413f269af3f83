"""forgetless: fine-tune language models without catastrophic forgetting, and prove it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forgetless.errors import ForgetlessError
from forgetless.optim import MoFO

if TYPE_CHECKING:
    from forgetless.monitor import ForgettingMonitor

__version__ = "0.1.0"

__all__ = ["ForgetlessError", "ForgettingMonitor", "MoFO", "__version__"]


def __getattr__(name: str) -> Any:
    """``forgetless.ForgettingMonitor`` on first use: it imports transformers (seconds), which
    ``import forgetless`` for the optimizer alone should not pay."""
    if name == "ForgettingMonitor":
        from forgetless.monitor import ForgettingMonitor

        return ForgettingMonitor
    raise AttributeError(f"module 'forgetless' has no attribute {name!r}")
