"""The verdict a report leads with, on synthetic results: who learned, who forgot significantly,
the best trade-off at equal learning, and the CI caveat when nothing is significant."""

from __future__ import annotations

import copy

from forgetless.verdict import Row, compare_verdict, continual_verdict, pareto_front, tune_verdict
from test_report import _metric, _with_continuous, fake_results


def _set(results, name, learn, forget, half=0.03):
    entry = next(e for e in results["methods"] if e["name"] == name)
    entry["target"]["delta"] = _metric(learn, 0.05)
    entry["heldout_avg"]["delta"] = _metric(forget, half)
    return results


def test_significant_forgetting_and_the_trade_off():
    results = _set(_set(fake_results(), "full", 0.30, -0.08), "attn", 0.28, -0.01)
    first, second, third = compare_verdict(results, "accuracy")
    assert first.startswith("Learned the target (count_letters exact match")
    assert "full +30.0 [+25.0, +35.0] pts" in first and "attn +28.0" in first
    assert second.startswith("Forgot significantly (held-out accuracy")
    assert "full -8.0 [-11.0, -5.0] pts" in second and "attn" not in second
    # attn learned as much (CIs overlap) and forgot least: the best trade-off
    assert third.startswith("Best trade-off: attn (held-out accuracy -1.0 [-4.0, +2.0] pts")
    assert "as much as the top learner full's +30.0 pts" in third
    assert third.endswith("Pareto front of learning vs forgetting: full, attn.")


def test_nothing_significant_gives_the_ci_caveat():
    results = _set(_set(fake_results(), "full", 0.30, -0.02), "attn", 0.28, -0.01)
    lines = compare_verdict(results, "accuracy")
    assert not any(line.startswith("Forgot significantly") for line in lines)
    caveat = next(line for line in lines if line.startswith("No method forgot significantly"))
    assert "95% CI that includes 0" in caveat and "±3.0 pts" in caveat
    assert "more items or seeds" in caveat
    assert "no difference in forgetting is significant" in lines[-1]


def test_a_method_that_did_not_learn_is_no_trade_off():
    # attn forgets nothing but learned nothing: full is the only learner, hence the trade-off
    results = _set(_set(fake_results(), "full", 0.30, -0.08), "attn", 0.01, 0.0)
    lines = compare_verdict(results, "accuracy")
    assert "attn" not in lines[0]
    assert lines[-1].startswith("Best trade-off: full")
    assert "Pareto front of learning vs forgetting: full, attn." in lines[-1]
    # learning that is smaller beyond its CI is not "equal learning"
    results = _set(_set(fake_results(), "full", 0.50, -0.08), "attn", 0.20, -0.01)
    assert compare_verdict(results, "accuracy")[-1].startswith("Best trade-off: full")
    results = _set(_set(fake_results(), "full", 0.0, -0.08), "attn", 0.01, 0.0)
    lines = compare_verdict(results, "accuracy")
    assert lines[0].startswith("No method learned the target significantly")
    assert lines[-1].startswith("Best trade-off: none")


def test_the_report_measure_and_the_report_files(tmp_path):
    from forgetless.report import write_report

    results = _with_continuous(fake_results(), "gold_logprob")
    lines = compare_verdict(results, "gold_logprob")
    assert "held-out gold log-prob" in lines[1] and "-0.080 [-0.090, -0.070] nats" in lines[1]
    files = write_report(results, tmp_path)
    md = files["markdown"].read_text().splitlines()
    assert md[0].startswith("# forgetless compare") and md[2] == lines[0] and md[4] == lines[1]
    html = files["html"].read_text()
    after_title = html.split("</h1>", 1)[1]
    assert after_title.startswith("<p class='verdict'>Learned the target")


def test_pareto_front():
    points = {"base": (0.0, 0.0), "a": (-8.0, 30.0), "b": (-1.0, 20.0), "c": (-9.0, 10.0)}
    assert pareto_front(points) == ["base", "a", "b"]


def _continual_summary(last_full, last_attn):
    def data(acc, bwt, change):
        return {"acc": acc, "bwt": bwt, "fwt": 0.0, "forgetting": -bwt,
                "heldout_change": {"accuracy": [None, None],
                                   "gold_logprob": [_metric(change / 2, 0.02),
                                                    _metric(change, 0.02)]}}
    return {"tasks": ["a", "b"], "methods": {"full": data(0.60, -0.20, last_full),
                                             "attn": data(0.59, -0.05, last_attn)}}


def test_continual_verdict():
    lines = continual_verdict(_continual_summary(-0.10, -0.01))
    assert lines[0] == ("Final average score over the tasks (ACC, exact match, one run: no CI): "
                        "full 0.600, attn 0.590.")
    assert "full -0.200, attn -0.050" in lines[1]
    assert lines[2].startswith("Forgot held-out ability significantly after the last stage "
                               "(gold log-prob") and "attn" not in lines[2]
    assert lines[3].startswith("Best trade-off: attn (ACC 0.590")
    lines = continual_verdict(_continual_summary(-0.01, 0.0))
    assert lines[2].startswith("No method's held-out gold log-prob changed significantly")


def test_tune_verdict_counts_seeds():
    def test_row(name, seed, learn, forget):
        summary = {"target": {"delta": _metric(learn, 0.05)},
                   "heldout_avg": {"delta": _metric(0.0, 0.03),
                                   "gold_logprob": {"delta": _metric(forget, 0.02)}}}
        return {"name": name, "seed": seed, "summary": summary}

    results = {"target": "largest_number",
               "test": [test_row("recommended", 0, 0.4, -0.01),
                        test_row("recommended", 1, 0.3, 0.0),
                        test_row("full", 0, 0.4, -0.10), test_row("full", 1, 0.02, -0.01)]}
    lines = tune_verdict(results)
    assert "in every seed" in lines[0] and "recommended seeds +40.0" in lines[0]
    assert "full" not in lines[0]  # seed 1 did not learn significantly
    assert lines[1].startswith("Forgot significantly (held-out gold log-prob")
    assert "full" in lines[1]
    assert lines[2].startswith("Best trade-off: recommended")


def test_rows_keep_their_input():
    row = Row("x", [_metric(0.1, 0.05)], [_metric(-0.1, 0.01)])
    before = copy.deepcopy(row)
    from forgetless.verdict import verdict

    verdict([row], "t exact match", "accuracy")
    assert row == before


def test_compare_and_continual_print_the_verdict_first(monkeypatch, capsys, tmp_path):
    """The terminal says what was found before the table (jobs replaced by their results)."""
    import sys

    from forgetless.cli import main
    from forgetless.compare import CompareResult

    results = _set(_set(fake_results(), "full", 0.30, -0.08), "attn", 0.28, -0.01)
    results.update(compare_seconds=1.0, compare_cpu_seconds=1.0)
    monkeypatch.setattr("forgetless.compare.compare",
                        lambda *a, **k: CompareResult(tmp_path, results, {}))
    summary = {**_continual_summary(-0.10, -0.01), "seconds": 1.0,
               "files": {"markdown": str(tmp_path / "continual.md")}}
    monkeypatch.setattr("forgetless.continual.continual", lambda *a, **k: summary)
    for argv, first in ((["compare", "x.yaml"], compare_verdict(results, "accuracy")[0]),
                        (["continual"], continual_verdict(summary)[0])):
        monkeypatch.setattr(sys, "argv", ["forgetless", *argv])
        main()
        out = capsys.readouterr().out.splitlines()
        assert out[0].endswith(first), out[:2]
