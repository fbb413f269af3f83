"""``forgetless continual``: a sequence of tasks, each stage tuned from the previous weights.

After every stage the model is scored on *all* tasks of the sequence (the eval target of each)
and on the held-out suite, which fills the accuracy matrix ``R[i][j]`` = score on task ``j``
after stage ``i`` (row 0 = the base model, needed for forward transfer). From ``R`` come the
standard continual-learning numbers (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):

* ``ACC`` (average accuracy, a.k.a. OP) = mean_j R[T][j]
* ``BWT`` = mean_{j<T} (R[T][j] - R[j][j])      negative = forgetting of earlier tasks
* ``FWT`` = mean_{j>1} (R[j-1][j] - R[0][j])     effect of earlier stages on later tasks
* ``forgetting`` = mean_{j<T} (max_{l<T} R[l][j] - R[T][j])

The held-out trajectory (``heldout/acc`` per stage) shows whether general ability keeps falling
or recovers in later stages (the effect reported in arXiv 2510.08564). Beside it, the paired
change vs the base of each stage's held-out accuracy, gold log-probability and margin (per item,
averaged over the suite, with a 95% CI) shows forgetting that accuracy alone is too coarse for.

Every stage leaves ``<method>/stage<i>-<task>/`` with the train run folder, ``eval.json`` and
``stage.json`` (written last, keyed by a hash of everything that stage depends on), so a re-run
skips finished stages and continues from the last saved model.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict, Field

from forgetless import runs
from forgetless.compare import MethodEntry
from forgetless.config import (
    TrainConfig,
    load_sectioned_config,
    validate,
)
from forgetless.errors import ForgetlessError
from forgetless.io import atomic_write_json, atomic_write_text, fault_point

ARC_LETTER = "arc_easy_letter"
BUILTIN_SEQUENCE = ["count_letters", "gsm8k", ARC_LETTER]
_LETTERS = "ABCDEFGH"


class TaskEntry(BaseModel):
    """One stage: ``data`` to train on (built-in task or file), ``target`` to score it with
    (registered eval target or a held-out ``.jsonl``), per-stage TrainConfig overrides."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data: str | None = None
    target: str | None = None
    train: dict[str, Any] = Field(default_factory=dict)


class ContinualEval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suite: list[str] = Field(default_factory=lambda: ["arc_easy", "piqa"])
    limit: int | None = Field(100, ge=1)
    target_limit: int | None = Field(100, ge=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    drift: bool = True  # KL / number-token mass against the base on held-out prompts


class ContinualConfig(BaseModel):
    """A continual run: ``tasks`` in order, ``methods`` compared, shared ``train`` settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    tasks: list[str | TaskEntry] = Field(default_factory=lambda: list(BUILTIN_SEQUENCE))
    methods: list[str | MethodEntry] = Field(default_factory=lambda: ["full", "mofo", "attn"])
    train: dict[str, Any] = Field(default_factory=dict)
    eval: ContinualEval = Field(default_factory=ContinualEval)
    output_dir: str = "runs/continual"
    keep_models: bool = False  # keep every stage's weights (default: only the latest)
    tracking_uri: str | None = None
    experiment: str | None = None
    # Opt-ins for code tasks (forgetless.eval.consent); not part of any run's hash.
    confirm_run_unsafe_code: bool = False
    allow_unisolated_code: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    data: str
    target: str
    train: dict[str, Any]


def _say(message: str) -> None:
    print(f"[forgetless continual] {message}", flush=True)


# --- built-in third task: ARC-Easy as "answer with the letter" chat rows ----------------------


def _arc_rows(split_file: str) -> list[dict[str, str]]:
    from forgetless.paths import shared_data_dir

    path = shared_data_dir() / "arc" / split_file
    if not path.is_file():
        raise ForgetlessError(f"ARC-Easy data missing: {path} not found")
    rows = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        choices = item["question"]["choices"]
        labels = [c["label"] for c in choices]
        if item["answerKey"] not in labels or len(choices) > len(_LETTERS):
            continue
        options = "\n".join(f"{_LETTERS[k]}. {c['text']}" for k, c in enumerate(choices))
        prompt = (f"{item['question']['stem']}\n{options}\n"
                  "Answer with the letter of the correct option only.")
        rows.append({"id": item["id"], "prompt": prompt,
                     "response": _LETTERS[labels.index(item["answerKey"])]})
    return rows


def extract_letter(text: str) -> str:
    """The first stand-alone option letter of a reply ("B", "B.", "(B) ...", "Answer: B")."""
    import re

    match = re.search(r"(?<![A-Za-z])([A-H])(?![A-Za-z])", text.replace("Answer", ""))
    return match.group(1) if match else text.strip()[:1].upper()


def register_arc_letter(out: Path) -> str:
    """Write the ARC-Easy train rows as JSONL (training data) and register the test split as
    the ``arc_easy_letter`` eval target; returns the training file path."""
    from forgetless.eval import Target, TargetRow, register_target

    train_file = out / "data" / f"{ARC_LETTER}.train.jsonl"
    if not train_file.is_file():
        lines = [json.dumps(r) for r in _arc_rows("ARC-Easy-Train.jsonl")]
        atomic_write_text(train_file, "\n".join(lines) + "\n")

    def rows() -> list[TargetRow]:
        return [TargetRow(r["id"], [{"role": "user", "content": r["prompt"]}], r["response"],
                          r["response"]) for r in _arc_rows("ARC-Easy-Test.jsonl")]

    register_target(Target(ARC_LETTER, load=rows, extract=extract_letter, max_new_tokens=8))
    return str(train_file)


def _register_file_target(name: str, path: str) -> str:
    """A held-out ``.jsonl`` as target ``name`` with a generation budget from its longest
    reference (a short-answer task should not generate the default 256 tokens)."""
    from forgetless.eval import Target, get_target, register_target

    rows = get_target(path).load
    longest = max(len(row.response) for row in rows())
    register_target(Target(name, load=rows, max_new_tokens=min(256, max(32, longest + 16))))
    return name


def resolve_stages(config: ContinualConfig, out: Path) -> list[Stage]:
    """Task entries → stages with training data and an eval target (registered on the way)."""
    from forgetless.compare import ensure_target
    from forgetless.data import BUILTIN_TASKS
    from forgetless.eval import registered_targets
    from forgetless.vlm.tasks import IMAGE_TASKS

    stages = []
    for entry in config.tasks:
        entry = TaskEntry(name=entry) if isinstance(entry, str) else entry
        if entry.name == ARC_LETTER and entry.data is None:
            stages.append(Stage(ARC_LETTER, register_arc_letter(out), ARC_LETTER, entry.train))
            continue
        data = entry.data or entry.name
        target = entry.target or (data if data in BUILTIN_TASKS or data in IMAGE_TASKS else None)
        if target is None:
            raise ForgetlessError(
                f"task '{entry.name}': give 'target:' (a held-out .jsonl of the task or a "
                "registered target); scoring its own training rows would hide forgetting"
            )
        if target.endswith((".jsonl", ".json")) and target not in registered_targets():
            target = _register_file_target(entry.name, target)
        ensure_target(target)
        stages.append(Stage(entry.name, data, target, entry.train))
    if len(stages) < 2:
        raise ForgetlessError("tasks: a continual run needs at least two tasks")
    if len({s.name for s in stages}) != len(stages):
        raise ForgetlessError("tasks: every task needs its own name")
    return stages


def plan_methods(config: ContinualConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, TrainConfig keys) per method, validated before anything trains."""
    planned, seen = [], set()
    for entry in config.methods:
        entry = MethodEntry(method=entry) if isinstance(entry, str) else entry
        name = entry.name or entry.method
        if name in seen:
            raise ForgetlessError(f"methods: duplicate name '{name}'; give each its own 'name:'")
        seen.add(name)
        keys = {**config.train, **(entry.model_extra or {}), "method": entry.method}
        if "lora" in entry.method:
            keys["merge_lora"] = True  # the next stage starts from merged weights
        validate(TrainConfig, {**keys, "model": config.model}, where=f"method '{name}'")
        planned.append((name, keys))
    return planned


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


def score_row(result, stages: list[Stage], metric: str = "exact_match") -> list[float]:
    return [result.metrics[f"{_target_key(s.target)}/{metric}"].value for s in stages]


def _target_key(target: str) -> str:
    from forgetless.eval import get_target

    return get_target(target).name


# --- orchestration ----------------------------------------------------------------------------


class _Run:
    """Shared state of one continual run: base model, stages, eval settings."""

    def __init__(self, config: ContinualConfig, callbacks: list | None):
        import torch

        from forgetless.devices import dtype_name, resolve_device, resolve_dtype

        self.config = config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages = resolve_stages(config, self.out)
        self.methods = plan_methods(config)
        _check_inputs(config, self.stages)  # before the base model loads
        self.callbacks = callbacks
        # One device and dtype (train: section) for training and evaluation alike.
        shared = validate(TrainConfig, {**config.train, "model": config.model}, where="train")
        self.device = resolve_device(shared.device)
        self.dtype = resolve_dtype(shared.dtype, self.device)
        self.attn_implementation = shared.attn_implementation
        key = {"eval": config.eval.model_dump(), "model": config.model,
               "targets": [s.target for s in self.stages]}
        if self.dtype != torch.float32:  # float32 is what every earlier run evaluated in
            key["dtype"] = dtype_name(self.dtype)
        self.eval_key = runs.config_hash(key)
        self.base = self.tokenizer = None

    def load_base(self) -> None:
        from forgetless.models import load_model
        from forgetless.train import check_training_sets

        if self.base is None:
            _say(f"loading base model {self.config.model}")
            self.base, self.tokenizer = load_model(
                self.config.model, dtype=self.dtype, device=self.device,
                attn_implementation=self.attn_implementation,
            )
            self.base.eval()
            check_training_sets(self.tokenizer, self.train_configs())

    def train_configs(self) -> list[TrainConfig]:
        """What every (method, stage) trains with, as ``run_method`` builds it."""
        return [validate(TrainConfig, {**_stage_keys(keys, stage), "model": self.config.model},
                         where=f"method '{name}'")
                for name, keys in self.methods for stage in self.stages]

    def evaluate(self, model, label: str):
        """Held-out suite (+ drift vs base) and every task's target, merged in one result."""
        from forgetless.eval import evaluate

        settings = self.config.eval
        fault_point("continual.evaluate")
        started = time.perf_counter()
        is_base = model is self.base
        result = evaluate(
            model, self.tokenizer, suite=settings.suite, limit=settings.limit, seed=settings.seed,
            base_model=None if is_base or not settings.drift else self.base,
            batch_size=settings.batch_size, model_name=label, base_name=self.config.model,
        )
        result.provenance["targets"] = {}
        for stage in self.stages:
            part = evaluate(model, self.tokenizer, suite=[], seed=settings.seed,
                            target=stage.target, target_limit=settings.target_limit,
                            batch_size=settings.batch_size)
            result.metrics.update(part.metrics)
            result.per_item.update(part.per_item)
            result.provenance["targets"][stage.name] = part.provenance.get("target")
        result.provenance["seconds"] = round(time.perf_counter() - started, 1)
        scores = ", ".join(f"{s.name} {v:.3f}" for s, v in zip(self.stages,
                                                                score_row(result, self.stages)))
        held = result.metrics.get("heldout/acc")
        _say(f"{label}: {scores}; heldout {held.value if held else float('nan'):.3f} "
             f"({result.provenance['seconds']:.0f} s)")
        return result

    def base_result(self):
        from forgetless.eval import EvalResult

        folder = self.out / "base"
        if runs.finished(folder, "stage.json", ("eval.json",), key=self.eval_key):
            return EvalResult.load(folder / "eval.json")
        self.load_base()
        result = self.evaluate(self.base, "base")
        result.save(folder / "eval.json")
        atomic_write_json(folder / "stage.json", {"key": self.eval_key})
        return result

    def run_method(self, name: str, keys: dict[str, Any]) -> list:
        """All stages of one method; finished stages are loaded, the rest trained."""
        from forgetless.eval import EvalResult
        from forgetless.train import train

        results, model, previous, key = [], None, None, self.eval_key
        for index, stage in enumerate(self.stages, start=1):
            folder = self.out / name / f"stage{index}-{stage.name}"
            settings = {**_stage_keys(keys, stage), "output_dir": str(folder)}
            key = runs.config_hash({"previous": key, "train": {k: v for k, v in settings.items()
                                                    if k != "output_dir"}})
            if runs.finished(folder, "stage.json", ("eval.json",), key=key):
                _say(f"{name} stage {index} ({stage.name}): finished before, loading its result")
                results.append(EvalResult.load(folder / "eval.json"))
                model, previous = None, folder
                continue
            (folder / "stage.json").unlink(missing_ok=True)
            self.load_base()
            if model is None:
                model = copy.deepcopy(self.base) if previous is None else self._saved(previous)
            _say(f"{name} stage {index}/{len(self.stages)}: training on {stage.name}")
            trained = train(validate(TrainConfig, {**settings, "model": self.config.model}),
                            callbacks=self.callbacks, model=model, tokenizer=self.tokenizer)
            model = trained.model.eval()
            result = self.evaluate(model, f"{name} after stage {index} ({stage.name})")
            result.provenance["train"] = {k: trained.metrics[k] for k in
                                          ("train_seconds", "steps", "first_loss", "last_loss")}
            result.save(folder / "eval.json")
            fault_point("continual.stage_done")
            atomic_write_json(folder / "stage.json", {"key": key, "method": name,
                                                      "stage": index, "task": stage.name})
            if previous is not None and not self.config.keep_models:
                shutil.rmtree(previous / "model", ignore_errors=True)
            results.append(result)
            previous = folder
        del model
        gc.collect()
        return results

    def _saved(self, folder: Path):
        from forgetless.models import load_model

        if not (folder / "model").is_dir():
            raise ForgetlessError(
                f"{folder}/model is gone (keep_models: false) but a later stage must be re-run: "
                f"delete {folder.parent} to restart this method"
            )
        return load_model(str(folder / "model"), dtype=self.dtype, device=self.device)[0]


def _stage_keys(keys: dict[str, Any], stage: Stage) -> dict[str, Any]:
    """A method's TrainConfig keys for one stage: its own, the stage's overrides, its data."""
    return {**keys, **stage.train, "data": stage.data}


def _check_inputs(config: ContinualConfig, stages: list[Stage]) -> None:
    """Every stage's training data and the held-out task files read and parse."""
    from forgetless.data import load_conversations
    from forgetless.eval import load_spec
    from forgetless.eval.consent import require_code_consent

    for stage in stages:
        load_conversations(stage.data, "train")
    for name in config.eval.suite:
        load_spec(name)
    require_code_consent(config.eval.suite, config.confirm_run_unsafe_code,
                         config.allow_unisolated_code)


# Paired held-out changes vs the base per stage: measure -> per-item field of the eval records.
HELDOUT_CHANGES = {"accuracy": "correct", "gold_logprob": "gold_logprob", "margin": "margin"}


def heldout_change(base, result, suite: list[str], field: str) -> dict[str, Any] | None:
    """``result - base`` on the held-out suite, paired per item and averaged over tasks (SEs in
    quadrature), or None when a result predates the field (measured before METRICS_VERSION 3)."""
    from forgetless.eval import paired_difference
    from forgetless.eval.stats import combine_means

    tasks = [t for t in suite if t in base.per_item and t in result.per_item]
    if not tasks or any(field not in r for t in tasks
                        for r in (*base.per_item[t], *result.per_item[t])):
        return None
    return combine_means([paired_difference(base, result, t, field) for t in tasks]).to_dict()


def summarize(base, per_method: dict[str, list], stages: list[Stage],
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forgetless.report import md_table

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

    from forgetless.verdict import continual_verdict

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
    def cell(change: dict | None, scale: float, fmt: str) -> str:
        if change is None:
            return "–"
        star = "*" if change["ci_low"] > 0 or change["ci_high"] < 0 else ""
        return (f"{scale * change['value']:{fmt}}{star} [{scale * change['ci_low']:{fmt}}, "
                f"{scale * change['ci_high']:{fmt}}]")

    rows = []
    for name, data in summary["methods"].items():
        for measure, changes in (data.get("heldout_change") or {}).items():
            scale, fmt, unit = (100.0, "+.1f", "pts") if measure == "accuracy" else (
                1.0, "+.3f", "nats")
            rows.append([name, f"{measure} ({unit})", *(cell(c, scale, fmt) for c in changes)])
    return rows


def _track(run: _Run, summary: dict[str, Any], files: dict[str, Path]) -> None:
    """One MLflow run per method (R entries, ACC/BWT/FWT, per-stage series), logged once."""
    from forgetless.tracking import Tracker, default_tracking_uri

    uri = run.config.tracking_uri or default_tracking_uri(run.out)
    tracker = Tracker(uri, run.config.experiment or run.out.resolve().name, run.out / "mlartifacts")
    logged = runs.read_json(run.out / "mlflow.json") or {}
    for name, keys in run.methods:
        data = summary["methods"][name]
        key = runs.config_hash(data)
        if logged.get(name, {}).get("key") == key and tracker.has_run(logged[name]["run_id"]):
            continue
        metrics = {k: data[k] for k in ("acc", "bwt", "fwt", "forgetting")}
        for i, row in enumerate(data["R"]):
            metrics.update({f"R/{i}/{task}": v for task, v in zip(summary["tasks"], row)})
        series = {k: [(i, v) for i, v in enumerate(vs) if v is not None]
                  for k, vs in data["trajectory"].items()}
        for j, task in enumerate(summary["tasks"]):
            series[f"task/{task}"] = [(i, row[j]) for i, row in enumerate(data["R"])]
        for measure, changes in (data.get("heldout_change") or {}).items():
            series[f"heldout_change/{measure}"] = [(i, c["value"]) for i, c in
                                                   enumerate(changes, start=1) if c]
        params = {"model": run.config.model, "tasks": summary["tasks"], "train": keys,
                  "eval": run.config.eval.model_dump()}
        artifacts = [files["markdown"], files[f"heatmap_{name}"], files["heldout"]]
        run_id = tracker.log_run(name, params, metrics, series, artifacts,
                                 tags={"forgetless.continual": str(run.out.resolve())})
        fault_point("continual.tracked")
        logged[name] = {"key": key, "run_id": run_id}
        atomic_write_json(run.out / "mlflow.json", logged)
    summary["tracking"] = {"uri": uri, "experiment_id": tracker.experiment_id}


def load_continual_config(
    config: ContinualConfig | dict | str | Path | None = None,
    overrides: list[str] | dict | None = None,
) -> ContinualConfig:
    """File or dict + ``key=value`` overrides; dotted keys reach into sections
    (``train.max_steps=20``, ``eval.limit=50``, ``methods=[full,attn]``)."""
    return load_sectioned_config(ContinualConfig, config, overrides)


def continual(
    config: ContinualConfig | dict | str | Path | None = None,
    overrides: list[str] | dict | None = None,
    callbacks: list | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every method through the task sequence; returns the summary that is
    also written to ``<output_dir>/continual.json`` (last, atomically)."""
    config = load_continual_config(config, overrides)
    plan_methods(config)  # a bad entry fails before the output folder is made or locked
    with runs.RunLock(config.output_dir, "continual"):
        return _continual(config, callbacks, track)


def _continual(config: ContinualConfig, callbacks: list | None, track: bool) -> dict[str, Any]:
    """``continual`` once this process owns the output folder."""
    run = _Run(config, callbacks)
    started = time.perf_counter()
    atomic_write_text(run.out / "continual.yaml", json.dumps(config.model_dump(), indent=1))
    (run.out / "continual.json").unlink(missing_ok=True)
    base = run.base_result()
    per_method = {name: run.run_method(name, keys) for name, keys in run.methods}
    # results are keyed by task name; the suite may give a task as a .yaml path
    from forgetless.eval import load_spec

    suite = [load_spec(task).name for task in config.eval.suite]
    summary = summarize(base, per_method, run.stages, suite)
    files = write_report(summary, run.out)
    if track:
        _track(run, summary, files)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["files"] = {k: str(v) for k, v in files.items()}
    fault_point("continual.report")
    atomic_write_json(run.out / "continual.json", summary)
    return summary


def continual_command(
    config: str = typer.Argument(None, help="Continual YAML (tasks:, methods:, train:, eval:)."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, dotted into sections: train.max_steps=20 eval.limit=50"
    ),
) -> None:
    """Tune through a task sequence (each stage from the last); report R, ACC, BWT, FWT."""
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides, config = [config, *(overrides or [])], None
    summary = continual(config, overrides or [])
    for name, data in summary["methods"].items():
        print(f"[forgetless continual] {name}: ACC {data['acc']:.3f}  BWT {data['bwt']:+.3f}  "
              f"FWT {data['fwt']:+.3f}")
    print(f"[forgetless continual] report: {summary['files']['markdown']} "
          f"({summary['seconds']:.0f} s)")
