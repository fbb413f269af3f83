"""Processor calls and time of ``ImageTextCollator`` per batch of ``count_shapes`` rows: now
(one processor call per batch) against measuring each turn's span by processing its prefix (the
collator before: 2 more calls per example), side by side, interleaved rounds.

    python bench/collator.py [--rounds 7] [--batch-size 8] [--batches 4]

The processor is the embedded VLM's (``vlm.build.make_processor``: SmolLM2's tokenizer, SigLIP
resizing to 64 px); building it needs no model. Labels of both are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import AutoTokenizer

from forgetless.models import resolve_model
from forgetless.vlm.build import BuildSpec, make_processor
from forgetless.vlm.collator import ImageTextCollator, ProcessedSpansCollator
from forgetless.vlm.examples import Example, image_messages
from forgetless.vlm.tasks import image_task_rows


class Counting:
    """A processor that counts its calls (everything else passes through)."""

    def __init__(self, processor: Any) -> None:
        self.inner, self.calls = processor, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    processor = make_processor(
        AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")), BuildSpec())
    n = args.batch_size * args.batches
    examples = [Example(image_messages(row.prompt, row.response), [row.image])
                for row in image_task_rows("count_shapes", "train", n=n, seed=0)]
    batches = [examples[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
    collators = {"now (one call per batch)": ImageTextCollator(Counting(processor)),
                 "before (prefix per turn)": ProcessedSpansCollator(Counting(processor))}
    times: dict[str, list[float]] = {name: [] for name in collators}
    for index in range(args.rounds):
        order = list(collators) if index % 2 == 0 else list(collators)[::-1]
        labels = {}
        for name in order:
            collator = collators[name]
            started = time.perf_counter()
            labels[name] = [collator(batch)["labels"] for batch in batches]
            times[name].append((time.perf_counter() - started) / n * 1e3)
        first, second = labels.values()
        assert all(torch.equal(a, b) for a, b in zip(first, second)), "labels differ"
    print(f"count_shapes, {args.batches} batches of {args.batch_size}, {args.rounds} rounds, "
          f"1 thread; labels identical in every round")
    print(f"{'collator':<26} {'processor calls / example':>26} {'ms / example':>22}")
    for name, collator in collators.items():
        calls = collator.processor.calls / (n * args.rounds)
        values = times[name]
        print(f"{name:<26} {calls:>26.3f} {statistics.median(values):>10.2f} "
              f"[{min(values):.2f}-{max(values):.2f}]")


if __name__ == "__main__":
    main()
