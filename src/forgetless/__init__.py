"""forgetless: fine-tune language models without catastrophic forgetting, and prove it."""

from forgetless.errors import ForgetlessError
from forgetless.optim import MoFO

__version__ = "0.1.0"

__all__ = ["ForgetlessError", "MoFO", "__version__"]
