"""Time ``forgetless --help`` for two source trees, interleaved (the CLI's start-up cost).

    python bench/cli_help.py OLD_SRC NEW_SRC [ROUNDS]

Each round runs ``python -m forgetless --help`` once per tree (alternating which goes first),
with ``PYTHONPATH`` set to that tree's ``src`` folder; prints the median and range per tree.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time


def _once(src: str) -> float:
    env = {**os.environ, "PYTHONPATH": src}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "forgetless", "--help"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    trees = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    times: dict[str, list[float]] = {tree: [] for tree in trees}
    for index in range(rounds):
        for tree in trees if index % 2 == 0 else trees[::-1]:
            times[tree].append(_once(tree))
    for tree, values in times.items():
        print(f"{tree}: median {statistics.median(values):.2f} s "
              f"[{min(values):.2f}-{max(values):.2f}] over {rounds} runs")


if __name__ == "__main__":
    main()
