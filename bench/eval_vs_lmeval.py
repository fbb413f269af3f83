"""forgetless eval vs lm-evaluation-harness on the same model, items and local files.

Both evaluators score the same in-memory model (lm-eval through its ``HFLM`` wrapper), on the
same seeded sample of each benchmark, read from the same files in the shared data folder
(lm-eval through task YAMLs generated into a temp dir at run time). The two alternate over
chunks of items so background load hits both alike. Prints accuracy of both, per-item
agreement of the chosen answer and the wall-time ratio forgetless / lm-eval (scoring time and
end to end).

    .venv/bin/python bench/eval_vs_lmeval.py --tasks arc_easy,piqa --limit 300
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from forgetless.eval import load_spec
from forgetless.eval.evaluator import score_task
from forgetless.eval.tasks import LoadedTask, load_task, sample_indices
from forgetless.models import load_model
from forgetless.paths import shared_data_dir

# lm-eval task YAMLs mirroring lm-eval's own arc_easy / piqa / mmlu / winogrande definitions,
# pointed at the shared local files instead of the Hub copies.
LMEVAL_TASKS = {
    "arc_easy": """
        task: fl_arc_easy
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: "{data}/arc/ARC-Easy-Test.jsonl"}}
        output_type: multiple_choice
        test_split: test
        doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
        doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
        doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
        metric_list:
          - {{metric: acc, aggregation: mean, higher_is_better: true}}
          - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
        """,
    "piqa": """
        task: fl_piqa
        dataset_path: json
        dataset_kwargs:
          data_files: {{validation: "{data}/piqa/dev.jsonl"}}
        output_type: multiple_choice
        test_split: validation
        process_docs: !function fl_utils.piqa_labels
        doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
        doc_to_target: label
        doc_to_choice: "{{{{[sol1, sol2]}}}}"
        metric_list:
          - {{metric: acc, aggregation: mean, higher_is_better: true}}
          - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
        """,
    "winogrande": """
        task: fl_winogrande
        dataset_path: json
        dataset_kwargs:
          data_files: {{validation: "{data}/winogrande/dev.jsonl"}}
        output_type: multiple_choice
        test_split: validation
        doc_to_text: !function fl_utils.wino_text
        doc_to_target: !function fl_utils.wino_target
        doc_to_choice: !function fl_utils.wino_choice
        metric_list:
          - {{metric: acc, aggregation: mean, higher_is_better: true}}
        """,
}

LMEVAL_UTILS = """
import datasets

LABELS = {labels!r}


def piqa_labels(dataset):
    labels = open(LABELS).read().split()
    return dataset.add_column("label", [int(x) for x in labels])


def wino_text(doc):
    return {{"1": 0, "2": 1}}[doc["answer"]]


def wino_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def wino_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
"""


def write_lmeval_tasks(folder: Path, tasks: list[str]) -> None:
    data = shared_data_dir()
    for name in tasks:
        if name not in LMEVAL_TASKS:
            raise SystemExit(f"no lm-eval mirror for task '{name}' (have {list(LMEVAL_TASKS)})")
        text = textwrap.dedent(LMEVAL_TASKS[name]).format(data=data)
        (folder / f"fl_{name}.yaml").write_text(text)
    utils = LMEVAL_UTILS.format(labels=str(data / "piqa" / "dev-labels.lst"))
    (folder / "fl_utils.py").write_text(utils)


class LmEval:
    """lm-eval's ``simple_evaluate`` on our task YAMLs, with its ``loglikelihood`` (tokenise,
    batch, forward: the part comparable to forgetless's scorer) timed separately."""

    def __init__(self, lm, folder: Path):
        from lm_eval.tasks import TaskManager

        self.lm, self.manager, self.scoring_seconds = lm, TaskManager(include_path=str(folder)), 0.0
        self._loglikelihood = lm.loglikelihood
        lm.loglikelihood = self._timed

    def _timed(self, requests, **kwargs):
        start = time.perf_counter()
        try:
            return self._loglikelihood(requests, **kwargs)
        finally:
            self.scoring_seconds += time.perf_counter() - start

    def run(self, name: str, indices: list[int]) -> dict[int, tuple[int, float]]:
        """doc index -> (chosen answer, lm-eval's own acc)."""
        from lm_eval.evaluator import simple_evaluate

        task = f"fl_{name}"
        out = simple_evaluate(model=self.lm, tasks=[task], samples={task: indices},
                              task_manager=self.manager, log_samples=True)
        by_doc = {}
        for sample in out["samples"][task]:
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            by_doc[sample["doc_id"]] = (int(np.argmax(lls)), float(sample["acc"]))
        return by_doc


def compare_task(model, tokenizer, harness: LmEval, name: str, args) -> dict:
    """Alternate forgetless and lm-eval over chunks of the same items (swapping who goes first)
    so changing background load hits both alike; sum their times."""
    start = time.perf_counter()
    loaded = load_task(load_spec(name), args.limit, args.seed)
    fl = {"wall": time.perf_counter() - start, "scoring": 0.0}
    lm = {"wall": 0.0}
    indices = sample_indices(loaded.total, args.limit, args.seed)
    harness.run(name, indices[:2])  # warm-up: builds lm-eval's dataset cache
    harness.scoring_seconds = 0.0
    records, lm_by_doc = [], {}
    for k, lo in enumerate(range(0, len(indices), args.chunk)):
        chunk = LoadedTask(loaded.spec, loaded.items[lo : lo + args.chunk], loaded.total, {})
        for who in (("fl", "lm") if k % 2 == 0 else ("lm", "fl")):
            start = time.perf_counter()
            if who == "fl":
                records += score_task(model, tokenizer, chunk, args.batch_size)[0]
                fl["scoring"] += time.perf_counter() - start
            else:
                lm_by_doc.update(harness.run(name, indices[lo : lo + args.chunk]))
                lm["wall"] += time.perf_counter() - start
    fl["wall"] += fl["scoring"]
    lm["scoring"] = harness.scoring_seconds
    fl_preds = [r["pred"] for r in records]
    lm_preds = [lm_by_doc[i][0] for i in indices]
    return {
        "n": len(records),
        "fl_acc": float(np.mean([r["correct"] for r in records])),
        "lm_acc": float(np.mean([lm_by_doc[i][1] for i in indices])),
        "fl_acc_norm": float(np.mean([r["correct_norm"] for r in records])),
        "agree": float(np.mean([a == b for a, b in zip(fl_preds, lm_preds)])),
        "fl": fl, "lm": lm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="used by both evaluators")
    parser.add_argument("--chunk", type=int, default=100, help="items per alternation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval.models.huggingface import HFLM

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model, tokenizer = load_model(args.model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, batch size "
          f"{args.batch_size}, seed {args.seed}, limit {args.limit}, chunk {args.chunk}")
    rows = []
    totals = {"fl": [0.0, 0.0], "lm": [0.0, 0.0]}
    with tempfile.TemporaryDirectory(prefix="fl-lmeval-") as tmp:
        write_lmeval_tasks(Path(tmp), tasks)
        harness = LmEval(lm, Path(tmp))
        for name in tasks:
            r = compare_task(model, tokenizer, harness, name, args)
            for who in ("fl", "lm"):
                totals[who][0] += r[who]["scoring"]
                totals[who][1] += r[who]["wall"]
            rows.append(
                f"{name:<11} {r['n']:>4} {r['fl_acc']:7.2%} {r['lm_acc']:7.2%} "
                f"{r['agree']:6.1%} {r['fl']['scoring']:7.1f} {r['lm']['scoring']:7.1f} "
                f"{r['fl']['scoring'] / r['lm']['scoring']:6.2f} {r['fl']['wall']:7.1f} "
                f"{r['lm']['wall']:7.1f} {r['fl']['wall'] / r['lm']['wall']:6.2f}"
            )
            print(rows[-1], flush=True)
    (fs, fw), (ls, lw) = totals["fl"], totals["lm"]
    rows.append(f"{'all':<11} {'':>4} {'':>7} {'':>7} {'':>6} {fs:7.1f} {ls:7.1f} {fs / ls:6.2f} "
                f"{fw:7.1f} {lw:7.1f} {fw / lw:6.2f}")
    print(f"\n{'task':<11} {'n':>4} {'fl acc':>7} {'lm acc':>7} {'agree':>6} {'fl s':>7} "
          f"{'lm s':>7} {'ratio':>6} {'fl e2e':>7} {'lm e2e':>7} {'ratio':>6}")
    print("\n".join(rows))
    print("s/ratio: scoring time (forgetless score_task vs lm-eval HFLM.loglikelihood); "
          "e2e: whole evaluator calls incl. data loading and lm-eval's task building")


if __name__ == "__main__":
    main()
