"""Metric uncertainty: hand-computed standard errors, intervals and paired differences."""

import math

import pytest

from forgetless.errors import ForgetlessError
from forgetless.eval import EvalResult, Metric, paired_difference
from forgetless.eval.stats import (
    Z95,
    bootstrap_metric,
    combine_means,
    mean_metric,
    paired_bootstrap,
    proportion_metric,
)


def test_mean_metric_matches_hand_computation():
    m = mean_metric([1, 0, 1, 1])
    # mean 0.75, sample sd (ddof=1) = 0.5, SE = 0.5 / sqrt(4) = 0.25
    assert m.value == pytest.approx(0.75)
    assert m.stderr == pytest.approx(0.25)
    assert (m.ci_low, m.ci_high) == pytest.approx((0.75 - Z95 * 0.25, 0.75 + Z95 * 0.25))
    assert m.n == 4


def test_proportion_uses_wilson_interval_inside_unit_range():
    m = proportion_metric([1, 1, 1, 1])
    # Wilson with p = 1, n = 4: centre (1 + z²/8) / (1 + z²/4), half-width (z²/8)... by hand:
    z2 = Z95**2
    centre, half = (1 + z2 / 8) / (1 + z2 / 4), Z95 * math.sqrt(z2 / 64) / (1 + z2 / 4)
    assert m.value == 1.0 and m.ci_high == pytest.approx(1.0)
    assert m.ci_low == pytest.approx(centre - half) and 0.0 < m.ci_low < 1.0
    assert proportion_metric([0, 1]).ci_low >= 0.0


def test_single_value_has_no_stderr_and_empty_is_nan():
    assert math.isnan(mean_metric([1.0]).stderr)
    assert mean_metric([]).n == 0 and math.isnan(mean_metric([]).value)


def test_combine_means_adds_stderrs_in_quadrature():
    a, b = Metric(0.6, 0.03, 0, 0, 100), Metric(0.4, 0.04, 0, 0, 100)
    m = combine_means([a, b])
    assert m.value == pytest.approx(0.5)
    assert m.stderr == pytest.approx(0.05 / 2)  # sqrt(0.03^2 + 0.04^2) / 2
    assert m.n == 200


def test_bootstrap_ratio_value_and_interval_contains_it():
    totals, counts = [2.0, 4.0, 6.0, 8.0], [1, 2, 3, 4]
    m = bootstrap_metric([totals, counts], lambda t, c: t.sum() / c.sum())
    assert m.value == pytest.approx(2.0)
    assert m.stderr == pytest.approx(0.0)  # every item has ratio 2: resampling cannot move it
    assert m.ci_low == pytest.approx(2.0) and m.ci_high == pytest.approx(2.0)


def test_paired_bootstrap_hand_values():
    before, after = [1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 0]
    m = paired_bootstrap(before, after)
    # differences 0,-1,0,0,0,-1: mean -1/3, sd (ddof=1) = sqrt(0.2667), SE = sd / sqrt(6)
    assert m.value == pytest.approx(-1 / 3)
    assert m.stderr == pytest.approx(math.sqrt((4 * (1 / 3) ** 2 + 2 * (2 / 3) ** 2) / 5 / 6))
    assert m.ci_low <= m.value <= m.ci_high and m.ci_high <= 0.0


def _result(task, rows):
    return EvalResult(per_item={task: [{"id": i, "correct": c} for i, c in rows]})


def test_paired_difference_uses_only_shared_ids():
    before = _result("arc", [("a", 1), ("b", 1), ("c", 0)])
    after = _result("arc", [("b", 0), ("c", 0), ("d", 1)])
    m = paired_difference(before, after, "arc")
    assert m.n == 2 and m.value == pytest.approx(-0.5)


def test_paired_difference_errors_are_forgetless_errors():
    with pytest.raises(ForgetlessError, match="missing"):
        paired_difference(_result("arc", [("a", 1)]), _result("piqa", [("a", 1)]), "arc")
    with pytest.raises(ForgetlessError, match="share no"):
        paired_difference(_result("arc", [("a", 1)]), _result("arc", [("b", 1)]), "arc")
