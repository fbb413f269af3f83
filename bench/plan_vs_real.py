"""``forgetless plan`` against real runs: plan's total vs the peak RSS of a short CPU training run.

    .venv/bin/python bench/plan_vs_real.py [--methods full,attn,lora,mofo,l2-anchor,lwf]
        [--steps 3] [--batch-size 4] [--max-length 256] [--allocators default,mmap]
        [--save runs.jsonl | --load runs.jsonl]

Each method trains the embedded SmolLM2-135M (float32, CPU, count_letters packed into
``--max-length`` blocks, so every sequence is about that long) for ``--steps`` steps in a fresh
process. The process's resident memory is read after the imports and the tokenizer (the
baseline: Python, torch, transformers), the peak RSS is reset (``/proc/self/clear_refs``) once
the model has loaded, and read after training; ``peak - baseline`` is what the run itself
held, which ``plan`` predicts. Linux only (``/proc``). On CPU, RSS also counts what glibc's
allocator keeps after ``free``, so the ratio is a sanity check of the plan, not a GPU number
(``bench/gpu_check.py`` compares with ``torch.cuda.max_memory_allocated`` on a GPU).

Each method runs twice: with glibc's default allocator settings, and with
``MALLOC_MMAP_THRESHOLD_=131072`` (every block of 128 KiB or more is its own mapping, returned
to the system on ``free``; by default glibc raises that threshold as blocks are freed, so
later large tensors come from the heap, which keeps freed memory it cannot trim). The second
column is closer to what a caching GPU allocator reports as allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, steps: int, batch_size: int, max_length: int) -> None:
    """One run in this process; prints one JSON line of measurements."""
    import torch
    from transformers import AutoTokenizer

    from forgetless.models import load_model, resolve_model
    from forgetless.train import train

    torch.set_num_threads(2)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))  # the same imports/caches
    baseline = _status("VmRSS")
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    with tempfile.TemporaryDirectory() as out:
        result = train(model=model, tokenizer=tokenizer, method=method, data="count_letters",
                       limit=steps * batch_size * 30, packing=True, batch_size=batch_size,
                       max_length=max_length, max_steps=steps, learning_rate=1e-5,
                       report_to=[], save_model=False, output_dir=out, device="cpu",
                       dtype="float32")
    print(json.dumps({"method": method, "baseline": baseline,
                      "peak": _status("VmHWM"),
                      "optimizer_state_bytes": result.metrics["optimizer_state_bytes"],
                      "train_seconds": result.metrics["train_seconds"]}))


ALLOCATORS = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def measure(method: str, allocator: str, args) -> dict:
    """One child run; its JSON line plus which allocator setting it ran under."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, "--steps", str(args.steps),
         "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)],
        capture_output=True, text=True, check=True,
        env={**os.environ, **ALLOCATORS[allocator]})
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "allocator": allocator}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="full,attn,lora,mofo,l2-anchor,lwf")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--allocators", default="default,mmap",
                        help="glibc settings to measure under: default, mmap or both")
    parser.add_argument("--save", type=Path, default=None,
                        help="append each run's measurements to this JSON-lines file")
    parser.add_argument("--load", type=Path, default=None,
                        help="print the table from a --save file instead of measuring again "
                        "(the plan is recomputed; the peaks do not depend on it)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch_size, args.max_length)
        return

    from forgetless.methods import parse_method
    from forgetless.plan import plan

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
    loaded = ([json.loads(line) for line in args.load.read_text().splitlines() if line.strip()]
              if args.load else [])
    planned = {m.method: m for m in plan("smollm2-135m", methods, batch_size=args.batch_size,
                                         max_length=args.max_length, dtype="float32").methods}
    print(f"SmolLM2-135M, float32, CPU, batch {args.batch_size} x {args.max_length} tokens, "
          f"{args.steps} steps; MiB; real = peak RSS - baseline; allocator: default = glibc's, "
          f"mmap = MALLOC_MMAP_THRESHOLD_=131072")
    header = ("method", "plan total", "of it act.", "allocator", "real", "plan/real",
              "opt bytes ==")
    print("{:<14}{:>12}{:>12}{:>11}{:>9}{:>11}{:>14}".format(*header))
    for method in methods:
        one = planned[parse_method(method).name]
        for allocator in allocators:
            runs = [r for r in loaded if r["method"] == method and r["allocator"] == allocator]
            real = runs[-1] if runs else measure(method, allocator, args)
            if args.save and not runs:
                with args.save.open("a") as out:
                    out.write(json.dumps(real) + "\n")
            used = real["peak"] - real["baseline"]
            same = real["optimizer_state_bytes"] == one.optimizer_bytes
            print(f"{method:<14}{one.total_bytes / 2**20:>12.0f}"
                  f"{one.activation_bytes / 2**20:>12.0f}{allocator:>11}{used / 2**20:>9.0f}"
                  f"{one.total_bytes / used:>11.2f}{'yes' if same else 'NO':>14}", flush=True)


if __name__ == "__main__":
    main()
