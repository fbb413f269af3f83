"""Run folders: what in them is finished, what may be reused, and who may write them.

A job (train, compare, continual) can be killed at any moment, so a run folder must never *look*
finished when it is not. The rules, shared by every job:

* a result file is written atomically (``forgetless.io``) and a stage's marker file last, so a
  marker names a finished stage; a marker is only believed when its key (a hash of everything
  the stage depends on) matches and the files it vouches for exist;
* a Trainer checkpoint counts only when ``forgetless-checkpoint.json`` (written after the
  Trainer's own files) or, for older checkpoints, ``trainer_state.json`` (the Trainer's last
  file) says it is complete; resume takes the newest complete one and discards newer debris;
* one process writes a run folder at a time (``RunLock``): the kernel's ``flock`` ends with the
  process, so a lock left by a killed run is taken over, never mistaken for a live one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from forgetless.errors import ForgetlessError
from forgetless.io import atomic_write_json, fault_point

CHECKPOINT_MARKER = "forgetless-checkpoint.json"
LOCK_NAME = ".forgetless.lock"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Weights a Trainer checkpoint may hold (full model, sharded index, or a PEFT adapter).
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
            "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
# Temporary names forgetless.io makes for the files and folders jobs write
# (``.<name>.<8 random chars>``); nothing else in a folder is ever removed.
_TEMPORARY = re.compile(r"^\.(model|[^/]+\.(json|jsonl|yaml|md|html|png|txt))\.[a-z0-9_]{8}$")


# --- identity and safe reads ------------------------------------------------------------------


def config_hash(data: Any) -> str:
    """A short stable identity of JSON-like ``data`` (key order does not matter)."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or ``None`` when it is missing, unreadable, damaged or not
    an object (a killed writer or a hand edit must read as "not finished", never crash)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def has_files(folder: Path, names: list[str | None]) -> bool:
    """Every named file exists in ``folder`` (a missing name counts as absent)."""
    return all(name and (folder / name).is_file() for name in names)


def finished(folder: Path, marker: str, files: tuple[str, ...] = (),
             **expected: Any) -> dict | None:
    """The marker record of a finished stage, or ``None``: the marker must read, hold every
    ``expected`` field with that value, and the stage's ``files`` must all exist."""
    record = read_json(folder / marker)
    if record is None or any(record.get(k) != v for k, v in expected.items()):
        return None
    return record if has_files(folder, list(files)) else None


# --- Trainer checkpoints ------------------------------------------------------------------------


def mark_checkpoint(folder: str | Path, step: int) -> None:
    """Vouch for a checkpoint the Trainer has just finished: its files and their sizes, written
    last, so a later truncation or deletion is noticed too."""
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
             if p.is_file() and p.name != CHECKPOINT_MARKER}
    atomic_write_json(folder / CHECKPOINT_MARKER, {"step": step, "files": files})


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or ``None`` when it is."""
    match = _CHECKPOINT.match(folder.name)
    if not match or not folder.is_dir():
        return "not a checkpoint folder"
    step = int(match.group(1))
    marker = read_json(folder / CHECKPOINT_MARKER)
    if marker is not None:
        if marker.get("step") != step or not isinstance(marker.get("files"), dict):
            return "its completion marker is damaged"
        for name, size in marker["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size:
                return f"{name} is missing or changed since it was saved"
        return None
    # No marker: a checkpoint from before markers, or one killed before the marker was written.
    state = read_json(folder / "trainer_state.json")
    if state is None or state.get("global_step") != step:
        return "trainer_state.json is missing or damaged (killed while saving?)"
    if not has_files(folder, ["optimizer.pt"]) or not any((folder / w).is_file() for w in _WEIGHTS):
        return "weights or optimizer state are missing"
    return None


def checkpoints(trainer_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders, newest first."""
    trainer_dir = Path(trainer_dir)
    if not trainer_dir.is_dir():
        return []
    found = [p for p in trainer_dir.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def main_process() -> bool:
    """Rank 0 under ``accelerate launch`` (and a plain process): the run folder's one writer."""
    return os.environ.get("RANK", "0") == "0"


def resume_checkpoint(trainer_dir: str | Path, say: Any = print) -> Path | None:
    """The newest complete checkpoint (``None``: start from step 0). Newer incomplete ones are
    deleted, since training will write those steps again; one line says what was skipped."""
    skipped = []
    for folder in checkpoints(trainer_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                say(f"[forgetless] {'; '.join(skipped)}: resuming from {folder.name}")
            if main_process():
                for name in skipped:
                    shutil.rmtree(Path(trainer_dir) / name.split(" ")[0], ignore_errors=True)
            return folder
        skipped.append(f"{folder.name} is incomplete ({problem})")
    if skipped:
        say(f"[forgetless] {'; '.join(skipped)}: no complete checkpoint, starting from step 0")
        if main_process():
            for folder in checkpoints(trainer_dir):
                shutil.rmtree(folder, ignore_errors=True)
    return None


# --- output folders -----------------------------------------------------------------------------


def make_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) or fail with one line saying why (not a traceback)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ForgetlessError(f"cannot create {what} {path}: {reason}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ForgetlessError(f"cannot write to {what} {path}: permission denied")
    return path


def remove_temporaries(folder: str | Path) -> int:
    """Delete temporary files and folders a killed writer left (``.<name>.<random>``); only call
    while holding the folder's ``RunLock``. Returns how many were removed."""
    removed = 0
    top = len(Path(folder).parts)
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            if _TEMPORARY.match(name):
                path = Path(root) / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        # a run folder is shallow (<out>/<method>/<stage>/model); never walk hidden or deep trees
        deep = len(Path(root).parts) - top >= 4
        dirs[:] = [] if deep else [d for d in dirs if not d.startswith(".")
                                   and d not in ("mlartifacts", "trainer")]
    return removed


def cache_temporary(folder: Path, prefix: str) -> Path:
    """A fresh temporary folder ``<prefix><pid>-<random>`` inside a shared cache ``folder``,
    after removing those whose process has died: a killed conversion or build leaves its
    half-written folder behind, while a live process's folder is work in progress."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder))


def publish_temporary(tmp: Path, target: Path) -> None:
    """Rename a finished ``cache_temporary`` folder into place. A rename onto a non-empty
    folder fails: another process finished the same model first, so theirs is kept."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a stale lock or trial is one whose owner is
    not); one we may not signal still counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One writer per run folder: ``<folder>/.forgetless.lock`` holds the owner's pid and host.

    The lock is an ``flock`` on that file, which the kernel drops when its process ends (even by
    SIGKILL), so a stale file is taken over without guessing. Under ``accelerate launch`` only
    the main process (``RANK`` 0) locks; the others share the folder by design.
    """

    def __init__(self, folder: str | Path, job: str = "run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.job = job
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> RunLock:
        if not main_process():
            return self
        make_dir(self.folder)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise ForgetlessError(f"cannot write to output folder {self.folder}: "
                                      f"{err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ForgetlessError(self._busy()) from None
            try:  # the file we locked must still be the one at the path (not unlinked by a
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino  # releasing owner)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        owner = _read_owner(fd)
        if owner and owner.get("host") not in (None, socket.gethostname()):
            # flock need not reach across hosts (NFS): another machine's run may be alive.
            os.close(fd)
            raise ForgetlessError(self._busy(owner) + f"; if that run is gone, delete {self.path}")
        if owner and owner.get("pid") and not alive(int(owner["pid"])):
            print(f"[forgetless] taking over the lock of a run that ended without releasing it "
                  f"(pid {owner['pid']})", flush=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": self.job,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        remove_temporaries(self.folder)
        fault_point("lock.acquired")
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiter re-checks the inode
        os.close(self.fd)
        self.fd = None

    def _busy(self, owner: dict | None = None) -> str:
        owner = owner or read_json(self.path) or {}
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        job = f" ({owner['job']} since {owner.get('started', '?')})" if owner.get("job") else ""
        return (f"output folder {self.folder} is in use by another forgetless run, {who}{job}: "
                "wait for it to finish or choose another output_dir")


def _read_owner(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
