"""``forgetless check``: a retention gate for CI: did the tuned model keep its held-out skills?

Both models answer the same held-out items (same suite, limit and seed), so each benchmark's
accuracy change is a *paired* difference with a paired-bootstrap 95% CI. Rule, per benchmark,
with ``drop`` = base accuracy - model accuracy in points:

* FAIL  when ``drop > max_drop`` AND the whole 95% CI of the change lies below 0
  (the drop is larger than allowed and not explainable by item noise);
* WARN  when ``drop > max_drop`` but the CI still includes 0 (inconclusive: more items needed;
  does not fail the gate);
* PASS  otherwise.

So an unchanged model fails with probability at most 2.5% per benchmark (the CI excludes 0 by
chance), while a real large drop on enough items fails reliably.

Accuracy moves only when an argmax flips, so every row also shows the paired change of the gold
choice's log-probability among the choices (nats, continuous: it separates models with far fewer
items). ``max_logprob_drop`` gates on it by the same rule (FAIL when the mean drop exceeds it and
its CI lies below 0; WARN when only the first holds); off by default. Exit code 0 = every benchmark
passed or warned, 1 = at least one failed (2 = usage or input error).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from forgetless.errors import ForgetlessError

RULE = ("FAIL if drop > max_drop and the paired 95% CI of the change lies entirely below 0; "
        "WARN if drop > max_drop but the CI includes 0; else PASS")


@dataclass
class CheckRow:
    """One benchmark: accuracies, change and its paired 95% CI, all in points."""

    task: str
    base: float
    model: float
    change: float
    ci_low: float
    ci_high: float
    n: int
    status: str
    # paired change of the gold choice's log-probability among the choices (nats)
    logprob_change: float = math.nan
    logprob_ci_low: float = math.nan
    logprob_ci_high: float = math.nan


@dataclass
class CheckResult:
    max_drop: float
    rows: list[CheckRow] = field(default_factory=list)
    rule: str = RULE
    max_logprob_drop: float | None = None

    @property
    def passed(self) -> bool:
        return all(row.status != "FAIL" for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "max_drop": self.max_drop,
                "max_logprob_drop": self.max_logprob_drop, "rule": self.rule,
                "rows": [asdict(row) for row in self.rows]}

    def table(self) -> str:
        lines = [f"{'task':<12} {'base':>6} {'model':>6} {'change':>7}  {'95% CI':<17} "
                 f"{'Δ logp':>8}  {'95% CI':<19} {'n':>4}  status"]
        for r in self.rows:
            ci = f"[{r.ci_low:+.1f}, {r.ci_high:+.1f}]"
            lp_ci = f"[{r.logprob_ci_low:+.3f}, {r.logprob_ci_high:+.3f}]"
            lines.append(f"{r.task:<12} {r.base:6.1f} {r.model:6.1f} {r.change:+7.1f}  {ci:<17} "
                         f"{r.logprob_change:+8.3f}  {lp_ci:<19} {r.n:>4}  {r.status}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: allowed drop {self.max_drop:g} points ({self.rule})")
        if self.max_logprob_drop is not None:
            lines.append(f"gold log-probability: allowed mean drop {self.max_logprob_drop:g} "
                         "nats, same rule")
        lines.append("Δ logp: paired change of the gold choice's log-probability among the "
                     "choices (nats per item; for a code task, of the canonical solution's "
                     "log-probability per token)")
        if any(r.status == "WARN" for r in self.rows):
            lines.append("WARN: a drop above the limit is not significant yet; raise --limit")
        return "\n".join(lines)


def judge(change: float, ci_low: float, ci_high: float, max_drop: float) -> str:
    """The gate rule on one benchmark (all values in points; change = model - base)."""
    if -change > max_drop:
        return "FAIL" if ci_high < 0 else "WARN"
    return "PASS"


def _worst(*statuses: str) -> str:
    """The row's status when several gates judge it: FAIL over WARN over PASS."""
    return next(s for s in ("FAIL", "WARN", "PASS") if s in statuses)


def check(
    model: Any,
    base: Any,
    tokenizer: Any = None,
    suite: list[str] | tuple[str, ...] = ("arc_easy", "piqa"),
    limit: int | None = 200,
    max_drop: float = 2.0,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    max_logprob_drop: float | None = None,
    confirm_run_unsafe_code: bool = False,
    allow_unisolated_code: bool = False,
) -> CheckResult:
    """Evaluate ``model`` and ``base`` (names, folders, or in-memory models with ``tokenizer``)
    on the same held-out items and judge every benchmark's paired change (accuracy, and the gold
    log-probability when ``max_logprob_drop`` is given, in nats). Models given by name load in
    ``dtype`` on ``device``; in-memory ones are evaluated where they are. A code task runs
    model-written programs only with the opt-ins of ``forgetless.eval.consent``."""
    from forgetless.devices import resolve_device, resolve_dtype
    from forgetless.eval import evaluate, load_spec
    from forgetless.eval.consent import require_code_consent

    if max_drop < 0:
        raise ForgetlessError("--max-drop must be >= 0 (points of accuracy)")
    if max_logprob_drop is not None and max_logprob_drop < 0:
        raise ForgetlessError("--max-logprob-drop must be >= 0 (nats of gold log-probability)")
    if not suite:
        raise ForgetlessError("--suite: give at least one benchmark")
    place = resolve_device(device)
    precision = resolve_dtype(dtype, place)
    specs = [load_spec(task) for task in suite]  # a bad task fails before any model loads
    require_code_consent(specs, confirm_run_unsafe_code, allow_unisolated_code)
    results = []
    for which in (base, model):
        loaded, tok = _load(which, tokenizer, precision, place)
        results.append(evaluate(loaded, tok, suite=specs, limit=limit, seed=seed,
                                batch_size=batch_size))
    return judge_results(*results, [spec.name for spec in specs], max_drop, max_logprob_drop)


def judge_results(before: Any, after: Any, tasks: list[str], max_drop: float,
                  max_logprob_drop: float | None = None) -> CheckResult:
    """The gate on two ``EvalResult``s of the same items (base first)."""
    from forgetless.eval import paired_difference

    outcome = CheckResult(max_drop=max_drop, max_logprob_drop=max_logprob_drop)
    for key in tasks:
        delta = paired_difference(before, after, key)
        change, low, high = (100 * x for x in (delta.value, delta.ci_low, delta.ci_high))
        logp = paired_difference(before, after, key, "gold_logprob")
        status = judge(change, low, high, max_drop)
        if max_logprob_drop is not None:
            status = _worst(status, judge(logp.value, logp.ci_low, logp.ci_high,
                                          max_logprob_drop))
        outcome.rows.append(CheckRow(
            key, 100 * before.metrics[before.score_key(key)].value,
            100 * after.metrics[after.score_key(key)].value,
            change, low, high, delta.n, status, logp.value, logp.ci_low, logp.ci_high,
        ))
    return outcome


def _load(which: Any, tokenizer: Any, dtype: Any, device: Any):
    if isinstance(which, str):
        from forgetless.models import load_model

        return load_model(which, dtype=dtype, device=device)
    if tokenizer is None:
        raise ForgetlessError("check(): pass tokenizer= with in-memory models")
    return which, tokenizer
