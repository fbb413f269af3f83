"""Ecosystem names: code execution is ``pass@1`` (lm-eval's name), results saved as ``acc``
before the rename still read (as pass@1, without re-evaluation), and a suite average's interval
is built from its tasks' own intervals (one method per table, named beside each)."""

from __future__ import annotations

import json
import math

import pytest

from forgetless.eval import EvalResult
from forgetless.eval.result import METRICS_VERSION, ci_method
from forgetless.eval.stats import combine_intervals, mean_metric, proportion_metric


def _old_code_result() -> dict:
    """An eval.json as METRICS_VERSION 4 wrote it before the rename: humaneval's score as acc."""
    wilson = proportion_metric([0, 0, 0]).to_dict()
    records = [{"id": f"HumanEval/{i}", "pred": 1, "gold": 0, "correct": 0, "gold_logprob": -1.0,
                "gold_logprob_sum": -9.0, "tokens": 9, "output": "", "timed_out": False,
                "returncode": 1, "isolation": ["network", "pid"]} for i in range(3)]
    arc = [{"id": str(i), "pred": 0, "gold": 0, "correct": 1, "gold_logprob": -0.5,
            "margin": 0.1} for i in range(3)]
    return {"metrics": {"humaneval/acc": wilson, "arc_easy/acc": proportion_metric([1, 1, 1])
                        .to_dict(), "heldout/acc": wilson},
            "per_item": {"humaneval": records, "arc_easy": arc},
            "provenance": {"metrics_version": 4}}


def test_old_results_with_acc_read_as_pass_at_1(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(_old_code_result()))
    result = EvalResult.load(path)
    assert "humaneval/pass@1" in result.metrics and "humaneval/acc" not in result.metrics
    assert list(result.metrics)[0] == "humaneval/pass@1"  # in place: tables keep their order
    assert result.score_key("humaneval") == "humaneval/pass@1"
    assert result.score_key("arc_easy") == "arc_easy/acc"  # multiple choice keeps acc
    assert "arc_easy/acc" in result.metrics and "heldout/acc" in result.metrics
    # a rename at load time, not a new metric set: old run folders are reused, not re-evaluated
    assert METRICS_VERSION == 4


def test_report_summary_reads_old_and_new_code_results(tmp_path):
    from forgetless.report import base_table, summarize

    old = EvalResult.from_dict(_old_code_result())
    summary = summarize(old, old, ["humaneval", "arc_easy"], None)
    assert summary["heldout"]["humaneval"]["score"] == "pass@1"
    assert summary["heldout"]["arc_easy"]["score"] == "acc"
    assert summary["heldout"]["humaneval"]["delta"]["value"] == 0.0
    results = {"suite": ["humaneval", "arc_easy"], "target": None,
               "base": summarize(old, None, ["humaneval", "arc_easy"], None)}
    labels = [row[0] for row in base_table(results)[1]]
    assert labels[:2] == ["humaneval pass@1 %", "arc_easy acc %"]
    del results["base"]["heldout"]["humaneval"]["score"]  # a results.json from before
    assert base_table(results)[1][0][0] == "humaneval acc %"


def test_suite_average_keeps_its_tasks_interval_method():
    none_passed = proportion_metric([0] * 20)  # Wilson: [0, 0.16], not [0, 0]
    alone = combine_intervals([none_passed])
    assert (alone.ci_low, alone.ci_high) == (none_passed.ci_low, none_passed.ci_high)
    assert alone.ci_high > 0.15
    half = proportion_metric([1] * 10 + [0] * 10)
    both = combine_intervals([none_passed, half])
    assert both.value == pytest.approx(0.25)
    below = math.hypot(none_passed.value - none_passed.ci_low, half.value - half.ci_low) / 2
    assert both.ci_low == pytest.approx(0.25 - below) and both.ci_high > both.value
    # normal per-task intervals pool to the normal interval of the pooled SE
    a, b = mean_metric([1.0, 2.0, 4.0]), mean_metric([0.0, -1.0, 3.0, 5.0])
    pooled = combine_intervals([a, b])
    assert pooled.ci_high - pooled.value == pytest.approx(1.959963984540054 * pooled.stderr)


def test_eval_table_names_each_interval_method():
    result = EvalResult.from_dict(_old_code_result())
    result.metrics["humaneval/gold_logprob"] = mean_metric([-1.0, -2.0])
    result.metrics["t/answer_nll"] = mean_metric([1.0, 2.0])
    lines = result.table().splitlines()
    assert "CI method" in lines[0]
    methods = {line.split()[0]: line for line in lines[1:]}
    assert "Wilson" in methods["humaneval/pass@1"] and "Wilson" in methods["arc_easy/acc"]
    assert "Wilson, pooled" in methods["heldout/acc"]
    assert "normal" in methods["humaneval/gold_logprob"]
    assert ci_method("t/answer_nll") == "bootstrap" and ci_method("drift/kl") == "normal"
