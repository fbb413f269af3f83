"""The sandbox contains what model-written code may do: loops, fork storms, memory hogs,
writes and deletes outside its folder, sockets and huge prints (short limits: fast tests)."""

import os
import time

import pytest

from forgetless.eval.sandbox import Limits, run_python

FAST = Limits(wall_seconds=2.0, cpu_seconds=1, memory_bytes=512 << 20, file_bytes=64 << 10,
              processes=8, max_output=4096)


def _needs(result, what: str) -> None:
    if what not in result.isolation:
        pytest.skip(f"this OS refused the sandbox's {what} isolation ({result.isolation})")


def test_program_runs_in_a_fresh_writable_folder():
    result = run_python("import os\nopen('a.txt', 'w').write('hi')\n"
                        "print(open('a.txt').read(), sorted(os.listdir('.')))", FAST)
    assert result.passed and result.stdout.strip() == "hi ['a.txt', 'program.py']"
    failing = run_python("assert 1 == 2", FAST)
    assert not failing.passed and "AssertionError" in failing.stderr


def test_infinite_loop_is_killed_by_the_limits():
    started = time.perf_counter()
    result = run_python("while True:\n    pass", FAST)
    assert not result.passed and result.returncode != 0
    assert time.perf_counter() - started < FAST.wall_seconds + 2
    sleeper = run_python("import time\ntime.sleep(60)", Limits(wall_seconds=0.5))
    assert sleeper.timed_out and sleeper.seconds < 3


def test_fork_storm_is_capped_and_leaves_no_process():
    code = ("import os\nn = 0\nwhile True:\n    try:\n        os.fork(); n += 1\n"
            "    except OSError:\n        pass\n")
    result = run_python(code.replace("pass", "open('x', 'a').write('!')"), FAST)
    assert not result.passed
    deadline = time.perf_counter() + 5  # the kernel tears the pid namespace down shortly after
    while (leftovers := [p for p in os.listdir("/proc") if p.isdigit() and _is_program(p)]):
        assert time.perf_counter() < deadline, f"processes left: {leftovers}"
        time.sleep(0.1)


def _is_program(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"program.py" in handle.read()
    except OSError:
        return False


def test_memory_hog_fails_inside_the_child():
    result = run_python("x = bytearray(2 * 10**9)\nprint('allocated')", FAST)
    assert not result.passed and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


def test_writing_or_deleting_outside_its_folder_fails(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    code = (f"import os\ntry:\n    os.remove({str(victim)!r})\nexcept OSError as e:\n"
            f"    print('remove', type(e).__name__)\n"
            f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\n")
    result = run_python(code, FAST)
    _needs(result, "read-only filesystem")
    assert not result.passed and "remove" in result.stdout
    assert victim.read_text() == "precious" and not (tmp_path / "new.txt").exists()


def test_socket_connection_fails():
    code = ("import socket\ns = socket.socket()\ns.settimeout(1)\n"
            "s.connect(('1.1.1.1', 80))\nprint('connected')")
    result = run_python(code, FAST)
    _needs(result, "network")
    assert not result.passed and "connected" not in result.stdout
    assert "OSError" in result.stderr or "unreachable" in result.stderr


def test_huge_print_is_bounded():
    result = run_python("while True:\n    print('y' * 10000)", FAST)
    assert not result.passed and result.seconds < FAST.wall_seconds + 1
    assert len(result.stdout) <= FAST.max_output
