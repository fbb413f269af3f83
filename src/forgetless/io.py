"""Atomic file writes: a result file is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- fault injection (tests only; nothing happens unless the variables are set) ---------------

_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named moment where the fault tests may kill this process.

    ``FORGETLESS_FAULT_AT=<name>:<n>`` sends SIGKILL to this process the ``n``-th time ``name``
    is reached, ``@<k>`` at the ``k``-th point of any name (a real, uncatchable kill, as from the
    OOM killer or a pre-empted node); ``FORGETLESS_FAULT_LOG=<file>`` appends every point
    reached, so a test can count them. Unset (always, outside tests), this is two dict lookups.
    """
    at = os.environ.get("FORGETLESS_FAULT_AT")
    log = os.environ.get("FORGETLESS_FAULT_LOG")
    if not at and not log:
        return
    count = _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    total = _FAULT_COUNTS[""] = _FAULT_COUNTS.get("", 0) + 1
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{name}:{count}\n")
    if at in (f"{name}:{count}", f"@{total}"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
