"""The compare report: ``results.json`` → tables (Markdown + one self-contained HTML) and plots.

``build_results`` condenses the per-run eval files into the summary a reader needs (changes vs
the base with paired 95% CIs, drift, cost); ``write_report`` draws everything from that summary
alone, so a report can be redrawn later from ``results.json`` without models or eval files.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
from pathlib import Path
from typing import Any

from forgetless.eval import EvalResult, load_spec, paired_difference
from forgetless.eval.stats import combine_means
from forgetless.io import atomic_write_text
from forgetless.pooling import flagged, pool_summary, target_nll_delta
from forgetless.verdict import compare_verdict

PLOTS = {
    "tradeoff": "learning_vs_forgetting.png",
    "drift": "drift_heatmap.png",
    "loss": "loss_curves.png",
    "coverage": "update_coverage.png",
}
# Held-out forgetting measures a report can lead with (``report.forgetting_measure``):
# accuracy in points, or the continuous per-item twins from ``forgetless.eval`` in nats.
MEASURES = ("accuracy", "gold_logprob", "margin")
CONTINUOUS = ("gold_logprob", "margin")
_LABEL = {"accuracy": "acc", "gold_logprob": "gold log-prob", "margin": "margin"}
_UNIT = {"accuracy": "pts", "gold_logprob": "nats", "margin": "nats"}


def forgetting_measure(results: dict) -> str:
    """The measure the headline table and the Pareto plot use: ``accuracy`` for old results,
    and when the continuous one asked for was not recorded (measured before METRICS_VERSION 3:
    the default ``gold_logprob`` would leave the headline empty)."""
    measure = ((results.get("config") or {}).get("report") or {}).get("forgetting_measure")
    if measure not in MEASURES:
        return "accuracy"
    if measure != "accuracy" and not any(heldout_delta(e, measure)
                                         for e in results.get("methods") or []):
        return "accuracy"
    return measure


def heldout_delta(item: dict, measure: str, task: str | None = None) -> dict | None:
    """An entry's paired held-out change in ``measure`` on ``task`` (None: the suite average)."""
    part = item["heldout"].get(task) if task else item.get("heldout_avg")
    if not part:
        return None
    if measure == "accuracy":
        return part.get("delta")
    return (part.get(measure) or {}).get("delta")


# --- results.json ---------------------------------------------------------------------------


def _metric(metric) -> dict[str, Any]:

    return flagged(metric)


def summarize(result, base, suite: list[str], target: str | None) -> dict[str, Any]:
    """One evaluated model vs the base: per-task accuracy and paired change, drift."""

    out: dict[str, Any] = {"heldout": {}, "target": None, "drift": {}, "param_drift": None}
    deltas: dict[str, list] = {measure: [] for measure in MEASURES}
    for task in suite:
        delta = paired_difference(base, result, task) if base is not None else None
        score = result.score_key(task)  # "acc" keeps its key: results.json stays readable
        out["heldout"][task] = {"acc": result.metrics[score].to_dict(),
                                "score": score.rpartition("/")[2],  # acc, or pass@1 for code
                                "delta": _metric(delta) if delta else None}
        if delta:
            deltas["accuracy"].append(delta)
        for measure in CONTINUOUS:  # absent from results measured before METRICS_VERSION 3
            if f"{task}/{measure}" not in result.metrics:
                continue
            delta = paired_difference(base, result, task, measure) if base is not None else None
            out["heldout"][task][measure] = {
                "value": result.metrics[f"{task}/{measure}"].to_dict(),
                "delta": _metric(delta) if delta else None}
            if delta:
                deltas[measure].append(delta)
    if "heldout/acc" in result.metrics:
        out["heldout_avg"] = {"acc": result.metrics["heldout/acc"].to_dict(),
                              "delta": _metric(combine_means(deltas["accuracy"]))
                              if deltas["accuracy"] else None}
        for measure in CONTINUOUS:
            if f"heldout/{measure}" in result.metrics:
                out["heldout_avg"][measure] = {
                    "value": result.metrics[f"heldout/{measure}"].to_dict(),
                    "delta": _metric(combine_means(deltas[measure])) if deltas[measure] else None}
    if target:

        delta = paired_difference(base, result, target) if base is not None else None
        out["target"] = {
            "exact_match": result.metrics[f"{target}/exact_match"].to_dict(),
            "answer_nll": result.metrics[f"{target}/answer_nll"].to_dict(),
            "delta": _metric(delta) if delta else None,
            # paired per item, nats per answer token: moves before an answer flips
            "nll_delta": target_nll_delta(base, result, target) if base is not None else None,
        }
    for key in ("kl", "top1_agreement", "number_mass", "number_mass_base", "number_mass_change"):
        if f"drift/{key}" in result.metrics:
            out["drift"][key] = result.metrics[f"drift/{key}"].to_dict()
    if result.param_drift:
        out["param_drift"] = {k: result.param_drift[k] for k in ("by_layer", "by_type", "total")}
    return out


def build_results(config: dict, out: Path, base: dict, methods: list[dict], plan: list,
                  target: str | None, tracking: dict) -> dict[str, Any]:
    """Everything the report shows, as plain JSON (no models, no per-item records).

    ``methods`` are the finished records and ``plan`` their ``(name, train config)`` pairs, in
    the same order; a name planned with several seeds becomes one entry pooling them
    (``forgetless.pooling``) with its per-seed summaries under ``seeds``."""

    base_eval = EvalResult.load(out / "base" / base["eval_file"])
    # results are keyed by the task's name; the config may give a task as a .yaml path
    suite = [load_spec(task).name for task in config["eval"]["suite"]]
    groups: dict[str, list] = {}
    for record, (name, train_config) in zip(methods, plan):
        folder = Path(train_config["output_dir"])  # runs/<name>[/seed<k>] under ``out``
        groups.setdefault(name, []).append((record, train_config, folder))
    entries, reference, drift_n = [], None, None
    for name, runs in groups.items():
        tuned = [EvalResult.load(folder / record["eval_file"]) for record, _, folder in runs]
        per_seed = [_entry(record, train_config, folder, result, base_eval, suite, target)
                    for (record, train_config, folder), result in zip(runs, tuned)]
        if reference is not None:
            for one, result, ref in zip(per_seed, tuned, reference[1]):
                one["vs_reference"] = _versus(reference[0], result, ref, suite, target)
        # prompts per run (a pooled entry's KL ``n`` counts seeds)
        drift_n = drift_n or next((one["drift"]["kl"]["n"] for one in per_seed
                                   if "kl" in one["drift"]), None)
        entry = per_seed[0] if len(per_seed) == 1 else _pooled(
            per_seed, runs, tuned, base_eval, reference, suite, target)
        if reference is None:
            reference = (name, tuned)
        entries.append(entry)
    sizes = {task: base_eval.metrics[base_eval.score_key(task)].n for task in suite}
    if target:
        sizes[target] = base_eval.metrics[f"{target}/exact_match"].n
    return {
        "config": config,
        "model": base["model"],
        "target": target,
        "suite": suite,
        "sample_sizes": {**sizes, "drift_prompts": drift_n},
        "base": {"name": "base", "mlflow_run_id": base.get("mlflow_run_id"),
                 **summarize(base_eval, None, suite, target)},
        "methods": entries,
        "tracking": tracking,
    }


def _entry(record: dict, train_config: dict, folder: Path, tuned, base_eval, suite: list[str],
           target: str | None) -> dict[str, Any]:
    """One trained run (one method, one seed) against the base."""


    metrics = json.loads((folder / "metrics.json").read_text())
    entry = {"name": record["name"], "method": record["method"], "lambda": 1.0,
             "train_config": train_config,
             "train": {k: metrics.get(k) for k in (
                 "trainable_params", "total_params", "trainable_share",
                 "optimizer_state_bytes", "train_seconds", "steps", "first_loss",
                 "last_loss", "loss_history")},
             "mlflow_run_id": record.get("mlflow_run_id"),
             **summarize(tuned, base_eval, suite, target)}
    # moved / ever-moved share per measured step (forgetless.updates), if recorded
    entry["train"]["updates"] = (metrics.get("update_analytics") or {}).get("history")
    mix = metrics.get("mix")  # what a mixed run read: examples and tokens per source
    entry["train"]["tokens"] = None if not mix else {
        "sources": [(one["name"], one["example_share"]) for one in mix["sources"]],
        **{k: mix[k] for k in ("tokens_seen", "task_tokens_seen", "token_multiplier")}}
    entry["interpolation"] = [
        {"lambda": float(lam),
         **summarize(EvalResult.load(folder / file), base_eval, suite, target)}
        for lam, file in record.get("interpolation", {}).items()
    ]
    # sparse merges of the task vector (forgetless.merging), one row each
    entry["merges"] = [
        {"merge": key, **summarize(EvalResult.load(folder / file), base_eval, suite, target)}
        for key, file in record.get("merges", {}).items()
    ]
    for point in [*entry["interpolation"], *entry["merges"]]:
        point.pop("param_drift", None)  # the heat map shows the tuned end only
    return entry


def _versus(reference: str, tuned, ref_eval, suite: list[str], target: str | None,
            pooled: tuple[list, list] | None = None) -> dict[str, Any]:
    """"Forgets less than full" is a claim about two methods: pair them directly (``pooled``:
    every seed's (reference, tuned) evaluations, pooled as ``forgetless.pooling`` does)."""

    versus = summarize(tuned, ref_eval, suite, target)
    if pooled:
        versus = pool_summary(versus, pooled[0], pooled[1], suite, target)
    return {
        "reference": reference,
        "heldout_avg": (versus.get("heldout_avg") or {}).get("delta"),
        "heldout": {task: versus["heldout"][task]["delta"] for task in suite},
        "target": (versus["target"] or {}).get("delta"),
        # the continuous measures, by measure: {"avg": delta, "<task>": delta}
        "measures": {measure: {"avg": heldout_delta(versus, measure),
                               **{t: heldout_delta(versus, measure, t) for t in suite}}
                     for measure in CONTINUOUS},
    }


def _pooled(per_seed: list[dict], runs: list, tuned: list, base_eval, reference,
            suite: list[str], target: str | None) -> dict[str, Any]:
    """One method over several seeds: the first seed's entry with every paired change pooled
    over seeds and items, the mean train time, and the per-seed entries under ``seeds``."""


    bases = [base_eval] * len(tuned)
    entry = pool_summary(copy.deepcopy(per_seed[0]), bases, tuned, suite, target)
    entry["train"]["train_seconds"] = sum(
        e["train"]["train_seconds"] or 0 for e in per_seed) / len(per_seed)
    tokens = [e["train"].get("tokens") for e in per_seed]
    if all(tokens):
        seen = sum(t["tokens_seen"] for t in tokens) / len(tokens)
        task = sum(t["task_tokens_seen"] for t in tokens) / len(tokens)
        entry["train"]["tokens"] = {**tokens[0], "tokens_seen": seen, "task_tokens_seen": task,
                                    "token_multiplier": seen / task if task else None}

    for k, point in enumerate(entry["interpolation"]):
        lam = f"{point['lambda']:g}"
        mixed = [EvalResult.load(folder / record["interpolation"][lam])
                 for record, _, folder in runs]
        entry["interpolation"][k] = pool_summary(point, bases, mixed, suite, target)
    for k, point in enumerate(entry.get("merges") or []):
        merged = [EvalResult.load(folder / record["merges"][point["merge"]])
                  for record, _, folder in runs]
        entry["merges"][k] = pool_summary(point, bases, merged, suite, target)
    if reference is not None:
        entry["vs_reference"] = _versus(reference[0], tuned[0], reference[1][0], suite, target,
                                        pooled=(reference[1], tuned))
    entry["seeds"] = []
    for one, (_, train_config, _) in zip(per_seed, runs):
        for key in ("param_drift", "interpolation", "merges", "train_config"):
            one.pop(key, None)
        one["train"] = {"train_seconds": one["train"]["train_seconds"]}
        entry["seeds"].append({"seed": train_config["seed"], **one})
    return entry


# --- formatting -----------------------------------------------------------------------------


def ci_cell(metric: dict | None, scale: float, digits: int) -> str:
    """A change with its 95% CI; ``*`` marks CIs that exclude 0."""
    if not metric:
        return "–"
    value = f"{scale * metric['value']:+.{digits}f}"
    if _nan(metric.get("ci_low")):
        return value
    star = "*" if metric.get("significant") else ""
    low, high = scale * metric["ci_low"], scale * metric["ci_high"]
    return f"{value}{star} [{low:+.{digits}f}, {high:+.{digits}f}]"


def pts_cell(metric: dict | None) -> str:
    """A fraction as percentage points."""
    return ci_cell(metric, 100, 1)


def _nats(metric: dict | None) -> str:
    """A change in nats."""
    return ci_cell(metric, 1, 3)


def _change(metric: dict | None, measure: str) -> str:
    return pts_cell(metric) if measure == "accuracy" else _nats(metric)


def _column(measure: str, task: str | None = None) -> str:
    """Header of a held-out change column, e.g. ``Δ arc_easy gold log-prob (nats)``."""
    where = task or "held-out avg"
    label = "" if measure == "accuracy" else f" {_LABEL[measure]}"
    return f"Δ {where}{label} ({_UNIT[measure]})"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        format(value, fmt))


def _size(count: float | None, unit: str = "") -> str:
    if count is None:
        return "–"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.1f} {suffix}{unit}"
    return f"{count:.0f} {unit}".strip()


def _label(entry: dict, point: dict | None = None) -> str:
    if point is None:
        return entry["name"]
    if "merge" in point:
        return f"{entry['name']} {point['merge']}"
    return f"{entry['name']} λ={point['lambda']:g}"


def base_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The base model's scores, the reference every change in the main table is measured from."""
    base, rows = results["base"], []
    for task in results["suite"]:
        score = base["heldout"][task].get("score", "acc")  # not in older results.json
        rows.append([f"{task} {score} %", *_abs(base["heldout"][task]["acc"])])
    if base.get("heldout_avg"):
        rows.append(["held-out avg acc %", *_abs(base["heldout_avg"]["acc"])])
        for measure in CONTINUOUS:
            if measure in base["heldout_avg"]:
                rows.append([f"held-out avg {_LABEL[measure]} (nats)",
                             *_abs_nats(base["heldout_avg"][measure]["value"])])
    if results["target"]:
        rows.append([f"{results['target']} exact match %", *_abs(base["target"]["exact_match"])])
    return ["base model", "value", "95% CI", "n"], rows


def _abs(metric: dict) -> list[str]:
    ci = "–" if _nan(metric["ci_low"]) else (
        f"[{100 * metric['ci_low']:.1f}, {100 * metric['ci_high']:.1f}]")
    return [f"{100 * metric['value']:.1f}", ci, str(metric["n"])]


def _abs_nats(metric: dict) -> list[str]:
    ci = "–" if _nan(metric["ci_low"]) else f"[{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"
    return [f"{metric['value']:.3f}", ci, str(metric["n"])]


def _nan(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _second_measure(results: dict) -> str | None:
    """The other measure shown beside the headline one: accuracy when a continuous measure
    leads, the gold log-probability when accuracy leads (None: results without it)."""
    measure = forgetting_measure(results)
    if measure != "accuracy":
        return "accuracy"
    has = any(heldout_delta(e, "gold_logprob") for e in results["methods"])
    return "gold_logprob" if has else None


def main_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Per method (and interpolation point): target gain, held-out change in the report's
    forgetting measure (avg + per task; the other measure's average beside it), drift and cost,
    all relative to the base."""
    target, suite = results["target"], results["suite"]
    measure, second = forgetting_measure(results), _second_measure(results)
    header = ["method"]
    if target:
        header += [f"{target} EM %", f"Δ {target} (pts)"]
        header += [f"Δ {target} NLL (nats/tok)"] if _has_nll(results) else []
    header += [_column(measure), *[_column(measure, task) for task in suite]]
    header += [_column(second)] if second else []
    header += ["KL drift (nats/tok)", "Δ number mass", "trainable params",
               "optimizer state", "train time"]
    rows = []
    for entry in results["methods"]:
        rows.append(_row(results, entry, entry))
        rows += [_row(results, point, entry) for point in entry["interpolation"]]
        rows += [_row(results, point, entry) for point in entry.get("merges") or []]
    return header, rows


def versus_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """Every later method minus the first one (e.g. MoFO − full), paired on the same items."""
    later = [e for e in results["methods"] if e.get("vs_reference")]
    if not later:
        return None
    reference, target = later[0]["vs_reference"]["reference"], results["target"]
    measure = forgetting_measure(results)
    header = [f"method − {reference}"]
    header += [f"Δ {target} (pts)"] if target else []
    header += [_column(measure), *[_column(measure, task) for task in results["suite"]]]
    rows = []
    for entry in later:
        versus = entry["vs_reference"]
        row = [entry["name"]] + ([pts_cell(versus["target"])] if target else [])
        changes = [_versus_delta(versus, measure),
                   *[_versus_delta(versus, measure, t) for t in results["suite"]]]
        row += [_change(change, measure) for change in changes]
        rows.append(row)
    return header, rows


def _has_nll(results: dict) -> bool:
    """Whether the target's paired answer-NLL change was recorded (not in older results)."""
    return any((e.get("target") or {}).get("nll_delta") for e in results["methods"])


def seeds_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """One row per (method, seed) of a compare with several seeds: the runs the pooled rows
    above average, each with its item-only paired CIs (None: a one-seed compare)."""
    entries = [e for e in results["methods"] if e.get("seeds")]
    if not entries:
        return None
    target, measure = results["target"], forgetting_measure(results)
    reference = next((e["vs_reference"]["reference"] for e in entries if e.get("vs_reference")),
                     None)
    header = ["method", "seed"]
    header += [f"{target} EM %", f"Δ {target} (pts)"] if target else []
    header += [_column(measure)]
    header += [f"{_column(measure)} − {reference}"] if reference else []
    header += ["KL drift (nats/tok)", "train time"]
    rows = []
    for entry in entries:
        for one in entry["seeds"]:
            row = [entry["name"], str(one["seed"])]
            if target:
                row += [f"{100 * one['target']['exact_match']['value']:.1f}",
                        pts_cell(one["target"]["delta"])]
            row.append(_change(heldout_delta(one, measure), measure))
            if reference:
                versus = one.get("vs_reference")
                row.append(_change(_versus_delta(versus, measure), measure) if versus else "–")
            kl = (one.get("drift") or {}).get("kl")
            row += [f"{kl['value']:.4f}" if kl else "–",
                    f"{one['train']['train_seconds']:.0f} s"]
            rows.append(row)
    return header, rows


def _versus_delta(versus: dict, measure: str, task: str | None = None) -> dict | None:
    """A ``vs_reference`` change in ``measure`` (None: the suite average)."""
    if measure == "accuracy":
        return versus["heldout"][task] if task else versus["heldout_avg"]
    return ((versus.get("measures") or {}).get(measure) or {}).get(task or "avg")


def _row(results: dict, item: dict, entry: dict) -> list[str]:
    row = [_label(entry, None if item is entry else item)]
    if results["target"]:
        target = item["target"]
        row += [f"{100 * target['exact_match']['value']:.1f}", pts_cell(target["delta"])]
        row += [_nats(target.get("nll_delta"))] if _has_nll(results) else []
    measure, second = forgetting_measure(results), _second_measure(results)
    row.append(_change(heldout_delta(item, measure), measure))
    row += [_change(heldout_delta(item, measure, task), measure) for task in results["suite"]]
    if second:
        row.append(_change(heldout_delta(item, second), second))
    drift = item.get("drift") or {}
    kl = drift.get("kl")
    row.append(f"{kl['value']:.4f} ± {kl['stderr']:.4f}" if kl else "–")
    if "number_mass_change" in drift:  # paired per prompt: value ± SE
        change = drift["number_mass_change"]
        row.append(f"{change['value']:+.4f} ± {change['stderr']:.4f}")
    elif "number_mass" in drift:  # results from before the paired change was recorded
        change = drift["number_mass"]["value"] - drift["number_mass_base"]["value"]
        row.append(f"{change:+.4f}")
    else:
        row.append("–")
    if item is entry:
        train = entry["train"]
        row += [f"{_size(train['trainable_params'])} ({100 * train['trainable_share']:.1f}%)",
                _size(train["optimizer_state_bytes"], "B"), f"{train['train_seconds']:.0f} s"]
    else:
        row += ["–", "–", "–"]
    return row


def split_main(header: list[str], rows: list[list[str]]) -> list[tuple[list[str], list[list[str]]]]:
    """The main table as two that fit a 1400-px window: learning and forgetting, then drift
    and cost (each keeps the method column)."""
    at = header.index("KL drift (nats/tok)")
    return [(header[:at], [row[:at] for row in rows]),
            (header[:1] + header[at:], [row[:1] + row[at:] for row in rows])]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, for a terminal."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def token_budget_lines(results: dict) -> list[str]:
    """What each mixed run read (seeds averaged): the example shares of its sources and the
    tokens, against the task's own, so that a mix doubling the tokens says so."""
    lines = []
    for entry in results["methods"]:
        tokens = entry.get("train", {}).get("tokens")
        if not tokens:
            continue
        shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in tokens["sources"])
        times = tokens["token_multiplier"]
        lines.append(f"`{entry['name']}`: examples {shares}; {tokens['tokens_seen']:,.0f} tokens "
                     f"seen, {times:.2f}x the {tokens['task_tokens_seen']:,.0f} task tokens"
                     + (" (the mix at least doubles the token budget)" if times >= 2 else ""))
    if lines:
        lines.append("Runs without a mix read only task tokens; `mix_budget: steps` keeps the "
                     "optimizer steps, so a mixed run sees fewer task examples.")
    return lines


def verdict_lines(results: dict) -> list[str]:
    """What the report found, in words and numbers (``forgetless.verdict``): its first lines,
    and what ``compare`` prints before the table."""
    return compare_verdict(results, forgetting_measure(results))


def summary_text(results: dict) -> str:
    """The headline table (changes vs the base) as plain text: what ``compare`` prints last."""
    header, rows = main_table(results)
    keep = [i for i, h in enumerate(header) if h not in ("optimizer state", "Δ number mass")]
    return text_table([header[i] for i in keep], [[row[i] for i in keep] for row in rows])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_cell(cell: str) -> str:
    """A change over its CI on a second line: the main table then fits a 1400-px window
    (tests/test_report_browser.py) instead of running 20-character cells side by side."""
    value, sep, ci = cell.partition(" [")
    text = html.escape(value)
    text = f"<b>{text}</b>" if "*" in value else text
    return f"{text}<br><small>[{html.escape(ci)}</small>" if sep else text


def _settings(results: dict) -> list[str]:
    sizes = results["sample_sizes"]
    train = results["methods"][0]["train_config"] if results["methods"] else {}
    seeds = [one["seed"] for one in (results["methods"][0].get("seeds") or [])] if (
        results["methods"]) else []
    lines = [
        f"base model `{results['model']}`, training data `{train.get('data')}`, "
        f"{train.get('max_steps')} steps × batch {train.get('batch_size')}, "
        + (f"seeds {', '.join(map(str, seeds))} (each method trained once per seed)" if seeds
           else f"seed {train.get('seed')} (the same for every method)"),
        "sample sizes: " + ", ".join(f"{k} n={v}" for k, v in sizes.items() if v is not None),
        "Δ = tuned − base on the same items (accuracy and exact match in percentage points, "
        "log-probabilities in nats), with a paired-bootstrap 95% "
        "CI; `*` (bold in HTML) = the CI excludes 0, i.e. a significant change. The held-out "
        "average Δ pools the per-task paired SEs (normal CI). The base model's 95% CIs: "
        "Wilson for shares (acc, pass@1, exact match), normal for log-probabilities; its "
        "held-out average pools the tasks' intervals (MOVER).",
        "held-out forgetting measure: " + {
            "accuracy": "accuracy (pts)",
            "gold_logprob": "gold log-prob = log-probability of the right choice among the "
                            "choices (log-softmax of their log-likelihoods), nats per item; "
                            "for a code task, the canonical solution's log-probability per "
                            "token",
            "margin": "margin = log-likelihood of the right choice minus the best wrong one, "
                      "nats per item",
        }[forgetting_measure(results)] + " (`report.forgetting_measure`); the continuous "
        "measures move before an answer flips, so their paired CIs are much narrower.",
        "KL drift = KL(base ‖ tuned) per token on held-out prompts (± SE); Δ number mass = "
        "change of the probability put on number tokens on those prompts, paired per prompt "
        "(± SE; arXiv 2510.08564).",
    ]
    if seeds:
        lines.append(
            f"pooled over {len(seeds)} training seeds: each change is the mean over seeds and "
            "items, its 95% CI a two-level bootstrap (resample the seeds, then the items), so "
            "it holds both the data-order and the item noise; KL and number mass are means "
            "over seeds (± SE between seeds). The per-seed table lists the runs.")
    if any(e["interpolation"] for e in results["methods"]):
        lines.append("rows `name λ=x` are weight interpolations θ₀ + λ(θ − θ₀) of that method.")
    if any(e.get("merges") for e in results["methods"]):
        lines.append(
            "rows `name ties-dX` / `name dare-dX` merge that method's task vector τ = θ − θ₀ "
            "back onto θ₀ sparsely: TIES keeps the share X of τ's largest coordinates per "
            "tensor, DARE keeps a random share X rescaled by 1/X (`-sY`: times Y; "
            "forgetless.merging).")
    return lines


# --- plots ----------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (higher is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def plot_tradeoff(results: dict, path: Path) -> None:
    """Learning (target gain) vs forgetting (held-out change), with CIs and the Pareto front."""
    import matplotlib.pyplot as plt

    target, measure = results["target"], forgetting_measure(results)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    cmap = plt.get_cmap("tab10")
    labels, points = ["base"], [(0.0, 0.0)]
    ax.scatter([0], [0], marker="s", s=60, color="black", zorder=3, label="base")
    for i, entry in enumerate(results["methods"]):
        color = cmap(i % 10)
        path_x, path_y = [0.0], [0.0]
        for point in [*entry["interpolation"], entry]:
            x, y, xerr, yerr = _coords(point, target, measure)
            path_x.append(x)
            path_y.append(y)
            labels.append(_label(entry, None if point is entry else point))
            points.append((x, y))
            is_end = point is entry
            if not is_end:
                ax.annotate(f"λ={point['lambda']:g}", (x, y), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color=color)
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o" if is_end else ".",
                        color=color, markersize=8 if is_end else 5, alpha=1 if is_end else 0.6,
                        capsize=2, elinewidth=0.8, zorder=3,
                        label=entry["name"] if is_end else None)
        if entry["interpolation"]:
            ax.plot(path_x, path_y, ":", color=color, linewidth=1, zorder=2)
        for point in entry.get("merges") or []:  # off the λ path: a marked point each
            x, y, xerr, yerr = _coords(point, target, measure)
            labels.append(_label(entry, point))
            points.append((x, y))
            ax.annotate(point["merge"], (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="^", color=color, markersize=5,
                        alpha=0.6, capsize=2, elinewidth=0.8, zorder=3)
        for one in entry.get("seeds") or []:  # the seed spread: one small mark per seed
            x, y, _, _ = _coords(one, target, measure)
            ax.scatter([x], [y], marker="x", s=22, color=color, alpha=0.7, zorder=3)
    front = sorted(pareto_front(points), key=lambda i: points[i][0])
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey",
            linewidth=1.2, zorder=1, label="Pareto front")
    ax.scatter([points[i][0] for i in front], [points[i][1] for i in front], s=220,
               facecolors="none", edgecolors="grey", linewidths=1.2, zorder=2)
    names_at: dict[tuple[float, float], list[str]] = {}  # tied results share one label
    for i in front:
        names_at.setdefault(points[i], []).append(labels[i])
    for k, (point, names) in enumerate(names_at.items()):  # alternate above/below: neighbours
        ax.annotate(", ".join(names), point, textcoords="offset points",
                    xytext=(6, 8 if k % 2 == 0 else -14), fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.axvline(0, color="black", linewidth=0.5)
    what = "accuracy" if measure == "accuracy" else _LABEL[measure]
    ax.set_xlabel(f"held-out {what} change vs base ({_UNIT[measure]}, avg over suite) "
                  "→ less forgetting")
    ax.set_ylabel(f"{target} exact-match gain (pts) → more learning" if target
                  else "target gain (no target task)")
    spread = any(e.get("seeds") for e in results["methods"])
    ax.set_title("Learning vs forgetting (bars: paired 95% CI"
                 + ("; pooled over seeds, × = one seed)" if spread else ")"))
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _coords(point: dict, target: str | None,
            measure: str = "accuracy") -> tuple[float, float, Any, Any]:
    def value_and_err(metric: dict | None, scale: float = 100.0) -> tuple[float, Any]:
        if not metric:
            return 0.0, None
        v = scale * metric["value"]
        if _nan(metric["ci_low"]):
            return v, None
        return v, [[max(0.0, v - scale * metric["ci_low"])],
                   [max(0.0, scale * metric["ci_high"] - v)]]

    # accuracy in points; the continuous measures stay in nats
    x, xerr = value_and_err(heldout_delta(point, measure), 100.0 if measure == "accuracy" else 1.0)
    y, yerr = value_and_err(point["target"]["delta"] if target and point["target"] else None)
    return x, y, xerr, yerr


def plot_drift(results: dict, path: Path) -> bool:
    """Heat maps of relative weight change ||W − W₀|| / ||W₀||: method × module type and
    method × layer. Returns False when no method has a drift table."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    entries = [e for e in results["methods"] if e.get("param_drift")]
    if not entries:
        return False
    types = sorted({t for e in entries for t in e["param_drift"]["by_type"]})
    layers = sorted({k for e in entries for k in e["param_drift"]["by_layer"]},
                    key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    panels = [("module type", "by_type", types), ("layer", "by_layer", layers)]
    # One panel above the other: module types get wide cells with printed values.
    fig, axes = plt.subplots(2, 1, figsize=(12, 3.6 + 0.9 * len(entries)), dpi=110)
    for ax, (title, key, columns) in zip(axes, panels):
        grid = np.array([[e["param_drift"][key].get(c, {}).get("rel_l2", np.nan) for c in columns]
                         for e in entries], dtype=float)
        positive = grid[np.isfinite(grid) & (grid > 0)]
        shown = np.where(grid > 0, grid, np.nan)
        norm = LogNorm(positive.min(), positive.max()) if positive.size and (
            positive.max() > positive.min()) else None
        image = ax.imshow(shown, aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(entries)), [e["name"] for e in entries], fontsize=8)
        ax.set_title(f"relative weight change by {title} (white: unchanged)", fontsize=9)
        if len(columns) <= 12:  # few cells: print the numbers too
            for (row, col), value in np.ndenumerate(grid):
                if np.isfinite(value) and value > 0:
                    ax.text(col, row, f"{value:.1e}", ha="center", va="center", fontsize=7,
                            color="white")
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_losses(results: dict, path: Path) -> bool:
    """Training loss per logged step, one line per method."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = False
    for entry in results["methods"]:
        history = entry["train"].get("loss_history") or []
        if history:
            ax.plot([p["step"] for p in history], [p["loss"] for p in history], marker=".",
                    label=entry["name"])
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss (same data, budget and seed)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return drawn


def plot_coverage(results: dict, path: Path) -> bool:
    """Share of trainable coordinates ever moved from θ₀ over the steps (solid), and moved in
    the measured step (dotted), one colour per method. False when no run recorded them."""
    import matplotlib.pyplot as plt

    entries = [e for e in results["methods"] if (e.get("train") or {}).get("updates")]
    if not entries:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    cmap = plt.get_cmap("tab10")
    for i, entry in enumerate(entries):
        history = entry["train"]["updates"]
        steps = [h["step"] for h in history]
        ax.plot(steps, [100 * h["moved_ever"] for h in history], marker=".", color=cmap(i % 10),
                label=f"{entry['name']} (ever moved)")
        ax.plot(steps, [100 * h["moved"] for h in history], ":", color=cmap(i % 10),
                label=f"{entry['name']} (this step)")
    ax.set_xlabel("step")
    ax.set_ylabel("% of trainable coordinates")
    ax.set_ylim(0, 102)
    ax.set_title("Update coverage: coordinates moved from θ₀ (solid) and per step (dotted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --- writing --------------------------------------------------------------------------------


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Draw the plots and write ``report.md`` + a self-contained ``report.html`` into
    ``out_dir``; returns the written paths by kind."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for kind, draw in (("tradeoff", plot_tradeoff), ("drift", plot_drift), ("loss", plot_losses),
                       ("coverage", plot_coverage)):
        path = out / PLOTS[kind]
        if draw(results, path) is not False:
            images[kind] = path
        else:
            path.unlink(missing_ok=True)
    header, rows = main_table(results)
    base_header, base_rows = base_table(results)
    settings = _settings(results)
    captions = {"tradeoff": "Learning vs forgetting", "drift": "Where the weights moved",
                "loss": "Training loss", "coverage": "Update coverage"}
    title = f"forgetless compare: {results['model']} → {results['target'] or 'no target'}"
    verdict = verdict_lines(results)
    md = [f"# {title}", "", *[part for line in verdict for part in (line, "")],
          *[f"- {line}" for line in settings], "",
          md_table(base_header, base_rows), "",
          *[part for table in split_main(header, rows) for part in (md_table(*table), "")]]
    versus = versus_table(results)
    if versus:
        reference = results["methods"][0]["name"]
        md += [f"Each method against `{reference}`, paired on the same items (`*`: the 95% CI "
               "excludes 0):", "", md_table(*versus), ""]
    per_seed = seeds_table(results)
    if per_seed:
        md += ["Per training seed (item-only paired CIs; the rows above pool them):", "",
               md_table(*per_seed), ""]
    budget = token_budget_lines(results)
    if budget:
        md += ["## Token budget of the mixed runs", "", *[f"- {line}" for line in budget], ""]
    md += [f"## {captions[k]}\n\n![{captions[k]}]({p.name})\n" for k, p in images.items()]
    md.append(_footer(results))
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    tables = html_table(base_header, base_rows) + "".join(
        html_table(*table) for table in split_main(header, rows))
    if versus:
        tables += html_table(*versus)
    if per_seed:
        tables += "<p>Per training seed (item-only paired CIs):</p>" + html_table(*per_seed)
    if budget:
        tables += "<h2>Token budget of the mixed runs</h2><ul>" + "".join(
            f"<li>{_inline_code(line)}</li>" for line in budget) + "</ul>"
    atomic_write_text(out / "report.html",
                      html_page(title, settings, tables, images, captions, _footer(results),
                                verdict=verdict))
    return {"markdown": out / "report.md", "html": out / "report.html",
            **{f"plot_{k}": p for k, p in images.items()}}


def _footer(results: dict) -> str:
    tracking = results.get("tracking") or {}
    return (f"Generated by forgetless {results.get('forgetless_version', '?')} on "
            f"{results.get('created', '?')}; MLflow store: `{tracking.get('uri', '?')}`; "
            "data for this report: `results.json`.")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;
padding:4px 8px;text-align:right;white-space:nowrap}td:first-child,th:first-child{text-align:left}
th{background:#f2f2f2;white-space:normal;vertical-align:bottom;min-width:4em}
p.verdict{font-size:15px;margin:.3em 0;padding:2px 8px;border-left:3px solid #4a7}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}code{font-size:90%}"""


def html_page(title, settings, tables, images, captions, footer, verdict=()) -> str:
    """The page; ``verdict`` (sentences) opens it, right under the title."""
    items = "".join(f"<li>{_inline_code(line)}</li>" for line in settings)
    lead = "".join(f"<p class='verdict'>{_inline_code(line)}</p>" for line in verdict)
    figures = "".join(
        f"<h2>{captions[k]}</h2><img alt='{captions[k]}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'>" for k, p in images.items()
    )
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{lead}<ul>{items}</ul>{tables}{figures}"
            f"<p><small>{_inline_code(footer)}</small></p></body></html>\n")


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
