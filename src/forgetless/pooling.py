"""Pool a compare's training seeds: one change per method, with a CI for seeds and items.

One seed trains each method once, so its paired CIs say how much the *items* could move a
result, not the data order: docs/results.md found full fine-tuning forgetting in two seeds of
three. With ``seeds:`` a compare evaluates every (method, seed) on the same items; here each
paired change becomes the mean over seeds and items with a two-level bootstrap CI
(``forgetless.eval.stats.two_level_bootstrap``), and the per-seed summaries stay beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from forgetless.eval.stats import Metric, mean_metric, two_level_bootstrap

# the per-item fields behind each summarized change (``correct`` for accuracy / exact match)
_FIELDS = {"accuracy": "correct", "gold_logprob": "gold_logprob", "margin": "margin"}
CONTINUOUS = ("gold_logprob", "margin")


def flagged(metric: Metric) -> dict[str, Any]:
    """A metric as JSON, with ``significant`` = its 95% CI excludes 0."""
    data = metric.to_dict()
    data["significant"] = bool(metric.ci_low > 0 or metric.ci_high < 0)
    return data


def _values(result, task: str, field: str) -> dict[str, float]:
    records = result.per_item[task]
    if field == "nll_per_token":  # a target's answer NLL per token of the reference answer
        return {r["id"]: r["nll"] / max(1, r["tokens"]) for r in records}
    return {r["id"]: float(r[field]) for r in records}


def paired_matrix(befores: Sequence, afters: Sequence, task: str, field: str) -> np.ndarray:
    """``after − before`` per seed (rows) and item (columns): seed k's run against seed k's
    reference (the base, or the reference method trained with the same seed), on the items
    every run scored, in one order."""
    before = [_values(r, task, field) for r in befores]
    after = [_values(r, task, field) for r in afters]
    ids = [i for i in before[0] if all(i in v for v in [*before, *after])]
    return np.array([[a[i] - b[i] for i in ids] for b, a in zip(before, after)])


def pooled_delta(befores: Sequence, afters: Sequence, tasks: Sequence[str],
                 field: str) -> dict[str, Any] | None:
    """The mean paired change over ``tasks`` (the held-out average when several), seeds and
    items, two-level bootstrap CI; None when a run lacks the field (an older evaluator)."""
    try:
        matrices = [paired_matrix(befores, afters, task, field) for task in tasks]
    except KeyError:
        return None
    return flagged(two_level_bootstrap(matrices))


def target_nll_delta(before, after, target: str) -> dict[str, Any] | None:
    """One run's paired change of the target's answer NLL (nats per answer token, per item)."""
    return pooled_delta([before], [after], [target], "nll_per_token")


def pool_summary(summary: dict, befores: Sequence, afters: Sequence, suite: list[str],
                 target: str | None) -> dict:
    """Replace the paired changes of ``summary`` (``report.summarize`` of the first seed) by
    their pools over every seed, and its drift by the mean over seeds (SE between seeds)."""
    for task in suite:
        part = summary["heldout"][task]
        if part.get("delta"):
            part["delta"] = pooled_delta(befores, afters, [task], "correct")
        for measure in CONTINUOUS:
            if (part.get(measure) or {}).get("delta"):
                part[measure]["delta"] = pooled_delta(befores, afters, [task], measure)
    average = summary.get("heldout_avg") or {}
    if average.get("delta"):
        average["delta"] = pooled_delta(befores, afters, suite, "correct")
    for measure in CONTINUOUS:
        if (average.get(measure) or {}).get("delta"):
            average[measure]["delta"] = pooled_delta(befores, afters, suite, measure)
    if target and summary.get("target"):
        part = summary["target"]
        part["exact_match"] = mean_metric(
            [r.metrics[f"{target}/exact_match"].value for r in afters]).to_dict()
        if part.get("delta"):
            part["delta"] = pooled_delta(befores, afters, [target], "correct")
        if part.get("nll_delta"):
            part["nll_delta"] = pooled_delta(befores, afters, [target], "nll_per_token")
    for key in list(summary.get("drift") or {}):
        summary["drift"][key] = mean_metric([r.metrics[f"drift/{key}"].value for r in afters
                                             if f"drift/{key}" in r.metrics]).to_dict()
    return summary
