"""The report redraws from results.json alone: tables with CIs and significance, plots, HTML."""

import json
import math

import numpy as np
import pytest

from forgetless.report import main_table, pareto_front, versus_table, write_report


def _metric(value, half_width, n=100):
    low, high = value - half_width, value + half_width
    return {"value": value, "stderr": half_width / 1.96, "ci_low": low, "ci_high": high, "n": n,
            "significant": low > 0 or high < 0}


def _point(target_gain, heldout_change, kl):
    return {
        "heldout": {"arc_easy": {"acc": _metric(0.5 + heldout_change, 0.1),
                                 "delta": _metric(heldout_change, 0.03)}},
        "heldout_avg": {"acc": _metric(0.5 + heldout_change, 0.1),
                        "delta": _metric(heldout_change, 0.03)},
        "target": {"exact_match": _metric(0.1 + target_gain, 0.1),
                   "answer_nll": _metric(2.0, 0.1), "delta": _metric(target_gain, 0.05)},
        "drift": {"kl": _metric(kl, kl / 4), "top1_agreement": _metric(0.9, 0.01),
                  "number_mass": _metric(0.02 + kl, 0.001),
                  "number_mass_base": _metric(0.02, 0.001)},
    }


def _method(name, target_gain, heldout_change, kl, with_lambda=False):
    drift = {"by_type": {"q_proj": {"rel_l2": kl}, "mlp.up_proj": {"rel_l2": kl / 3}},
             "by_layer": {"0": {"rel_l2": kl}, "1": {"rel_l2": kl / 2}, "other": {"rel_l2": 0.0}},
             "total": {"rel_l2": kl}}
    return {
        "name": name, "method": name, "lambda": 1.0,
        "train_config": {"method": name, "data": "count_letters", "max_steps": 4,
                         "batch_size": 2, "seed": 0},
        "train": {"trainable_params": 1000, "total_params": 4000, "trainable_share": 0.25,
                  "optimizer_state_bytes": 8000, "train_seconds": 12.0, "steps": 4,
                  "first_loss": 2.0, "last_loss": 1.0,
                  "loss_history": [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3, 4)]},
        "param_drift": drift,
        "interpolation": [{"lambda": 0.5, **_point(target_gain / 2, heldout_change / 4, kl / 4)}]
        if with_lambda else [],
        **_point(target_gain, heldout_change, kl),
    }


def fake_results():
    base = _point(0.0, 0.0, 0.0)
    base.pop("drift")
    for part in (base["heldout"]["arc_easy"], base["heldout_avg"], base["target"]):
        part.pop("delta")
    return {
        "config": {"train": {"data": "count_letters", "max_steps": 4, "batch_size": 2}},
        "model": "tiny", "target": "count_letters", "suite": ["arc_easy"],
        "sample_sizes": {"arc_easy": 100, "count_letters": 100, "drift_prompts": 64},
        "base": {"name": "base", **base},
        "methods": [_method("full", 0.30, -0.08, 0.05, with_lambda=True),
                    _method("attn", 0.20, -0.01, 0.01)],
        "tracking": {"uri": "sqlite:///x/mlflow.db"},
    }


def test_table_marks_significant_changes_only():
    header, rows = main_table(fake_results())
    by_name = {row[0]: dict(zip(header, row)) for row in rows}
    assert set(by_name) == {"full", "full λ=0.5", "attn"}
    # full: -8 ± 3 pts excludes 0 -> starred; attn: -1 ± 3 pts does not.
    assert by_name["full"]["Δ arc_easy (pts)"] == "-8.0* [-11.0, -5.0]"
    assert by_name["attn"]["Δ arc_easy (pts)"] == "-1.0 [-4.0, +2.0]"
    assert by_name["full"]["Δ count_letters (pts)"].startswith("+30.0*")
    assert by_name["full"]["trainable params"] == "1.0 k (25.0%)"
    assert by_name["full λ=0.5"]["train time"] == "–"


def test_versus_table_pairs_later_methods_with_the_first():
    results = fake_results()
    assert versus_table(results) is None  # no pairing recorded: no table
    results["methods"][1]["vs_reference"] = {
        "reference": "full", "heldout_avg": _metric(0.07, 0.03),
        "heldout": {"arc_easy": _metric(0.07, 0.03)}, "target": _metric(-0.10, 0.2)}
    header, rows = versus_table(results)
    assert header == ["method − full", "Δ count_letters (pts)", "Δ held-out avg (pts)",
                      "Δ arc_easy (pts)"]
    assert rows == [["attn", "-10.0 [-30.0, +10.0]", "+7.0* [+4.0, +10.0]", "+7.0* [+4.0, +10.0]"]]


def test_pareto_front():
    points = [(0.0, 0.0), (-8.0, 30.0), (-1.0, 20.0), (-9.0, 10.0), (-1.0, 5.0)]
    assert pareto_front(points) == [0, 1, 2]


def test_report_redraws_from_results_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_results()))
    files = write_report(json.loads(path.read_text()), tmp_path / "report")
    for kind in ("markdown", "html", "plot_tradeoff", "plot_drift", "plot_loss"):
        assert files[kind].is_file(), kind
    for kind in ("plot_tradeoff", "plot_drift", "plot_loss"):
        assert files[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["markdown"].read_text()
    assert "arc_easy n=100" in md and "CI excludes 0" in md and "4 steps × batch 2" in md
    assert "| count_letters exact match % | 10.0 | [0.0, 20.0] | 100 |" in md
    html = files["html"].read_text()
    assert html.count("data:image/png;base64,") == 3 and (
        "<b>-8.0*</b><br><small>[-11.0, -5.0]</small>" in html)
    assert not any(name.endswith(".tmp") or name.startswith(".") for name in
                   (p.name for p in (tmp_path / "report").iterdir()))


def test_missing_cis_render_as_plain_values(tmp_path):
    results = fake_results()
    results["methods"][1]["heldout"]["arc_easy"]["delta"].update(ci_low=math.nan,
                                                                 ci_high=math.nan)
    header, rows = main_table(results)
    assert dict(zip(header, rows[-1]))["Δ arc_easy (pts)"] == "-1.0"
    write_report(results, tmp_path)  # a NaN CI must not break the plots


def _with_continuous(results, measure=None):
    """Add gold log-prob and margin changes (nats) to every held-out entry."""
    def add(item, scale):
        for part in (*item["heldout"].values(), item["heldout_avg"]):
            for name in ("gold_logprob", "margin"):
                part[name] = {"value": _metric(-1.0, 0.1),
                              "delta": _metric(scale, 0.01) if "delta" in part else None}

    add(results["base"], 0.0)
    for entry in results["methods"]:
        add(entry, entry["heldout"]["arc_easy"]["delta"]["value"])
        for point in entry["interpolation"]:
            add(point, point["heldout"]["arc_easy"]["delta"]["value"])
    if measure:
        results["config"]["report"] = {"forgetting_measure": measure}
    return results


def test_headline_measure_is_configurable():
    header, rows = main_table(_with_continuous(fake_results()))
    # accuracy leads (default); the continuous average sits beside it
    assert header[3:6] == ["Δ held-out avg (pts)", "Δ arc_easy (pts)",
                           "Δ held-out avg gold log-prob (nats)"]
    assert dict(zip(header, rows[0]))["Δ held-out avg gold log-prob (nats)"] == (
        "-0.080* [-0.090, -0.070]")
    header, rows = main_table(_with_continuous(fake_results(), "margin"))
    assert header[3:6] == ["Δ held-out avg margin (nats)", "Δ arc_easy margin (nats)",
                           "Δ held-out avg (pts)"]
    assert dict(zip(header, rows[-1]))["Δ arc_easy margin (nats)"] == "-0.010 [-0.020, +0.000]"
    assert main_table(fake_results())[0][5] == "KL drift (nats/tok)"  # old results: no extra
    old = fake_results()  # asked for a measure the results lack: accuracy leads, not "–"
    old["config"]["report"] = {"forgetting_measure": "gold_logprob"}
    assert main_table(old)[0][3] == "Δ held-out avg (pts)"


def test_report_and_summary_with_a_continuous_measure(tmp_path):
    from forgetless.report import _coords, summary_text

    results = _with_continuous(fake_results(), "gold_logprob")
    x, _, xerr, _ = _coords(results["methods"][0], "count_letters", "gold_logprob")
    assert x == -0.08 and np.allclose(xerr, [[0.01], [0.01]])  # nats, not points
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert "gold log-prob = log-probability of the right choice" in md
    assert "| held-out avg gold log-prob (nats) | -1.000 |" in md
    text = summary_text(results)
    assert text.splitlines()[0].startswith("method") and "attn" in text and "|" not in text


def test_coverage_plot_only_with_update_analytics(tmp_path):
    results = fake_results()
    files = write_report(results, tmp_path / "without")
    assert "plot_coverage" not in files
    for share, entry in zip((1.0, 0.1), results["methods"]):
        entry["train"]["updates"] = [
            {"step": s, "moved": share, "moved_ever": min(1.0, share * s), "rms": 1e-3,
             "drift": 1e-3 * s} for s in (1, 2, 4)]
    files = write_report(results, tmp_path / "with")
    assert files["plot_coverage"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Update coverage" in files["markdown"].read_text()


def test_two_level_bootstrap_widens_with_the_seed_spread():
    from forgetless.eval.stats import paired_bootstrap, two_level_bootstrap

    rng = np.random.default_rng(0)
    items = rng.normal(0.0, 1.0, 60)
    same = np.stack([items, items, items])  # three seeds that agree: only item noise
    spread = same + np.array([[-0.6], [0.0], [0.6]])  # same mean, seeds disagree
    only_items = paired_bootstrap(np.zeros(60), items)
    agree, disagree = two_level_bootstrap([same]), two_level_bootstrap([spread])
    assert agree.value == pytest.approx(items.mean()) == pytest.approx(disagree.value)
    width = lambda m: m.ci_high - m.ci_low  # noqa: E731
    assert width(agree) == pytest.approx(width(only_items), rel=0.15)
    assert width(disagree) > 1.5 * width(agree)  # the seed spread is in the CI
    assert two_level_bootstrap([same[:1]]).ci_low == pytest.approx(only_items.ci_low, abs=0.05)
    # the held-out average: the mean over tasks, one seed draw shared by every task
    both = two_level_bootstrap([spread, spread[:, :30]])
    assert both.value == pytest.approx((items.mean() + items[:30].mean()) / 2)
