"""Start multi-process launchers from tests: a free local port, and a run that cannot hang."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run a launcher in its own process group; kill that group if it outlives ``timeout``."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{command[:4]} hung for {timeout} s:\n{output[-3000:]}")
    return proc.returncode, output
