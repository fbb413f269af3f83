"""Training time with and without the parameter-update analytics (``forgetless.updates``).

    PYTHONPATH=src .venv/bin/python bench/update_analytics.py [--steps 20] [--repeats 3]
        [--methods full,attn+mofo] [--every 10] [--threads 2] [--batch-size 4] [--max-length 128]

The embedded SmolLM2-135M (loaded once; every run trains a fresh copy) on GSM8K through
``forgetless.train``. Runs alternate off / on per repeat, so both see the same machine load;
per method it prints the median ``train_seconds`` of each, their spread (min-max), the overhead
of the median pair and of each pair, and the callback's own timed share of its runs. Goal:
<= 5% at the default ``update_stats_every=10``.

``--callback-only`` skips training: on every trainable weight of the model (full fine-tuning's
272 tensors for SmolLM2), it times the callback's start (θ₀ copy) and one measured step
(snapshot and measure around a sparse fake update, which is not timed) with every coordinate
tracked (``sample=None``) and with the default sample, alternating, and prints the bytes each
holds and the measured-step time ratio.
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
    parser.add_argument("--callback-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(args.model, dtype=torch.float32, device=torch.device("cpu"))
    if args.callback_only:
        callback_only(base, args.repeats)
        return
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


def callback_only(model: torch.nn.Module, repeats: int) -> None:
    """Exact vs sampled tracking on ``model``'s weights, side by side (see the docstring)."""
    import time

    from forgetless.updates import DEFAULT_SAMPLE, UpdateAnalytics

    class State:
        global_step, max_steps = 0, 10

    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f} M coordinates")
    seconds: dict[str, list[float]] = {"exact": [], "sampled": []}
    for round_ in range(repeats):
        for mode in ("exact", "sampled") if round_ % 2 == 0 else ("sampled", "exact"):
            analytics = UpdateAnalytics(every=1, sample=None if mode == "exact" else
                                        DEFAULT_SAMPLE)
            started = time.perf_counter()
            analytics.on_train_begin(None, State, None, model=model)
            begin = time.perf_counter() - started
            started = time.perf_counter()
            analytics.on_pre_optimizer_step(None, State, None)
            snapshot = time.perf_counter() - started
            with torch.no_grad():
                for param in params:  # a sparse step: every 10th coordinate moves
                    param.view(-1)[::10] += 1e-3
            started = time.perf_counter()
            analytics.on_optimizer_step(None, State, None)
            seconds[mode].append(snapshot + time.perf_counter() - started)
            summary = analytics.summary()
            with torch.no_grad():
                for param in params:
                    param.view(-1)[::10] -= 1e-3
            print(f"  {mode}: start {begin:.2f} s, measured step {seconds[mode][-1]:.3f} s "
                  f"(snapshot + measure), {summary['bytes'] / 2**20:.0f} MiB held, moved "
                  f"{analytics._pending['updates/moved/total']:.4f}", flush=True)
            del analytics
    ratios = [s / e for s, e in zip(seconds["sampled"], seconds["exact"])]
    print(f"sampled / exact measured-step time per round: median {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}-{max(ratios):.3f}]")


if __name__ == "__main__":
    main()
