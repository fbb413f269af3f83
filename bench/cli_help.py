"""Time ``forgetless --help`` for two source trees, interleaved (the CLI's start-up cost).

    python bench/cli_help.py OLD_SRC NEW_SRC [ROUNDS]

Each round runs ``python -m forgetless --help`` once per tree (alternating which goes first),
with ``PYTHONPATH`` set to that tree's ``src`` folder; prints the median and range per tree of
the wall time and of the child's CPU time (user + system, less sensitive to a loaded machine).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _once(src: str) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": src}
    started, cpu = time.perf_counter(), _cpu()
    subprocess.run([sys.executable, "-m", "forgetless", "--help"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, _cpu() - cpu


def main() -> None:
    trees = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    times: dict[str, list[tuple[float, float]]] = {tree: [] for tree in trees}
    for index in range(rounds):
        for tree in trees if index % 2 == 0 else trees[::-1]:
            times[tree].append(_once(tree))
    print(f"load average {os.getloadavg()[0]:.1f}; {rounds} interleaved runs each")
    for tree, pairs in times.items():
        cells = []
        for what, values in (("wall", [w for w, _ in pairs]), ("CPU", [c for _, c in pairs])):
            cells.append(f"{what} median {statistics.median(values):.2f} s "
                         f"[{min(values):.2f}-{max(values):.2f}]")
        print(f"{tree}: {'; '.join(cells)}")


if __name__ == "__main__":
    main()
