"""Where forgetless finds shared benchmark data and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

from forgetless.errors import ForgetlessError

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Cache for converted models: ``$FORGETLESS_CACHE`` or ``~/.cache/forgetless``."""
    root = os.environ.get("FORGETLESS_CACHE") or Path.home() / ".cache" / "forgetless"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path:
    """The benchmark data folder: ``$FORGETLESS_DATA``, else ``../shared/data`` beside the repo.

    Looked up relative to the working directory first, then to this source tree, so that both
    ``make`` targets and an editable install run from elsewhere find it.
    """
    env = os.environ.get("FORGETLESS_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd().parent / "shared" / "data", _PROJECT_ROOT.parent / "shared" / "data"]
    for path in candidates:
        if path.is_dir():
            return path
    raise ForgetlessError(
        "benchmark data not found: set FORGETLESS_DATA or place shared/data beside the project "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )
