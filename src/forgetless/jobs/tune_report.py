"""``forgetless tune``'s report: ``tune.md``, ``tune.html`` and the Pareto plot of the trials,
drawn from the results alone (tables, CI cells and the page come from ``forgetless.report``)."""

from __future__ import annotations

import os
from pathlib import Path

from forgetless import __version__
from forgetless.io import atomic_write_text
from forgetless.jobs.tune_space import Budget
from forgetless.jobs.tune_study import within_budget
from forgetless.report import html_page, html_table, md_table, pareto_front, pts_cell
from forgetless.verdict import tune_verdict


def plot_front(trials: list[dict], best: dict | None, path: Path, budget: Budget) -> None:
    """Target gain vs held-out drop over every complete trial, the Pareto front joined."""
    import matplotlib  # seconds to import: only a report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t["scores"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if done:
        xs = [t["scores"]["heldout_drop"] for t in done]
        ys = [t["scores"]["target"] - t["scores"]["target_base"] for t in done]
        inside = [within_budget(t) for t in done]
        ax.scatter([x for x, i in zip(xs, inside) if i], [y for y, i in zip(ys, inside) if i],
                   c="tab:blue", label="within budget")
        ax.scatter([x for x, i in zip(xs, inside) if not i],
                   [y for y, i in zip(ys, inside) if not i], c="tab:gray", marker="x",
                   label="over budget")
        front = sorted(pareto_front([(-x, y) for x, y in zip(xs, ys)]), key=lambda i: xs[i])
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", c="tab:orange",
                label="Pareto front")
        for t, x, y in zip(done, xs, ys):
            ax.annotate(f"{t['number']}:{t['recipe']['method']}", (x, y), fontsize=7)
        if best:
            ax.scatter([best["scores"]["heldout_drop"]],
                       [best["scores"]["target"] - best["scores"]["target_base"]],
                       s=160, facecolors="none", edgecolors="tab:red", label="recommended")
    if budget.max_heldout_drop is not None:
        ax.axvline(budget.max_heldout_drop, c="tab:red", lw=0.8, label="held-out budget")
    ax.set_xlabel("held-out accuracy drop (points, validation sample)")
    ax.set_ylabel("target gain (validation sample)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp_plot")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def recipe_text(recipe: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in recipe.items())


def write_report(results: dict, out: Path) -> dict[str, Path]:
    """The report files of a finished tune (``results``: what ``tune.json`` holds)."""
    trials, best, target = results["trials"], results["best"], results["target"]
    counts = results["counts"]
    objective = results["config"]["objective"]
    settings = [
        f"model `{results['model']}`, target `{target}` ({objective}), held-out "
        f"{', '.join(results['config']['eval']['suite'])}",
        f"budget: {recipe_text({k: v for k, v in results['config']['budget'].items() if v is not None}) or 'none'}",  # noqa: E501
        f"trials: {counts['total']} run ({counts['complete']} complete, {counts['pruned']} "
        f"pruned, {counts['failed']} failed, {counts['interrupted']} interrupted and retried); "
        f"search {results['search_seconds']:.0f} s, test phase {results['test_seconds']:.0f} s",
        f"validation sample: {results['samples']['validation']}; test sample (disjoint): "
        f"{results['samples']['test']}; test seeds {results['config']['test']['seeds']}",
    ]
    header = ["trial", "state", "recipe", "target", "Δ held-out (pts)", "KL", "s"]
    rows = []
    for t in trials:
        s = t["scores"] or {}
        rows.append([str(t["number"]), t["state"] + (" *" if best and t["number"] ==
                                                      best["number"] else ""),
                     recipe_text(t["recipe"]),
                     f"{s['target']:.3f}" if s else "–",
                     f"{-s['heldout_drop']:+.1f}" if s else "–",
                     f"{s['kl']:.4f}" if s else (t["pruned"] or "")[:60],
                     f"{t['seconds']:.0f}" if t["seconds"] else ""])
    test_header = ["recipe", "seed", f"Δ {target} exact match (pts)", "Δ held-out acc (pts)",
                   "Δ held-out gold log-prob (nats)", "KL", "s"]
    test_rows = []
    for r in results["test"]:
        summary = r["summary"]
        avg = summary["heldout_avg"]
        gold = avg.get("gold_logprob", {}).get("delta")
        test_rows.append([r["name"], str(r["seed"]), pts_cell(summary["target"]["delta"]),
                          pts_cell(avg["delta"]),
                          f"{gold['value']:+.3f} [{gold['ci_low']:+.3f}, {gold['ci_high']:+.3f}]"
                          if gold else "–",
                          f"{summary['drift']['kl']['value']:.4f}"
                          if "kl" in summary["drift"] else "–", f"{r['seconds']:.0f}"])
    for name, mean in results["test_means"].items():
        test_rows.append([f"{name} (mean)", "", f"{mean['target']:+.1f}",
                          f"{mean['heldout']:+.1f}", f"{mean['gold_logprob']:+.3f}", "", ""])
    if best:
        headline = (f"Recommended (trial {best['number']}): `{recipe_text(best['recipe'])}`; "
                    "`forgetless train best.yaml` trains it.")
    else:
        headline = "No trial met the budget: nothing is recommended (widen the space or budget)."
    verdict = tune_verdict(results)  # the test phase's findings, in words
    md = [f"# forgetless tune: {target}", "", headline, "",
          *[part for line in verdict for part in (line, "")],
          *[f"- {line}" for line in settings], "",
          "## Test sample (retrained per seed; paired 95% CIs vs the base; * CI excludes 0)", "",
          md_table(test_header, test_rows), "",
          "## Trials (validation sample)", "", md_table(header, rows), "",
          "![Pareto front](pareto.png)", "",
          f"Optuna store: `optuna.db` (study `tune`); MLflow: `{results['tracking_uri']}`.", ""]
    files = {"markdown": out / "tune.md", "html": out / "tune.html", "plot": out / "pareto.png"}
    plot_front(trials, best, files["plot"], Budget(**results["config"]["budget"]))
    atomic_write_text(files["markdown"], "\n".join(md))
    tables = ("<h2>Test sample</h2>" + html_table(test_header, test_rows)
              + "<h2>Trials (validation sample)</h2>" + html_table(header, rows))
    atomic_write_text(files["html"], html_page(f"forgetless tune: {target}", settings, tables,
                                           {"plot": files["plot"]},
                                           {"plot": "Target gain vs held-out drop"},
                                           f"forgetless {__version__}, {results['created']}",
                                           verdict=[headline, *verdict]))
    return files


def mean_over_seeds(tests: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in tests):
        rows = [r["summary"] for r in tests if r["name"] == name]
        gold = [s["heldout_avg"].get("gold_logprob", {}).get("delta") for s in rows]
        out[name] = {
            "target": 100 * sum(s["target"]["delta"]["value"] for s in rows) / len(rows),
            "heldout": 100 * sum(s["heldout_avg"]["delta"]["value"] for s in rows) / len(rows),
            "gold_logprob": sum(g["value"] for g in gold if g) / max(1, len(rows)),
        }
    return out
