"""Pool several `forgetless compare` folders (e.g. one per training seed) into one table.

One compare pairs methods on the same items for one seed; whether a difference survives a
change of data order needs several seeds. This prints, per run, the held-out change, Δ number
mass and KL, then per method the mean over folders, and the correlations docs/results.md cites.

    python scripts/across_runs.py runs/results-largest-number runs/results-largest-number-seed1 ...
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import correlation, fmean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        results = json.loads((folder / "results.json").read_text())
        seed = results["config"]["train"]["seed"]
        for entry in results["methods"]:
            drift = entry["drift"]
            rows.append({
                "seed": seed, "method": entry["name"],
                "heldout": 100 * entry["heldout_avg"]["delta"]["value"],
                "target": 100 * entry["target"]["exact_match"]["value"],
                "number_mass": drift["number_mass_change"]["value"], "kl": drift["kl"]["value"],
            })
    print("| seed | method | target EM % | Δ held-out (pts) | Δ number mass | KL |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['method']} | {r['target']:.1f} | {r['heldout']:+.1f} "
              f"| {r['number_mass']:+.4f} | {r['kl']:.3f} |")
    by_method = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    print("\n| method | runs | mean target EM % | mean Δ held-out (pts) | mean KL |")
    print("|---|---|---|---|---|")
    for name, runs in by_method.items():
        mean = {key: fmean(r[key] for r in runs) for key in ("target", "heldout", "kl")}
        print(f"| {name} | {len(runs)} | {mean['target']:.1f} | {mean['heldout']:+.1f} "
              f"| {mean['kl']:.3f} |")
    held = [r["heldout"] for r in rows]
    print(f"\n{len(rows)} runs: r(Δ held-out, Δ number mass) = "
          f"{correlation(held, [r['number_mass'] for r in rows]):+.2f}, "
          f"r(Δ held-out, KL) = {correlation(held, [r['kl'] for r in rows]):+.2f}")


if __name__ == "__main__":
    main()
