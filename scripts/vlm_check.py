"""Measure the embedded VLM llava-smollm2 before any fine-tuning (docs/results-lmm.md).

Builds it first if it is not in the cache. Checks the language model is bit-identical to the
embedded SmolLM2, then scores each built-in image task by log-likelihood (multiple choice) and
greedy exact match. Usage: ``PYTHONPATH=src python scripts/vlm_check.py [items] [out.json]
[task,task,...]`` (the third argument restricts the tasks, e.g. ``name_color,name_shape``).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from forgetless.eval import evaluate
from forgetless.models import load_model, resolve_model
from forgetless.vlm.tasks import IMAGE_TASKS


def main() -> None:
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    started = time.time()
    model, processor = load_model("llava-smollm2")
    lm = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"))
    ours = model.model.language_model.state_dict()
    same = all(torch.equal(ours[k], v) for k, v in lm.model.state_dict().items())
    out: dict = {"model": resolve_model("llava-smollm2"),
                 "lm_bit_identical": same and torch.equal(model.lm_head.weight, lm.lm_head.weight)}
    print(out, flush=True)
    tasks = ("name_color", "name_shape", *[t for t in IMAGE_TASKS
                                           if t not in ("name_color", "name_shape")])
    if len(sys.argv) > 3:
        tasks = tuple(t for t in tasks if t in sys.argv[3].split(","))
    for task in tasks:
        result = evaluate(model, processor, suite=[task], limit=items, target=task,
                          target_limit=items).to_dict()
        out[task] = {"metrics": result["metrics"],
                     "sample": {k: v[:5] for k, v in result["per_item"].items()}}
        print(task, {k: round(m["value"], 3) for k, m in result["metrics"].items()
                     if k.endswith(("/acc", "/exact_match"))},
              f"{time.time() - started:.0f} s", flush=True)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
