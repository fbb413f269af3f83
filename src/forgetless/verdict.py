"""The verdict a report leads with: which methods learned the target, which forgot
significantly, which is the best trade-off, in a few sentences with their numbers.

Reads the plain JSON that ``compare`` (``results.json``), ``continual`` (``continual.json``) and
``tune`` (``tune.json``) write, so a report redrawn later says the same. "Significant" means the
paired 95% CI excludes 0, as the tables' ``*``; when nothing is, the verdict says the CIs cannot
tell the methods apart rather than naming a winner by its point estimate alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_UNITS = {"accuracy": ("pts", 100.0, 1), "gold_logprob": ("nats", 1.0, 3),
          "margin": ("nats", 1.0, 3)}
_WHAT = {"accuracy": "accuracy", "gold_logprob": "gold log-prob", "margin": "margin"}
# Continual has no CI on ACC (one run): "equal learning" there is ACC within this of the best.
CONTINUAL_EQUAL_ACC = 0.02


@dataclass
class Row:
    """One method: its learning and forgetting changes (metric dicts: value, ci_low, ci_high),
    one per seed when a report lists seeds separately (tune), else one."""

    name: str
    learn: list[dict] = field(default_factory=list)
    forget: list[dict] = field(default_factory=list)

    def mean(self, which: str) -> float | None:
        values = [m["value"] for m in getattr(self, which) if m]
        return sum(values) / len(values) if values else None


def _sign(metric: dict | None) -> int:
    """+1 / -1 when the CI lies above / below 0, else 0."""
    if not metric or _nan(metric.get("ci_low")) or _nan(metric.get("ci_high")):
        return 0
    return 1 if metric["ci_low"] > 0 else -1 if metric["ci_high"] < 0 else 0


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _all(metrics: list[dict], sign: int) -> bool:
    return bool(metrics) and all(_sign(m) == sign for m in metrics)


def _any(metrics: list[dict], sign: int) -> bool:
    return any(_sign(m) == sign for m in metrics)


def _cell(metric: dict, scale: float, digits: int, unit: str = "") -> str:
    text = f"{scale * metric['value']:+.{digits}f}"
    if not _nan(metric.get("ci_low")):
        text += (f" [{scale * metric['ci_low']:+.{digits}f}, "
                 f"{scale * metric['ci_high']:+.{digits}f}]")
    return f"{text} {unit}".rstrip()


def _cells(row: Row, which: str, scale: float, digits: int, unit: str) -> str:
    metrics = [m for m in getattr(row, which) if m]
    if len(metrics) == 1:
        return _cell(metrics[0], scale, digits, unit)
    return "seeds " + ", ".join(_cell(m, scale, digits) for m in metrics) + f" {unit}"


def _names(rows: list[Row], which: str, scale: float, digits: int, unit: str) -> str:
    return "; ".join(f"{r.name} {_cells(r, which, scale, digits, unit)}" for r in rows)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names no other point beats on both axes (higher is better on both)."""
    return [name for name, (x, y) in points.items()
            if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y)
                       for other, (x2, y2) in points.items() if other != name)]


def _overlap(a: dict, b: dict) -> bool:
    """Whether two changes' CIs overlap (no CI: compare the values)."""
    if _nan(a.get("ci_low")) or _nan(b.get("ci_low")):
        return a["value"] == b["value"]
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def verdict(rows: list[Row], learning: str | None, measure: str,
            seeds_apart: bool = False) -> list[str]:
    """The sentences: learned, forgot, best trade-off at equal learning (+ the CI caveat).

    ``learning``: what the learning change measures (e.g. "largest_number exact match"), None
    when there is no target; ``measure``: the held-out forgetting measure (accuracy, gold_logprob,
    margin); ``seeds_apart``: rows hold one change per seed (significant = in every seed)."""
    unit, scale, digits = _UNITS[measure]
    what = _WHAT[measure]
    every = " in every seed" if seeds_apart else ""
    lines = []
    learners = [r for r in rows if _all([m for m in r.learn if m], 1)]
    if learning is None:
        lines.append("Learning: no target task was measured.")
    elif learners:
        lines.append(f"Learned the target ({learning}, paired 95% CI above 0{every}): "
                     f"{_names(learners, 'learn', 100.0, 1, 'pts')}.")
    else:
        lines.append(f"No method learned the target significantly ({learning}: every paired 95% "
                     "CI includes 0 or lies below it).")
    forgot = [r for r in rows if (_any if seeds_apart else _all)([m for m in r.forget if m], -1)]
    some = " in some seed" if seeds_apart else ""
    if forgot:
        lines.append(f"Forgot significantly (held-out {what}, paired 95% CI below 0{some}): "
                     f"{_names(forgot, 'forget', scale, digits, unit)}.")
    elif any(r.forget for r in rows):
        widths = [scale * (m["ci_high"] - m["ci_low"]) / 2 for r in rows for m in r.forget
                  if m and not _nan(m.get("ci_low"))]
        spread = f" (half-widths up to ±{max(widths):.{digits}f} {unit})" if widths else ""
        lines.append(f"No method forgot significantly: every held-out {what} change has a "
                     f"95% CI that includes 0{spread}, so at this sample size these runs cannot "
                     "tell the methods' forgetting apart; more items or seeds narrow the CIs.")
    lines.append(_trade_off(rows, learners if learning else rows, learning, measure))
    return lines


def _trade_off(rows: list[Row], learners: list[Row], learning: str | None, measure: str) -> str:
    """The learner with the least forgetting among those that learned as much as the best one
    (CIs overlapping), and the Pareto front of (held-out change, learning)."""
    unit, scale, digits = _UNITS[measure]
    scored = [r for r in rows if r.mean("forget") is not None
              and (learning is None or r.mean("learn") is not None)]
    if not scored:
        return "Best trade-off: not measured (no held-out change recorded)."
    points = {r.name: (r.mean("forget"), r.mean("learn") if learning else 0.0) for r in scored}
    front = pareto_front(points)
    front_text = f"Pareto front of learning vs forgetting: {', '.join(front)}."
    pool = [r for r in learners if r in scored]
    if learning is not None and not pool:
        return f"Best trade-off: none — no method learned the target. {front_text}"
    if learning is not None:
        top = max(pool, key=lambda r: r.mean("learn"))
        best_learning = {"value": top.mean("learn"), "ci_low": min(m["ci_low"] for m in top.learn),
                         "ci_high": max(m["ci_high"] for m in top.learn)}
        equal = [r for r in pool if all(_overlap(m, best_learning) for m in r.learn if m)]
    else:
        top, equal = None, pool
    best = max(equal, key=lambda r: r.mean("forget"))
    forget = _cells(best, "forget", scale, digits, unit)
    text = f"Best trade-off: {best.name} (held-out {_WHAT[measure]} {forget}"
    if learning is not None:
        text += f", learning {100 * best.mean('learn'):+.1f} pts"
        if top is not best:
            text += (f", as much as the top learner {top.name}'s "
                     f"{100 * top.mean('learn'):+.1f} pts within the CIs")
    text += ")"
    others = [r for r in equal if r is not best]
    if others:
        text += (" — the least held-out change among the methods that learned as much"
                 if learning is not None else " — the least held-out change")
        if not any(_sign(m) == -1 for r in rows for m in r.forget if m):
            text += ", though no difference in forgetting is significant"
    return f"{text}. {front_text}"


# --- the three reports ------------------------------------------------------------------------


def compare_verdict(results: dict, measure: str) -> list[str]:
    """From compare's ``results.json`` (one pooled entry per method) and the report's
    forgetting measure."""
    rows = []
    for entry in results.get("methods") or []:
        avg = entry.get("heldout_avg") or {}
        forget = avg.get("delta") if measure == "accuracy" else (avg.get(measure) or {}).get(
            "delta")
        learn = (entry.get("target") or {}).get("delta")
        rows.append(Row(entry["name"], [learn] if learn else [], [forget] if forget else []))
    target = results.get("target")
    return verdict(rows, f"{target} exact match" if target else None, measure)


def continual_verdict(summary: dict) -> list[str]:
    """From continual's summary: learning is ACC (final exact match averaged over the tasks;
    one run, no CI), forgetting the held-out change after the last stage."""
    methods = summary.get("methods") or {}
    if not methods:
        return []
    changes = {name: data.get("heldout_change") or {} for name, data in methods.items()}
    measure = next((m for m in ("gold_logprob", "accuracy")
                    if any((c.get(m) or [None])[-1] for c in changes.values())), "accuracy")
    unit, scale, digits = _UNITS[measure]
    best_acc = max(d["acc"] for d in methods.values())
    accs = ", ".join(f"{n} {d['acc']:.3f}" for n, d in
                     sorted(methods.items(), key=lambda kv: -kv[1]["acc"]))
    lines = [f"Final average score over the tasks (ACC, exact match, one run: no CI): {accs}.",
             "Forgetting of earlier tasks (BWT, negative = forgotten): "
             + ", ".join(f"{n} {d['bwt']:+.3f}" for n, d in methods.items()) + "."]
    last = {name: (c.get(measure) or [None])[-1] for name, c in changes.items()}
    forgot = [(n, m) for n, m in last.items() if _sign(m) == -1]
    what = _WHAT[measure]
    if forgot:
        lines.append(f"Forgot held-out ability significantly after the last stage ({what}, "
                     "paired 95% CI below 0): "
                     + "; ".join(f"{n} {_cell(m, scale, digits, unit)}" for n, m in forgot) + ".")
    elif any(last.values()):
        lines.append(f"No method's held-out {what} changed significantly after the last stage "
                     "(every paired 95% CI includes 0): these runs cannot tell the methods' "
                     "held-out forgetting apart; more items narrow the CIs.")
    equal = [n for n, d in methods.items() if d["acc"] >= best_acc - CONTINUAL_EQUAL_ACC
             and last.get(n)]
    if equal:
        best = max(equal, key=lambda n: last[n]["value"])
        points = {n: (last[n]["value"], methods[n]["acc"]) for n in methods if last.get(n)}
        lines.append(f"Best trade-off: {best} (ACC {methods[best]['acc']:.3f}, within "
                     f"{CONTINUAL_EQUAL_ACC:.2f} of the best, with the least held-out change, "
                     f"{_cell(last[best], scale, digits, unit)}). Pareto front of ACC vs "
                     f"held-out change: {', '.join(pareto_front(points))}.")
    return lines


def tune_verdict(results: dict) -> list[str]:
    """From tune's results: the test phase's per-seed changes of the recommendation and the
    baselines (significant = in every seed for learning, in some seed for forgetting)."""
    rows: dict[str, Row] = {}
    measure = "gold_logprob" if any(
        ((r["summary"].get("heldout_avg") or {}).get("gold_logprob") or {}).get("delta")
        for r in results.get("test") or []) else "accuracy"
    for r in results.get("test") or []:
        row = rows.setdefault(r["name"], Row(r["name"]))
        avg = r["summary"].get("heldout_avg") or {}
        forget = avg.get("delta") if measure == "accuracy" else (avg.get(measure) or {}).get(
            "delta")
        learn = (r["summary"].get("target") or {}).get("delta")
        row.learn += [learn] if learn else []
        row.forget += [forget] if forget else []
    if not rows:
        return []
    return verdict(list(rows.values()), f"{results.get('target')} exact match", measure,
                   seeds_apart=True)


__all__ = ["Row", "compare_verdict", "continual_verdict", "pareto_front", "tune_verdict",
           "verdict"]
