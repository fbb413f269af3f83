"""Run untrusted (model-written) Python in a child process that cannot harm this one.

Each program gets its own process tree: ``python -I -S`` in a fresh temporary folder, started by
``_sandbox_launch`` which first enters new network, pid and mount namespaces (a network with no
interfaces; a pid namespace whose end kills every process the program forked; the whole
filesystem read-only but the program's folder), drops every capability over them (a user
namespace of its own), then applies ``resource.setrlimit`` limits (address space, CPU seconds,
file size, processes, open files, no core dumps). A wall-clock limit kills the process group.
stdout/stderr go to files in another folder, so their size is bounded by the file-size limit
(a huge print ends the program with SIGXFSZ) and the parent reads back at most ``max_output``.

What holds depends on the OS: namespaces need Linux that allows them (root, or unprivileged
user namespaces); each refused step is skipped and ``SandboxResult.isolation`` names what
held. Not guaranteed: without the mount namespace the program can write wherever this user
can; without the network namespace it can open sockets; the program can read every file this
user can read (the filesystem is read-only, not hidden); CPU time and memory of the whole
tree are limited per process (``RLIMIT_NPROC`` caps how many). See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_LAUNCHER = Path(__file__).with_name("_sandbox_launch.py")


@dataclass(frozen=True)
class Limits:
    """Per program. ``memory_bytes`` is address space (RLIMIT_AS); ``file_bytes`` bounds every
    file written, stdout and stderr included."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20
    processes: int = 16
    open_files: int = 64
    max_output: int = 64 << 10

    def rlimits(self) -> dict[str, int]:
        return {"RLIMIT_AS": self.memory_bytes, "RLIMIT_CPU": self.cpu_seconds,
                "RLIMIT_FSIZE": self.file_bytes, "RLIMIT_NPROC": self.processes,
                "RLIMIT_NOFILE": self.open_files, "RLIMIT_CORE": 0}


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # 128 + signal when killed by one (SIGXCPU, SIGXFSZ, SIGKILL, ...)
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    isolation: tuple[str, ...]  # what held: "network", "pid", "read-only filesystem"

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# What full isolation is; a result whose ``isolation`` lacks any of them was not contained.
FULL_ISOLATION = ("network", "pid", "read-only filesystem")


def run_python(code: str, limits: Limits | None = None, *,
               namespaces: bool = True) -> SandboxResult:
    """Run ``code`` as ``program.py`` in a fresh folder under ``limits``; never raises for
    anything the program does. ``namespaces=False`` skips the namespace step (rlimits only),
    as on an OS that refuses it: how the unisolated path is tested on one that allows it."""
    limits = limits or Limits()
    work = Path(tempfile.mkdtemp(prefix="forgetless-sandbox-"))
    logs = Path(tempfile.mkdtemp(prefix="forgetless-sandbox-out-"))
    try:
        (work / "program.py").write_text(code)
        started = time.perf_counter()
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_LAUNCHER), json.dumps(limits.rlimits()),
                 *([] if namespaces else ["no-namespaces"])],
                cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            timed_out = False
            try:
                process.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(process.pid)
            process.wait()
        seconds = time.perf_counter() - started
        stdout, stderr = (_head(logs / name, limits.max_output) for name in ("out", "err"))
        first, _, rest = stderr.partition("\n")
        isolation: tuple[str, ...] = ()
        if first.startswith("isolation: "):
            held = first.removeprefix("isolation: ")
            isolation = tuple(h for h in held.split(", ") if h and h != "none")
            stderr = rest
        return SandboxResult(process.returncode if process.returncode >= 0
                             else 128 - process.returncode, stdout, stderr, timed_out,
                             seconds, isolation)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _head(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit).decode("utf-8", "replace")


__all__ = ["FULL_ISOLATION", "Limits", "SandboxResult", "run_python"]
