"""``forgetless compare``: several fine-tuning methods, one base, one task, one report.

Every method trains from a fresh copy of the same in-memory base with the same data, budget and
seed, then is evaluated against that base (held-out suite, target task, drift). With ``seeds:
[0, 1, 2]`` every method trains once per seed (``runs/<name>/seed<k>``; the evaluation items stay
the same), and the report pools the seeds (``forgetless.pooling``): whether full fine-tuning
forgets can depend on the data order, which one seed hides. Each finished (method, seed)
leaves ``runs/<name>[/seed<k>]/compare.json`` (written last, atomically) holding a hash of its
resolved config, so an interrupted compare re-run reuses finished runs and trains the rest.
``results.json`` holds everything the report needs; ``forgetless.report`` redraws from it alone.

Under ``accelerate launch`` every process trains (DDP, FSDP, DeepSpeed), and only the main one
evaluates, tracks and writes: it evaluates the model the training saved (whole, whatever the
sharding) while the others wait, so the results equal a one-process run's evaluation.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from forgetless import __version__, runs
from forgetless.config import MethodEntry, TrainConfig
from forgetless.devices import dtype_name, resolve_device, resolve_dtype
from forgetless.errors import ForgetlessError
from forgetless.eval import EvalResult
from forgetless.interpolate import interpolate
from forgetless.io import atomic_write_json, atomic_write_text, fault_point
from forgetless.jobs.compare_plan import (
    DEFAULT_METHODS,
    SHARED_KEYS,
    CompareConfig,
    EvalSettings,
    PlannedMethod,
    ReportSettings,
    load_compare_config,
    plan_methods,
)
from forgetless.jobs.identity import FLOAT32, compare_train_key, identity, with_dtype
from forgetless.jobs.session import (
    JobSession,
    Processes,
    check_inputs,
    check_target,
    drift_prompts,
    loss_series,
    say,
    target_for,
)
from forgetless.merging import MergeSpec, merge
from forgetless.models import is_model_folder
from forgetless.report import build_results, write_report

__all__ = ["DEFAULT_METHODS", "SHARED_KEYS", "CompareConfig", "CompareResult", "EvalSettings",
           "MethodEntry", "PlannedMethod", "ReportSettings", "compare",
           "ensure_target", "eval_hash", "load_compare_config", "plan_methods", "redraw",
           "target_name", "train_hash"]

def target_name(config: CompareConfig, data: str) -> str | None:
    """The eval target: explicit, or ``auto`` = the training data when it is a known target."""
    return target_for(config.eval.target, data)


def ensure_target(name: str) -> None:
    """Fail early on an unknown target (every built-in training task is a registered one)."""
    check_target(name)


def train_hash(planned: PlannedMethod) -> str:
    """Identity of what a method learns: the resolved TrainConfig minus logging/output keys."""
    return compare_train_key(planned.train, _run_dtype(planned.train))


def _run_dtype(train: TrainConfig) -> str:
    """The dtype a run's weights load in, ``auto`` resolved for its device."""
    return dtype_name(resolve_dtype(train.dtype, resolve_device(train.device)))


def eval_hash(config: CompareConfig, target: str | None, model: str,
              dtype: str = FLOAT32) -> str:
    """Identity of how results were measured: eval settings, target, λs, base model, the
    evaluation dtype and the evaluator's metric set (a newer one re-evaluates saved models
    instead of mixing sets)."""
    settings = with_dtype({**config.eval.model_dump(), "target": target}, dtype)
    return identity({"eval": settings, "interpolate": config.interpolate, "base": model})


# --- orchestration --------------------------------------------------------------------------


def _say(message: str) -> None:
    say("compare", message)


class _Session(JobSession):
    """The state one compare run shares across methods: base model, eval settings, tracker."""

    def __init__(self, config: CompareConfig, tracking_uri: str | None, callbacks: list | None):
        self.config = config
        self.callbacks = callbacks
        self.plan = plan_methods(config)
        super().__init__("compare", config.output_dir, self.plan[0].train)
        self.procs = Processes(self.device)
        if self.procs.count > 1 and not all(p.train.save_model for p in self.plan):
            raise ForgetlessError("compare under accelerate launch evaluates the saved models: "
                                  "remove save_model=false")
        self.target = target_name(config, self.plan[0].train.data)
        if self.target:
            ensure_target(self.target)
        # before the base model loads
        check_inputs([self.plan[0].train.data], config.eval.suite, unique=True,
                     confirm_run_unsafe_code=config.confirm_run_unsafe_code,
                     allow_unisolated_code=config.allow_unisolated_code)
        self.eval_hash = eval_hash(config, self.target, self.model_name, self.dtype_name)
        self.out.mkdir(parents=True, exist_ok=True)
        # One writer: two processes creating one SQLite store collide, and runs would double.
        if self.procs.main:
            self.open_tracker(tracking_uri or config.tracking_uri, config.experiment)

    def evaluate(self, model, name: str, with_base: bool = True):
        settings = self.config.eval
        fault_point("compare.evaluate")
        _say(f"evaluating {name} ({', '.join(settings.suite)}"
             + (f", {self.target}" if self.target else "") + (", drift" if with_base else "") + ")")
        started, cpu = time.perf_counter(), time.process_time()
        result = self.measure(
            model, name, with_base, suite=settings.suite, limit=settings.limit,
            seed=settings.seed, target=self.target, target_limit=settings.target_limit,
            drift_prompts=self.drift_prompts(), batch_size=settings.batch_size,
            num_fewshot=settings.num_fewshot,
        )
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        _say(f"evaluated {name} in {seconds:.0f} s ({cpu:.0f} CPU s): {_headline(result)}")
        return result

    def drift_prompts(self) -> list | None:
        """The first ``eval.drift_prompts`` held-out contexts, as ``evaluate`` would pick them."""
        settings = self.config.eval
        if settings.drift_prompts is None:
            return None
        return drift_prompts(settings.suite, settings.limit, settings.seed,
                             settings.drift_prompts, settings.num_fewshot or 0) or None

    def base_record(self) -> dict | None:
        """The base model's evaluation (main process; ``None`` on the others)."""
        record = self._base_record() if self.procs.main else None
        self.procs.barrier()
        return record

    def _base_record(self) -> dict:
        """The base model's evaluation, reused when its eval settings did not change."""
        folder = self.out / "base"
        record = self.cached_eval(
            folder, "compare.json", "eval.json",
            lambda: self.evaluate(self.base, "base", with_base=False),
            {"name": "base", "eval_file": "eval.json", "model": self.model_name},
            reused="base: reusing its evaluation", eval_hash=self.eval_hash)
        return self._tracked(folder, record, params={"model": self.model_name}, train=None)

    def method_record(self, planned: PlannedMethod) -> dict | None:
        """Train + evaluate one method, or reuse its finished run folder (``None`` off main)."""
        folder = Path(planned.train.output_dir)
        record = runs.read_json(folder / "compare.json")
        thash = train_hash(planned)
        complete = bool(record) and self._complete(folder, record, thash, planned.name)
        self.procs.barrier()  # every process decides on the same files before main changes them
        if complete:
            _say(f"{planned.label}: reusing the finished run in {folder}")
        else:
            record = self._train_and_evaluate(planned, folder, thash, record)
        self.procs.barrier()
        if not self.procs.main:
            return None
        params = {"train": planned.train.model_dump(), "eval": self.config.eval.model_dump(),
                  "target": self.target, "interpolate": self.config.interpolate,
                  "merge": [spec.key for spec in self.merges_for(planned.name)]}
        train = runs.read_json(folder / "metrics.json")
        record = self._tracked(folder, record, params=params, train=train, label=planned.label)
        if "merges" in record:  # the report shows the merges asked for now, not every one made
            record = {**record, "merges": {spec.key: record["merges"][spec.key]
                                           for spec in self.merges_for(planned.name)}}
        return record

    def _complete(self, folder: Path, record: dict, thash: str, name: str) -> bool:
        files = [record.get("eval_file"), *record.get("interpolation", {}).values()]
        merges = record.get("merges", {})  # a merge added later: re-evaluate from the weights
        return (
            record.get("train_hash") == thash and record.get("eval_hash") == self.eval_hash
            and all(spec.key in merges for spec in self.merges_for(name))
            and runs.has_files(folder, ["metrics.json", *files, *merges.values()])
        )

    def _train_and_evaluate(self, planned, folder: Path, thash: str, old: dict | None) -> dict:
        saved = folder / "model"
        reusable = bool(
            old and old.get("train_hash") == thash and (folder / "metrics.json").is_file()
            and is_model_folder(saved)
        )
        trained_only = {"name": planned.name, "train_hash": thash}  # weights kept, not evaluated
        if reusable:
            _say(f"{planned.label}: training unchanged, re-evaluating the saved model")
            if self.procs.main:  # an interruption now re-evaluates again, never retrains
                atomic_write_json(folder / "compare.json", trained_only)
        else:
            if self.procs.main:
                (folder / "compare.json").unlink(missing_ok=True)
            _say(f"{planned.label}: training ({planned.train.method}, "
                 f"{planned.train.max_steps} steps)")
            tuned = self.train(planned.train, copy.deepcopy(self.base), self.callbacks).model
            if self.procs.main:  # trained, not evaluated: an interruption keeps the weights
                atomic_write_json(folder / "compare.json", trained_only)
        if not self.procs.main:
            return None
        if reusable or self.procs.count > 1:  # sharded weights: evaluate what training saved
            tuned = self.load_saved(saved)
        tuned.eval()
        self.evaluate(tuned, planned.label).save(folder / "eval.json")
        points = {}
        for lam in self.config.interpolate:
            mixed = interpolate(self.base, tuned, lam)
            file = f"eval_lambda_{lam:g}.json"
            self.evaluate(mixed, f"{planned.label} λ={lam:g}").save(folder / file)
            points[f"{lam:g}"] = file
            del mixed
        merges = self.evaluate_merges(tuned, planned, folder)
        del tuned
        gc.collect()
        record = {"name": planned.name, "method": planned.train.method, "seed": planned.seed,
                  "train_hash": thash,
                  "eval_hash": self.eval_hash, "eval_file": "eval.json", "interpolation": points}
        if merges:  # absent otherwise: records stay as before merges existed
            record["merges"] = merges
        fault_point("compare.method_done")
        atomic_write_json(folder / "compare.json", record)  # last: marks the method complete
        return record

    def merges_for(self, method: str) -> list[MergeSpec]:
        """The ``merge:`` entries that apply to a method entry's runs."""
        return [spec for spec in self.config.merge if spec.applies_to(method)]

    def evaluate_merges(self, tuned, planned: PlannedMethod, folder: Path) -> dict[str, str]:
        """Each ``merge:`` of the run's task vector, evaluated like an interpolation point;
        returns {merge key: eval file}."""
        files = {}
        for spec in self.merges_for(planned.name):
            merged = merge(self.base, tuned, spec)
            file = f"eval_merge_{spec.key}.json"
            self.evaluate(merged, f"{planned.label} {spec.key}").save(folder / file)
            files[spec.key] = file
            del merged
        return files

    def _tracked(self, folder: Path, record: dict, params: dict, train: dict | None,
                 label: str | None = None) -> dict:
        """Log the finished entry to MLflow once (a reused entry keeps its logged run)."""
        if self.tracker.has_run(record.get("mlflow_run_id")):  # before reading the files
            return record
        result = EvalResult.load(folder / record["eval_file"])
        metrics = {k: m.value for k, m in result.metrics.items()}
        series = {}
        if train:
            metrics.update({f"train/{k}": v for k, v in train.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})
            series["train/loss"] = loss_series(train)
        for lam, file in record.get("interpolation", {}).items():
            mixed = EvalResult.load(folder / file)
            metrics.update({f"lambda_{lam}/{k}": m.value for k, m in mixed.metrics.items()})
        for key, file in record.get("merges", {}).items():
            merged = EvalResult.load(folder / file)
            metrics.update({f"merge_{key}/{k}": m.value for k, m in merged.metrics.items()})
        artifacts = [folder / name for name in
                     ("compare.json", record["eval_file"], "metrics.json", "config.yaml")]
        self.track_once(record, label or record["name"], params, metrics, series, artifacts,
                        tags={"forgetless.compare": str(self.out.resolve())})
        fault_point("compare.tracked")
        atomic_write_json(folder / "compare.json", record)
        return record


def _headline(result) -> str:
    parts = [f"{k} {m.value:.3f}" for k, m in result.metrics.items()
             if k == "heldout/acc" or k.endswith("/exact_match") or k == "drift/kl"]
    return ", ".join(parts) or "no metrics"


@dataclass
class CompareResult:
    """Where a compare wrote its report, and the data the report was drawn from."""

    output_dir: Path
    results: dict[str, Any]
    files: dict[str, Path]


def compare(
    config: CompareConfig | dict | str | Path | None = None,
    overrides: list[str] | dict | None = None,
    tracking_uri: str | None = None,
    callbacks: list | None = None,
) -> CompareResult:
    """Train and evaluate every method of ``config`` and write the report folder.

    ``callbacks`` (transformers ``TrainerCallback``) go to every method's training.
    """
    config = load_compare_config(config, overrides)
    plan_methods(config)  # a bad entry fails before the output folder is made or locked
    with runs.RunLock(config.output_dir, "compare"):
        return _compare(config, tracking_uri, callbacks)


def _compare(config: CompareConfig, tracking_uri: str | None,
             callbacks: list | None) -> CompareResult:
    """``compare`` once this process owns the output folder."""
    session = _Session(config, tracking_uri, callbacks)  # validates everything first
    started, cpu_started = time.perf_counter(), time.process_time()
    main = session.procs.main
    if main:
        atomic_write_text(session.out / "compare.yaml",
                          yaml.safe_dump(config.model_dump(), sort_keys=False))
        (session.out / "results.json").unlink(missing_ok=True)  # the old report is out of date
    session.load_base([planned.train for planned in session.plan])
    base = session.base_record()
    records = []
    for index, planned in enumerate(session.plan, start=1):
        _say(f"method {index}/{len(session.plan)}: {planned.label}")
        records.append(session.method_record(planned))
    if not main:  # the main process writes the report; the others only helped train
        return CompareResult(session.out, {}, {})
    results = build_results(
        config=config.model_dump(), out=session.out, base=base, methods=records,
        plan=[(p.name, p.train.model_dump()) for p in session.plan], target=session.target,
        tracking={"uri": session.tracker.uri, "experiment_id": session.tracker.experiment_id},
    )
    results["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["forgetless_version"] = __version__
    results["compare_seconds"] = round(time.perf_counter() - started, 1)
    # CPU seconds over all threads: with a busy machine, wall time says little about the cost.
    results["compare_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    files = write_report(results, session.out)
    fault_point("compare.report")
    atomic_write_json(session.out / "results.json", results)  # last: the compare is complete
    files["results"] = session.out / "results.json"
    return CompareResult(session.out, results, files)


def redraw(config: CompareConfig | dict | str | Path | None = None,
           overrides: list[str] | dict | None = None) -> dict[str, Path]:
    """Rewrite the report files of a finished compare from its ``results.json`` alone."""
    settings = load_compare_config(config, overrides)
    out = Path(settings.output_dir)
    results = runs.read_json(out / "results.json")
    if results is None:
        raise ForgetlessError(f"no finished compare in {out}: results.json is missing")
    # the report settings given now win (e.g. another report.forgetting_measure)
    results.setdefault("config", {})["report"] = settings.report.model_dump()
    with runs.RunLock(out, "compare --report-only"):
        return write_report(results, out)
