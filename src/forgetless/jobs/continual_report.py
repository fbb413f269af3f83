"""``forgetless continual``'s numbers and report: the accuracy matrix R, its summary numbers
(ACC, BWT, FWT, forgetting), the held-out trajectory, ``continual.md`` and its plots.

A stage is anything with ``name`` and ``target`` (``forgetless.continual.Stage``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgetless.errors import ForgetlessError
from forgetless.eval import paired_difference
from forgetless.eval.stats import combine_means
from forgetless.eval.targets import get_target
from forgetless.io import atomic_write_text
from forgetless.report import ci_cell, md_table
from forgetless.verdict import continual_verdict

# --- the accuracy matrix and its summary numbers ----------------------------------------------


def continual_metrics(matrix: list[list[float]]) -> dict[str, float]:
    """ACC, BWT, FWT and forgetting from R (rows: base then stages 1..T; columns: tasks)."""
    rows = len(matrix) - 1
    if rows < 2 or any(len(row) != rows for row in matrix):
        raise ForgetlessError("the accuracy matrix must be (T+1) x T with T >= 2")
    last = matrix[rows]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "acc": mean(last),
        "bwt": mean([last[j] - matrix[j + 1][j] for j in range(rows - 1)]),
        "fwt": mean([matrix[j][j] - matrix[0][j] for j in range(1, rows)]),
        "forgetting": mean([max(matrix[i][j] for i in range(1, rows)) - last[j]
                            for j in range(rows - 1)]),
    }


def score_row(result, stages: list[Any], metric: str = "exact_match") -> list[float]:
    return [result.metrics[f"{_target_key(s.target)}/{metric}"].value for s in stages]


def _target_key(target: str) -> str:
    return get_target(target).name


# Paired held-out changes vs the base per stage: measure -> per-item field of the eval records.
HELDOUT_CHANGES = {"accuracy": "correct", "gold_logprob": "gold_logprob", "margin": "margin"}


def heldout_change(base, result, suite: list[str], field: str) -> dict[str, Any] | None:
    """``result - base`` on the held-out suite, paired per item and averaged over tasks (SEs in
    quadrature), or None when a result predates the field (measured before METRICS_VERSION 3)."""
    tasks = [t for t in suite if t in base.per_item and t in result.per_item]
    if not tasks or any(field not in r for t in tasks
                        for r in (*base.per_item[t], *result.per_item[t])):
        return None
    return combine_means([paired_difference(base, result, t, field) for t in tasks]).to_dict()


def summarize(base, per_method: dict[str, list], stages: list[Any],
              suite: list[str] | None = None) -> dict[str, Any]:
    """Everything the report needs, as plain JSON: R, its summary numbers, trajectories."""
    methods = {}
    base_row = score_row(base, stages)
    for name, results in per_method.items():
        matrix = [base_row] + [score_row(r, stages) for r in results]
        trajectory = {}
        for key in ("heldout/acc", "drift/kl", "drift/number_mass"):
            trajectory[key] = [(r.metrics[key].value if key in r.metrics else None)
                               for r in [base, *results]]
        trajectory["drift/kl"][0] = 0.0 if results and "drift/kl" in results[0].metrics else None
        if results and "drift/number_mass_base" in results[0].metrics:
            trajectory["drift/number_mass"][0] = results[0].metrics["drift/number_mass_base"].value
        nll = [score_row(r, stages, "answer_nll") for r in [base, *results]]
        methods[name] = {"R": matrix, **continual_metrics(matrix), "answer_nll": nll,
                         "trajectory": trajectory,
                         "heldout_stderr": [r.metrics["heldout/acc"].stderr
                                            for r in [base, *results]
                                            if "heldout/acc" in r.metrics],
                         "train": [r.provenance.get("train") for r in results],
                         "heldout_change": {
                             measure: [heldout_change(base, r, suite or [], field)
                                       for r in results]
                             for measure, field in HELDOUT_CHANGES.items()}}
    return {"tasks": [s.name for s in stages], "targets": [s.target for s in stages],
            "methods": methods}


# --- report -----------------------------------------------------------------------------------


def write_report(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    """``continual.md``, one R heat-map per method and the held-out curve across stages."""
    import matplotlib  # seconds to import: only a report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, files = summary["tasks"], {}
    rows_label = ["base"] + [f"after {i}: {t}" for i, t in enumerate(tasks, start=1)]
    for name, data in summary["methods"].items():
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 1.2 + 0.6 * len(rows_label)))
        image = ax.imshow(data["R"], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(data["R"]):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                        color="white" if value < 0.5 else "black", fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        ax.set_yticks(range(len(rows_label)), rows_label)
        ax.set_title(f"{name}: R[i][j] (exact match)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        files[f"heatmap_{name}"] = out / f"R_{name}.png"
        fig.savefig(files[f"heatmap_{name}"], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, data in summary["methods"].items():
        ax.plot(range(len(rows_label)), data["trajectory"]["heldout/acc"], marker="o", label=name)
    ax.set_xticks(range(len(rows_label)), ["base"] + [f"{i}: {t}" for i, t in
                                                      enumerate(tasks, start=1)])
    ax.set_ylabel("held-out accuracy")
    ax.set_title("held-out accuracy across stages")
    ax.legend()
    fig.tight_layout()
    files["heldout"] = out / "heldout_curve.png"
    fig.savefig(files["heldout"], dpi=110)
    plt.close(fig)

    lines = [f"# Continual run: {' → '.join(tasks)}", "",
             *[part for line in continual_verdict(summary) for part in (line, "")]]
    header = ["method", "ACC", "BWT", "FWT", "forgetting", "held-out per stage"]
    body = [[name, f"{d['acc']:.3f}", f"{d['bwt']:+.3f}", f"{d['fwt']:+.3f}",
             f"{d['forgetting']:.3f}",
             " → ".join(f"{v:.3f}" for v in d["trajectory"]["heldout/acc"] if v is not None)]
            for name, d in summary["methods"].items()]
    lines += [md_table(header, body), "", f"![held-out curve]({files['heldout'].name})", ""]
    lines += ["Held-out change vs the base after each stage, paired per item (suite mean, 95% "
              "CI): accuracy in points; gold log-prob (the right choice's log-probability among "
              "the choices) and margin (over the best wrong choice) in nats. `–`: measured "
              "before these were recorded.", "",
              md_table(["method", "measure", *[f"after {i}" for i in range(1, len(tasks) + 1)]],
                       change_rows(summary)), ""]
    for name, data in summary["methods"].items():
        lines += [f"## {name}: R[i][j] = exact match on task j after stage i", ""]
        rows = [[label, *(f"{v:.3f}" for v in row)] for label, row in zip(rows_label, data["R"])]
        kl = data["trajectory"]["drift/kl"]
        nll = [[label, *(f"{v:.3f}" for v in row)]
               for label, row in zip(rows_label, data["answer_nll"])]
        lines += [md_table(["after", *tasks], rows), "",
                  "Answer NLL per reference token (lower = learned; rises = forgetting):", "",
                  md_table(["after", *tasks], nll), "",
                  "drift/kl per stage: " + ", ".join("–" if v is None else f"{v:.3f}" for v in kl),
                  "", f"![R {name}]({files[f'heatmap_{name}'].name})", ""]
    files["markdown"] = out / "continual.md"
    atomic_write_text(files["markdown"], "\n".join(lines))
    return files


def change_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per method and held-out measure: the paired change after every stage."""
    def cell(change: dict | None, scale: float, digits: int) -> str:
        if change is None:
            return "–"
        return ci_cell({**change, "significant": change["ci_low"] > 0 or change["ci_high"] < 0},
                       scale, digits)

    rows = []
    for name, data in summary["methods"].items():
        for measure, changes in (data.get("heldout_change") or {}).items():
            scale, digits, unit = (100.0, 1, "pts") if measure == "accuracy" else (1.0, 3, "nats")
            rows.append([name, f"{measure} ({unit})", *(cell(c, scale, digits) for c in changes)])
    return rows
