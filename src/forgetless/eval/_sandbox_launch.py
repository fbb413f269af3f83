"""The sandbox's launcher (see ``forgetless.eval.sandbox``); runs as its own ``python -I -S``
process, never imported by forgetless: it isolates itself, then forks and execs the program.

argv: limits JSON [, "no-namespaces": skip the namespace step]. Namespaces are best effort:
each step that the OS refuses is skipped and named on stderr's first line (``isolation: ...``)
so the parent can report what held.
"""

import ctypes
import json
import os
import resource
import signal
import sys

NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_REC, MS_PRIVATE, MS_BIND = 0x4000, 0x40000, 0x1000
ATTR_RDONLY, AT_RECURSIVE, SYS_MOUNT_SETATTR, PR_SET_PDEATHSIG = 0x1, 0x8000, 442, 1
libc = ctypes.CDLL(None, use_errno=True)


def _ok(result: int) -> bool:
    return result == 0


def _map_self(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _set_rdonly(path: bytes, recursive: bool, clear: bool = False) -> bool:
    attr = (ctypes.c_uint64 * 4)(0 if clear else ATTR_RDONLY, ATTR_RDONLY if clear else 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    return _ok(libc.syscall(SYS_MOUNT_SETATTR, -100, path, flags, attr, ctypes.sizeof(attr)))


def main() -> None:
    limits = json.loads(sys.argv[1])
    cwd = os.getcwd().encode()
    uid, gid = os.getuid(), os.getgid()
    held = []
    flags = 0 if sys.argv[2:] == ["no-namespaces"] else NEWNS | NEWNET | NEWPID
    if flags and not _ok(libc.unshare(flags)):  # not root: the same in a user namespace of ours
        if _ok(libc.unshare(NEWUSER | flags)):
            _map_self(uid, gid)
        else:
            flags = 0
    if flags:
        held += ["network", "pid"]
        if (_ok(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
                and _ok(libc.mount(cwd, cwd, None, MS_BIND, None))
                and _set_rdonly(b"/", recursive=True)
                and _set_rdonly(cwd, recursive=False, clear=True)):
            held.append("read-only filesystem")
        os.chdir(cwd)  # onto the writable bind mount (the old cwd is the read-only one below)
    print("isolation: " + (", ".join(held) or "none"), file=sys.stderr, flush=True)
    child = os.fork()  # pid 1 of the new pid namespace: when it ends, everything in it ends
    if child == 0:
        if flags:  # a user namespace without a uid map: execve leaves the program no
            libc.unshare(NEWUSER)  # capability, so it cannot undo the mounts above
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher killed -> the program too
        for name, value in limits.items():
            limit = getattr(resource, name)
            resource.setrlimit(limit, (value, value))
        os.execv(sys.executable, [sys.executable, "-I", "-S", "program.py"])
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        sys.exit(128 + os.WTERMSIG(status))
    sys.exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
