"""Fresh builds of the embedded VLM ``llava-smollm2``: does every build learn its pictures?

    python bench/vlm_builds.py --seed 0 --threads 1 [--out builds.jsonl] [--limit 100]

One build per call (a fresh process, so ``--threads`` really is the build's thread count), into
a temporary cache folder: the default recipe (``BuildSpec``) with only the seed changed. Then
``forgetless eval --suite name_color,name_shape --limit N`` on the built folder scores it as a
user would (multiple choice by log-likelihood on the test pictures), with the same threads.
Prints one JSON line (seed, threads, build seconds, LLaVA steps, extra self-check rounds, the
self-check's held-back accuracies, test accuracies, the build's folder hash) and appends it to
``--out``. The table in docs/results-lmm.md is six such lines: seeds 0, 1, 2 x 1, 2 threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the built folder under this cache")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    from forgetless.models import DEFAULT_MODEL, convert_gguf, embedded_gguf
    from forgetless.vlm.build import BuildSpec, ensure_built

    torch.set_num_threads(args.threads)
    spec = BuildSpec(seed=args.seed)
    cache = args.keep or Path(tempfile.mkdtemp(prefix="vlm-build-"))
    lm = convert_gguf(embedded_gguf(DEFAULT_MODEL))
    started = time.perf_counter()
    folder = ensure_built(lm, cache, spec, progress=False)
    wall = time.perf_counter() - started
    stats = json.loads((folder / "forgetless_build.json").read_text())

    result_file = cache / f"eval-seed{args.seed}-t{args.threads}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    eval_started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "forgetless", "eval", "--model", str(folder),
                    "--suite", "name_color,name_shape", "--limit", str(args.limit),
                    "--output", str(result_file)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    eval_wall = time.perf_counter() - eval_started
    metrics = json.loads(result_file.read_text())["metrics"]
    weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]
    line = {
        "seed": args.seed, "threads": args.threads, "build_seconds": round(wall, 1),
        "llava_steps": stats["llava_steps"], "extra_rounds": len(stats["checks"]) - 1,
        "check": [{k: round(v, 3) for k, v in c.items()} for c in stats["checks"]],
        "name_color": metrics["name_color/acc"]["value"],
        "name_shape": metrics["name_shape/acc"]["value"],
        "items": args.limit, "eval_seconds": round(eval_wall, 1),
        "folder": folder.name, "weights_sha256": weights, "torch": torch.__version__,
        "load_before": os.getloadavg()[0],
    }
    print(json.dumps(line), flush=True)
    if args.out:
        with args.out.open("a") as out:
            out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
