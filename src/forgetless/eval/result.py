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
        return cls(
            metrics={k: Metric.from_dict(m) for k, m in data.get("metrics", {}).items()},
            per_item=data.get("per_item", {}),
            param_drift=data.get("param_drift"),
            provenance=data.get("provenance", {}),
        )

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
        """Plain-text metric table for terminals and logs."""
        width = max((len(k) for k in self.metrics), default=10)
        lines = [f"{'metric':<{width}}  {'value':>9}  {'stderr':>8}  {'95% CI':<21}  n"]
        for name, m in self.metrics.items():
            ci = f"[{m.ci_low:.4f}, {m.ci_high:.4f}]"
            lines.append(f"{name:<{width}}  {m.value:9.4f}  {m.stderr:8.4f}  {ci:<21}  {m.n}")
        return "\n".join(lines)


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
