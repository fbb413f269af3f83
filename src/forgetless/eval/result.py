"""The evaluation result: metrics with uncertainty, per-item records, drift table, provenance.

It round-trips through JSON so ``compare`` and CI gates can diff runs made at different times,
and ``provenance`` holds what is needed to repeat a run exactly (model, data hashes, item ids,
seed, versions).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetless.errors import ForgetlessError
from forgetless.eval.stats import Metric, paired_bootstrap

# Bump when the evaluator records new or changed metrics: ``compare`` re-evaluates (never
# retrains) results measured by an older version, so one report never mixes metric sets.
# 1: first release; 2: paired per-prompt number-mass change with a standard error;
# 3: per-item gold log-probability among the choices and margin (``<task>/gold_logprob``,
# ``<task>/margin``, their ``heldout/`` means); 4: a code task's ``gold_logprob`` per reference
# token (it was the sum, which swamped the pooled ``heldout/gold_logprob``).
METRICS_VERSION = 4


@dataclass
class EvalResult:
    """``metrics``: name -> Metric (e.g. ``arc_easy/acc``, ``drift/kl``); ``per_item``: task ->
    records with ``id``, ``pred``, ``gold``, ``correct`` (multiple choice also ``gold_logprob``,
    ``margin``; targets ``nll``, ``tokens``); ``param_drift``: see ``ParamDrift``."""

    metrics: dict[str, Metric] = field(default_factory=dict)
    per_item: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    param_drift: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def value(self, name: str) -> float:
        """Shortcut for ``metrics[name].value``."""
        return self.metrics[name].value

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "per_item": self.per_item,
            "param_drift": self.param_drift,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        per_item = data.get("per_item", {})
        code = {task for task, records in per_item.items()
                if records and all("returncode" in r for r in records)}  # run in the sandbox
        return cls(
            metrics={_renamed(k, code): Metric.from_dict(m)
                     for k, m in data.get("metrics", {}).items()},
            per_item=per_item,
            param_drift=data.get("param_drift"),
            provenance=data.get("provenance", {}),
        )

    def score_key(self, task: str) -> str:
        """The metric holding ``task``'s 0/1 score: ``<task>/pass@1`` for a code task (its
        programs run against the tests), ``<task>/acc`` for multiple choice."""
        return f"{task}/pass@1" if f"{task}/pass@1" in self.metrics else f"{task}/acc"

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temp file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1, allow_nan=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        """Plain-text metric table for terminals and logs, each 95% CI with its method."""
        width = max((len(k) for k in self.metrics), default=10)
        lines = [f"{'metric':<{width}}  {'value':>9}  {'stderr':>8}  {'95% CI':<21}  "
                 f"{'CI method':<9}  n"]
        for name, m in self.metrics.items():
            ci = f"[{m.ci_low:.4f}, {m.ci_high:.4f}]"
            lines.append(f"{name:<{width}}  {m.value:9.4f}  {m.stderr:8.4f}  {ci:<21}  "
                         f"{ci_method(name):<9}  {m.n}")
        return "\n".join(lines)


# How ``evaluate`` computes each metric's 95% interval, by the metric's last name part.
_CI_METHODS = {"acc": "Wilson", "acc_norm": "Wilson", "pass@1": "Wilson",
               "exact_match": "Wilson", "answer_nll": "bootstrap", "answer_ppl": "bootstrap"}


def ci_method(name: str) -> str:
    """The interval method behind metric ``name``: Wilson for a share of items, percentile
    bootstrap for a ratio of sums, normal (mean ± 1.96 SE) for a mean; a suite average
    (``heldout/``) pools its tasks' intervals (MOVER), so it keeps their method."""
    task, _, measure = name.rpartition("/")
    method = _CI_METHODS.get(measure, "normal")
    return f"{method}, pooled" if task == "heldout" else method


def _renamed(key: str, code_tasks: set[str]) -> str:
    """A metric name as this version writes it: a code task's ``acc`` (results measured before
    the rename) is its ``pass@1``; the values are the same, so no re-evaluation is needed."""
    task, _, measure = key.rpartition("/")
    return f"{task}/pass@1" if measure == "acc" and task in code_tasks else key


def paired_difference(
    before: EvalResult, after: EvalResult, task: str, field_name: str = "correct"
) -> Metric:
    """``after - before`` on ``task``'s per-item ``field_name`` (``correct``, ``correct_norm``,
    ``gold_logprob``, ``margin``; a target's ``nll``) over the item ids both runs scored:
    paired SE and paired-bootstrap 95% CI.

    Use it to judge "dropped by more than X points": the drop is significant when
    ``ci_high < -X`` (in fraction units, e.g. X = 0.02 for two points).
    """

    if task not in before.per_item or task not in after.per_item:
        raise ForgetlessError(f"task '{task}' is missing from one of the results")
    for which in (before, after):
        if any(field_name not in r for r in which.per_item[task]):
            raise ForgetlessError(
                f"'{task}' items have no '{field_name}' in one of the results: it was measured "
                "by an older evaluator; evaluate again"
            )
    old = {r["id"]: r[field_name] for r in before.per_item[task]}
    pairs = [(old[r["id"]], r[field_name]) for r in after.per_item[task] if r["id"] in old]
    if not pairs:
        raise ForgetlessError(f"the two results share no '{task}' items")
    return paired_bootstrap([float(a) for a, _ in pairs], [float(b) for _, b in pairs])
