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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forgetless import runs
from forgetless.config import MethodEntry, TrainConfig, load_sectioned_config, validate
from forgetless.errors import ForgetlessError
from forgetless.eval import EvalResult, evaluate
from forgetless.eval.targets import (
    ARC_LETTER,
    arc_letter_rows,
    extract_letter,
    register_file_target,
    registered_targets,
)
from forgetless.io import atomic_write_json, atomic_write_text, fault_point
from forgetless.jobs.continual_report import (
    HELDOUT_CHANGES,
    change_rows,
    continual_metrics,
    heldout_change,
    score_row,
    summarize,
    write_report,
)
from forgetless.jobs.identity import chained_key, identity, with_dtype
from forgetless.jobs.session import JobSession, check_inputs, check_target, target_for
from forgetless.replay import ReplaySettings, replay_files

__all__ = ["ARC_LETTER", "BUILTIN_SEQUENCE", "HELDOUT_CHANGES", "ContinualConfig", "ContinualEval",
           "Stage", "TaskEntry", "change_rows", "continual",
           "continual_metrics", "eval_key", "extract_letter", "heldout_change",
           "load_continual_config", "plan_methods", "register_arc_letter", "resolve_stages",
           "stage_key", "summarize", "write_report"]

BUILTIN_SEQUENCE = ["count_letters", "gsm8k", ARC_LETTER]


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
    replay: ReplaySettings | None = None  # earlier stages' rows mixed into later stages
    tracking_uri: str | None = None
    experiment: str | None = None
    # Opt-ins for code tasks (forgetless.eval.consent); not part of any run's identity.
    confirm_run_unsafe_code: bool = False
    allow_unisolated_code: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    data: str
    target: str
    train: dict[str, Any]
    replay: dict[str, Any] | None = None  # the mix: entry replaying earlier stages


def register_arc_letter(out: Path) -> str:
    """Write the ARC-Easy train rows as JSONL, the training data of the ``arc_easy_letter``
    stage (its test split is the registered target of that name); returns the file path."""
    train_file = out / "data" / f"{ARC_LETTER}.train.jsonl"
    if not train_file.is_file():
        lines = [json.dumps(r) for r in arc_letter_rows("ARC-Easy-Train.jsonl")]
        atomic_write_text(train_file, "\n".join(lines) + "\n")
    return str(train_file)


def resolve_stages(config: ContinualConfig, out: Path) -> list[Stage]:
    """Task entries → stages with training data and an eval target (a held-out file is
    registered under the task's name)."""
    stages = []
    for entry in config.tasks:
        entry = TaskEntry(name=entry) if isinstance(entry, str) else entry
        if entry.name == ARC_LETTER and entry.data is None:
            stages.append(Stage(ARC_LETTER, register_arc_letter(out), ARC_LETTER, entry.train))
            continue
        data = entry.data or entry.name
        target = entry.target or target_for("auto", data)
        if target is None:
            raise ForgetlessError(
                f"task '{entry.name}': give 'target:' (a held-out .jsonl of the task or a "
                "registered target); scoring its own training rows would hide forgetting"
            )
        if target.endswith((".jsonl", ".json")) and target not in registered_targets():
            target = register_file_target(entry.name, target)
        check_target(target)
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


# --- run identities ---------------------------------------------------------------------------


def eval_key(config: ContinualConfig, targets: list[str], dtype: str = "float32") -> str:
    """Identity of the base evaluation and the root of every stage's chain of keys."""
    return identity(with_dtype({"eval": config.eval.model_dump(), "model": config.model,
                                "targets": targets}, dtype), metrics_version=False)


def stage_key(previous: str, settings: dict[str, Any]) -> str:
    """Identity of one stage: the previous stage's key (or the eval key) and its raw keys."""
    return chained_key(previous, settings)


# --- orchestration ----------------------------------------------------------------------------


class _Run(JobSession):
    """Shared state of one continual run: base model, stages, eval settings."""

    def __init__(self, config: ContinualConfig, callbacks: list | None):
        self.config = config
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stages = resolve_stages(config, self.out)
        if config.replay is not None:  # one buffer per stage, the same for every method
            shared = {**config.train}
            mixes = replay_files(config.replay, [(s.data, {**shared, **s.train})
                                                 for s in self.stages], self.out / "replay")
            self.stages = [replace(s, replay=m) for s, m in zip(self.stages, mixes, strict=True)]
        self.methods = plan_methods(config)
        # before the base model loads
        self.suite = check_inputs([stage.data for stage in self.stages], config.eval.suite,
                                  confirm_run_unsafe_code=config.confirm_run_unsafe_code,
                                  allow_unisolated_code=config.allow_unisolated_code)
        self.callbacks = callbacks
        shared = validate(TrainConfig, {**config.train, "model": config.model}, where="train")
        super().__init__("continual", self.out, shared)
        self.eval_key = eval_key(config, [s.target for s in self.stages], self.dtype_name)

    def load_base(self) -> None:
        if self.base is None:
            super().load_base(self.train_configs())

    def train_configs(self) -> list[TrainConfig]:
        """What every (method, stage) trains with, as ``run_method`` builds it."""
        return [validate(TrainConfig, {**_stage_keys(keys, stage), "model": self.config.model},
                         where=f"method '{name}'")
                for name, keys in self.methods for stage in self.stages]

    def evaluate(self, model, label: str):
        """Held-out suite (+ drift vs base) and every task's target, merged in one result."""
        settings = self.config.eval
        fault_point("continual.evaluate")
        started = time.perf_counter()
        is_base = model is self.base
        result = self.measure(
            model, label, not is_base and settings.drift, suite=settings.suite,
            limit=settings.limit, seed=settings.seed, batch_size=settings.batch_size,
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
        self.say(f"{label}: {scores}; heldout {held.value if held else float('nan'):.3f} "
                 f"({result.provenance['seconds']:.0f} s)")
        return result

    def base_result(self):
        def run():
            self.load_base()
            return self.evaluate(self.base, "base")

        folder = self.out / "base"
        self.cached_eval(folder, "stage.json", "eval.json", run, key=self.eval_key)
        return EvalResult.load(folder / "eval.json")

    def run_method(self, name: str, keys: dict[str, Any]) -> list:
        """All stages of one method; finished stages are loaded, the rest trained."""
        results, model, previous, key = [], None, None, self.eval_key
        for index, stage in enumerate(self.stages, start=1):
            folder = self.out / name / f"stage{index}-{stage.name}"
            settings = {**_stage_keys(keys, stage), "output_dir": str(folder)}
            key = stage_key(key, settings)
            if runs.finished(folder, "stage.json", ("eval.json",), key=key):
                self.say(f"{name} stage {index} ({stage.name}): finished before, loading its "
                         "result")
                results.append(EvalResult.load(folder / "eval.json"))
                model, previous = None, folder
                continue
            (folder / "stage.json").unlink(missing_ok=True)
            self.load_base()
            if model is None:
                model = copy.deepcopy(self.base) if previous is None else self._saved(previous)
            self.say(f"{name} stage {index}/{len(self.stages)}: training on {stage.name}")
            trained = self.train(validate(TrainConfig, {**settings, "model": self.config.model}),
                                 model, self.callbacks)
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
        if not (folder / "model").is_dir():
            raise ForgetlessError(
                f"{folder}/model is gone (keep_models: false) but a later stage must be re-run: "
                f"delete {folder.parent} to restart this method"
            )
        return self.load_saved(folder / "model")


def _stage_keys(keys: dict[str, Any], stage: Stage) -> dict[str, Any]:
    """A method's TrainConfig keys for one stage: its own, the stage's overrides, its data
    (and the replay of earlier stages as one more ``mix:`` source)."""
    out = {**keys, **stage.train, "data": stage.data}
    if stage.replay is not None:
        mix = out.get("mix") or []
        out["mix"] = [*([mix] if isinstance(mix, dict) else mix), stage.replay]
    return out


def _track(run: _Run, summary: dict[str, Any], files: dict[str, Path]) -> None:
    """One MLflow run per method (R entries, ACC/BWT/FWT, per-stage series), logged once."""
    tracker = run.open_tracker(run.config.tracking_uri, run.config.experiment)
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
    summary["tracking"] = {"uri": tracker.uri, "experiment_id": tracker.experiment_id}


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
    suite = run.suite  # results are keyed by task name; the suite may name a .yaml path
    summary = summarize(base, per_method, run.stages, suite)
    files = write_report(summary, run.out)
    if track:
        _track(run, summary, files)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["files"] = {k: str(v) for k, v in files.items()}
    fault_point("continual.report")
    atomic_write_json(run.out / "continual.json", summary)
    return summary
