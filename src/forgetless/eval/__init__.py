"""Forgetting evaluation: did the model learn the target and keep its general ability?

Stable API (other modules and users build on it)::

    from forgetless.eval import evaluate, EvalResult, Metric

    result = evaluate(model, tokenizer, suite=["arc_easy", "piqa"], limit=300, seed=0,
                      target="gsm8k", target_limit=100, base_model=base,
                      drift_prompts=None, batch_size=16, num_fewshot=None)
    result.metrics["arc_easy/acc"]      # Metric(value, stderr, ci_low, ci_high, n)
    result.per_item["arc_easy"]         # [{id, pred, gold, correct, pred_norm, correct_norm,
                                        #   loglikelihoods, gold_logprob, margin}, ...]
                                        #   for paired tests
    result.param_drift                  # {rows, by_layer, by_type, total} when base given
    result.save("result.json"); EvalResult.load("result.json")   # atomic JSON round trip

Metric names:

* ``<task>/acc``, ``<task>/acc_norm`` - held-out multiple choice, scored as lm-eval-harness
  does (sum log-likelihood of each choice; ``acc_norm`` divides by the choice's character
  length); ``heldout/acc`` is the unweighted mean of the suite's ``acc``.
* ``<task>/gold_logprob``, ``<task>/margin`` - continuous, per-item twins of ``acc`` (nats):
  the gold choice's log-probability among the choices (log-softmax over the choices'
  log-likelihoods, as ``acc`` compares them) and its lead over the best wrong choice (> 0 iff
  correct). They move before an argmax flips, so paired base-vs-model differences separate
  methods with far fewer items; ``heldout/gold_logprob`` and ``heldout/margin`` average them.
* ``<target>/exact_match``, ``<target>/answer_nll`` (mean NLL per reference-answer token),
  ``<target>/answer_ppl`` - the target task, greedy generation with the chat template.
* ``drift/kl`` (KL(base || tuned), nats/token), ``drift/top1_agreement``,
  ``drift/number_mass``, ``drift/number_mass_base`` - when ``base_model`` is given.

Suites: ``DEFAULT_SUITE`` = arc_easy + piqa with ``DEFAULT_LIMIT`` = 200 items each (quick,
for monitors and CI); ``FULL_SUITE`` adds mmlu (near chance for 135M models) and winogrande.
A suite entry is a built-in task name (``builtin_tasks()``), a task YAML path, or a
``TaskSpec`` (schema in ``forgetless.eval.tasks``). ``limit`` may be a dict task -> items.

Targets: ``gsm8k`` built in, a ``.jsonl`` path of prompt/response (or chat ``messages``) rows,
or anything added with ``register_target(Target(name, load, extract, max_new_tokens))``.

Vision-language models: pass the processor ``load_model`` returns as ``tokenizer``. Image tasks
(a task's ``image:`` field; the built-in ``count_shapes``, ``read_clock``, ``name_color``,
``name_shape``), image targets (same names, or image rows in a ``.jsonl``) and drift prompts
with images then go through the processor; text tasks score as for a text model.

Lower-level pieces: ``kl_and_number_mass``, ``param_drift``, ``number_token_ids``,
``paired_difference(before, after, task)`` (paired SE + bootstrap CI of after - before),
``score_requests`` (batched continuation log-likelihoods).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Names resolve lazily (PEP 562) so ``forgetless --help`` does not pay for importing torch.
_EXPORTS = {
    "eval_command": "forgetless.cli.eval",  # the command's new home; kept as a public name
    "ParamDrift": "drift",
    "kl_and_number_mass": "drift",
    "number_token_ids": "drift",
    "param_drift": "drift",
    "DEFAULT_LIMIT": "evaluator",
    "DEFAULT_SUITE": "evaluator",
    "FULL_SUITE": "evaluator",
    "default_drift_prompts": "evaluator",
    "evaluate": "evaluator",
    "sampled_rows": "evaluator",
    "EvalResult": "result",
    "paired_difference": "result",
    "score_requests": "scoring",
    "Metric": "stats",
    "Target": "targets",
    "TargetRow": "targets",
    "extract_answer": "targets",
    "get_target": "targets",
    "normalize_number": "targets",
    "register_target": "targets",
    "registered_targets": "targets",
    "TaskSpec": "tasks",
    "builtin_tasks": "tasks",
    "load_spec": "tasks",
    "load_task": "tasks",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'forgetless.eval' has no attribute {name!r}")
    module = _EXPORTS[name]
    where = module if "." in module else f"forgetless.eval.{module}"
    return getattr(importlib.import_module(where), name)


if TYPE_CHECKING:
    from forgetless.cli.eval import eval_command
    from forgetless.eval.drift import (
        ParamDrift,
        kl_and_number_mass,
        number_token_ids,
        param_drift,
    )
    from forgetless.eval.evaluator import (
        DEFAULT_LIMIT,
        DEFAULT_SUITE,
        FULL_SUITE,
        default_drift_prompts,
        evaluate,
        sampled_rows,
    )
    from forgetless.eval.result import EvalResult, paired_difference
    from forgetless.eval.scoring import score_requests
    from forgetless.eval.stats import Metric
    from forgetless.eval.targets import (
        Target,
        TargetRow,
        extract_answer,
        get_target,
        normalize_number,
        register_target,
        registered_targets,
    )
    from forgetless.eval.tasks import TaskSpec, builtin_tasks, load_spec, load_task

__all__ = [
    "sampled_rows",
    "DEFAULT_LIMIT",
    "DEFAULT_SUITE",
    "FULL_SUITE",
    "EvalResult",
    "Metric",
    "ParamDrift",
    "Target",
    "TargetRow",
    "TaskSpec",
    "builtin_tasks",
    "default_drift_prompts",
    "eval_command",
    "evaluate",
    "extract_answer",
    "get_target",
    "kl_and_number_mass",
    "load_spec",
    "load_task",
    "normalize_number",
    "number_token_ids",
    "paired_difference",
    "param_drift",
    "register_target",
    "registered_targets",
    "score_requests",
]
