"""Training time with and without the parameter-update analytics (``forgetless.updates``).

    PYTHONPATH=src .venv/bin/python bench/update_analytics.py [--steps 20] [--repeats 3]
        [--methods full,attn+mofo] [--every 10] [--threads 2] [--batch-size 4] [--max-length 128]

The embedded SmolLM2-135M (loaded once; every run trains a fresh copy) on GSM8K through
``forgetless.train``. Runs alternate off / on per repeat, so both see the same machine load;
per method it prints the median ``train_seconds`` of each, their spread (min-max), the overhead
of the median pair and of each pair, and the callback's own timed share of its runs. Goal:
<= 5% at the default ``update_stats_every=10``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

from forgetless.models import load_model
from forgetless.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="full,attn+mofo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(args.model, dtype=torch.float32, device=torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, "
          f"{args.steps} steps x batch {args.batch_size} x {args.max_length} tokens, "
          f"analytics every {args.every} steps, {args.repeats} repeats")
    for method in args.methods.split(","):
        times: dict[str, list[float]] = {"off": [], "on": []}
        own: list[float] = []
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                with tempfile.TemporaryDirectory() as out:
                    result = train(
                        dict(model=args.model, data="gsm8k", method=method, max_steps=args.steps,
                             batch_size=args.batch_size, max_length=args.max_length,
                             limit=args.steps * args.batch_size, learning_rate=1e-5,
                             report_to=[], logging_steps=args.steps, save_model=False,
                             device="cpu", dtype="float32", output_dir=out,
                             update_stats_every=args.every if mode == "on" else None),
                        model=copy.deepcopy(base), tokenizer=tokenizer,
                    )
                seconds = result.metrics["train_seconds"]
                times[mode].append(seconds)
                line = f"  {method} analytics {mode}: {seconds:.1f} s"
                if mode == "on":
                    stats = result.metrics["update_analytics"]
                    own.append(stats["seconds"] / seconds)
                    line += (f" (callback's own {stats['seconds']:.2f} s = {100 * own[-1]:.2f}%, "
                             f"{len(stats['history'])} measured steps)")
                print(line, flush=True)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        pairs = ", ".join(f"{100 * (b / a - 1):+.1f}%" for a, b in zip(times["off"], times["on"]))
        print(f"{method:>12}: off {off:.1f} s [{min(times['off']):.1f}-{max(times['off']):.1f}], "
              f"on {on:.1f} s [{min(times['on']):.1f}-{max(times['on']):.1f}]; overhead "
              f"{100 * (on / off - 1):+.1f}% (pairs {pairs}); callback's own time "
              f"{100 * statistics.median(own):.2f}% of training (median)")


if __name__ == "__main__":
    main()
