"""forgetless eval vs lm-evaluation-harness on the same model, items and local files.

Both evaluators score the same in-memory model (lm-eval through its ``HFLM`` wrapper), on the
same seeded sample of each benchmark, read from the same files in the shared data folder
(lm-eval through task YAMLs generated into a temp dir at run time). Per task, the two runs
alternate so background load hits both alike. Prints accuracy of both, per-item agreement of
the chosen answer and the wall-time ratio forgetless / lm-eval.

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

from forgetless.eval import evaluate, load_spec
from forgetless.eval.tasks import load_task, sample_indices
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


def run_lmeval(lm, folder: Path, name: str, indices: list[int]):
    """Chosen answer and lm-eval's own ``acc`` per item (in ``indices`` order), wall seconds."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder))
    task = f"fl_{name}"
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm, tasks=[task], samples={task: indices}, task_manager=manager, log_samples=True
    )
    seconds = time.perf_counter() - start
    by_doc = {}
    for sample in out["samples"][task]:
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        by_doc[sample["doc_id"]] = (int(np.argmax(lls)), float(sample["acc"]))
    preds = [by_doc[i][0] for i in indices]
    accs = [by_doc[i][1] for i in indices]
    return preds, accs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="used by both evaluators")
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
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, "
          f"batch size {args.batch_size}, seed {args.seed}, limit {args.limit}")
    header = f"{'task':<11} {'n':>4} {'fl acc':>7} {'lm acc':>7} {'agree':>6} " \
             f"{'fl s':>7} {'lm s':>7} {'ratio':>6}"
    rows = [header]
    total_fl = total_lm = 0.0
    with tempfile.TemporaryDirectory(prefix="fl-lmeval-") as tmp:
        folder = Path(tmp)
        write_lmeval_tasks(folder, tasks)
        for name in tasks:
            spec = load_spec(name)
            total = load_task(spec, limit=1).total
            indices = sample_indices(total, args.limit, args.seed)
            run_lmeval(lm, folder, name, indices[:2])  # warm-up: builds lm-eval's data cache
            start = time.perf_counter()
            result = evaluate(model, tokenizer, suite=[name], limit=args.limit, seed=args.seed,
                              batch_size=args.batch_size)
            fl_seconds = time.perf_counter() - start
            lm_preds, lm_accs, lm_seconds = run_lmeval(lm, folder, name, indices)
            records = result.per_item[name]
            fl_preds = [r["pred"] for r in records]
            golds = [r["gold"] for r in records]
            fl_acc = np.mean([p == g for p, g in zip(fl_preds, golds)])
            lm_acc = np.mean(lm_accs)
            agree = np.mean([a == b for a, b in zip(fl_preds, lm_preds)])
            total_fl, total_lm = total_fl + fl_seconds, total_lm + lm_seconds
            rows.append(
                f"{name:<11} {len(records):>4} {fl_acc:7.2%} {lm_acc:7.2%} {agree:6.1%} "
                f"{fl_seconds:7.1f} {lm_seconds:7.1f} {fl_seconds / lm_seconds:6.2f}"
            )
            print(rows[-1], flush=True)
    rows.append(f"{'all':<11} {'':>4} {'':>7} {'':>7} {'':>6} {total_fl:7.1f} {total_lm:7.1f} "
                f"{total_fl / total_lm:6.2f}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
