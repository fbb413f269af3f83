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
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from forgetless import __version__, runs
from forgetless.config import (
    TrainConfig,
    load_sectioned_config,
    validate,
)
from forgetless.errors import ForgetlessError
from forgetless.eval.result import METRICS_VERSION
from forgetless.io import atomic_write_json, atomic_write_text, fault_point

DEFAULT_METHODS: list[Any] = [
    "full", "lora", "attn", "mlp-gate-up", {"name": "mofo", "method": "mofo", "fraction": 0.1},
    "attn+mofo",
]
# Shared by every method, so that the comparison is fair: set them under ``train:`` only.
# ``device``/``dtype``/``attn_implementation`` also say how the shared base loads and is evaluated.
SHARED_KEYS = {"model", "data", "seed", "max_steps", "batch_size", "grad_accum", "limit",
               "max_length", "packing", "output_dir", "device", "dtype", "attn_implementation"}
# Keys that change where or how a run is logged or computed, not what it learns (left out of the
# hash).
_UNHASHED_KEYS = {"output_dir", "report_to", "logging_steps", "save_steps", "resume", "device",
                  "gradient_checkpointing", "update_stats_every", "update_stats_sample"}
# Keys added after compare folders existed: hashed only away from the value earlier runs used
# (dtype resolved first: "auto" is bfloat16 on a CUDA device), so those runs stay reusable.
_HASHED_IF_NOT = {"dtype": "float32", "fp32_master_weights": True, "attn_implementation": "sdpa",
                  "freeze_vision_tower": True, "freeze_multi_modal_projector": True,
                  "freeze_language_model": False}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class MethodEntry(BaseModel):
    """One compared method: a registered ``method`` plus per-method TrainConfig overrides
    (e.g. ``fraction``, ``learning_rate``) as extra keys; ``name`` labels it (default: method)."""

    model_config = ConfigDict(extra="allow")

    method: str
    name: str | None = None


class EvalSettings(BaseModel):
    """How the base and every method are evaluated (see ``forgetless.eval.evaluate``)."""

    model_config = ConfigDict(extra="forbid")

    suite: list[str] = Field(default_factory=lambda: ["arc_easy", "piqa"])
    # items per held-out task: one number for every task, or per task ({humaneval: 12,
    # xcopa: 132}; a task not named gets the evaluator's default)
    limit: Annotated[int, Field(ge=1)] | dict[str, Annotated[int, Field(ge=1)]] | None = 200
    # "auto": the training data when it is a known target (gsm8k, count_letters,
    # largest_number); null: none.
    target: str | None = "auto"
    target_limit: int | None = Field(100, ge=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    drift_prompts: int | None = Field(None, ge=1)  # held-out prompts for KL; None: eval's default


class ReportSettings(BaseModel):
    """How the report reads the results (changing it only redraws: nothing re-runs)."""

    model_config = ConfigDict(extra="forbid")

    # What "forgetting" means in the headline table and the Pareto plot: held-out accuracy
    # (points) or a continuous paired per-item measure (nats; forgetless.eval). The gold
    # choice's log-probability by default: on the demo's runs it separated full fine-tuning
    # from the base (t = -4.4, -3.5 over two seeds) where accuracy did not (t = -0.8, -0.3),
    # with margin in between (docs/results.md, "`make demo` showing forgetting").
    forgetting_measure: Literal["accuracy", "gold_logprob", "margin"] = "gold_logprob"


class CompareConfig(BaseModel):
    """A compare run: shared ``train`` settings, ``methods``, ``eval`` settings, outputs."""

    model_config = ConfigDict(extra="forbid")

    train: dict[str, Any] = Field(default_factory=dict)
    methods: list[str | MethodEntry] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_METHODS), validate_default=True
    )
    eval: EvalSettings = Field(default_factory=EvalSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    interpolate: list[float] = Field(default_factory=list)
    # Training seeds: each method trains once per seed on the same evaluation items and the
    # report pools them. Unset: the one ``train.seed`` (default 0), folders as before.
    seeds: list[int] | None = None
    output_dir: str = "runs/compare"
    tracking_uri: str | None = None
    experiment: str | None = None  # MLflow experiment name; default: the output folder's name
    # Opt-ins for code tasks (forgetless.eval.consent); not part of any run's hash.
    confirm_run_unsafe_code: bool = False
    allow_unisolated_code: bool = False

    @field_validator("interpolate")
    @classmethod
    def _lambdas_inside(cls, values: list[float]) -> list[float]:
        if any(not 0.0 < lam < 1.0 for lam in values):
            raise ValueError("interpolation weights must lie strictly between 0 and 1")
        return sorted(set(values))

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, values: list[int] | None) -> list[int] | None:
        if values is not None and (not values or len(set(values)) != len(values)):
            raise ValueError("give one or more distinct seeds")
        return values


@dataclass(frozen=True)
class PlannedMethod:
    """A method entry resolved into the exact TrainConfig it will run with."""

    name: str
    train: TrainConfig
    seed: int | None = None  # set when the compare has several seeds (``seeds:``)

    @property
    def label(self) -> str:
        return self.name if self.seed is None else f"{self.name} seed {self.seed}"


# --- configuration --------------------------------------------------------------------------


def load_compare_config(
    config: CompareConfig | dict | str | Path | None = None,
    overrides: list[str] | dict | None = None,
) -> CompareConfig:
    """File or dict + ``key=value`` overrides (dotted keys reach into sections:
    ``train.max_steps=5``, ``eval.limit=50``, ``methods=[full,lora]``)."""
    return load_sectioned_config(CompareConfig, config, overrides)


def plan_methods(config: CompareConfig) -> list[PlannedMethod]:
    """Resolve and validate every entry before anything trains (a typo fails in a second)."""
    for key in ("method", "output_dir"):
        if key in config.train:
            raise ForgetlessError(f"train.{key} is set per method by compare; remove it")
    if config.seeds is not None and "seed" in config.train:
        raise ForgetlessError("give the training seed either as train.seed or as seeds:, not both")
    # one seed in ``seeds:`` is the same run as ``train.seed``: same folders, same report
    seeds = [None] if config.seeds is None or len(config.seeds) == 1 else config.seeds
    common = dict(config.train)
    if config.seeds is not None and len(config.seeds) == 1:
        common["seed"] = config.seeds[0]
    if not config.methods:
        raise ForgetlessError("methods: give at least one method")
    validate(TrainConfig, config.train, where="train")  # name the section that holds a typo
    planned, seen = [], set()
    for index, entry in enumerate(config.methods):
        entry = MethodEntry(method=entry) if isinstance(entry, str) else entry
        name = entry.name or entry.method
        where = f"methods[{index}] '{name}'"
        if not _NAME.match(name):
            raise ForgetlessError(f"{where}: a name may hold letters, digits, _ . + - only")
        if name in seen:
            raise ForgetlessError(f"{where}: duplicate name; give each entry its own 'name:'")
        seen.add(name)
        extras = dict(entry.model_extra or {})
        shared = sorted(SHARED_KEYS & extras.keys())
        if shared:
            raise ForgetlessError(
                f"{where}: {', '.join(shared)} must be the same for every method (set it under "
                "train:)"
            )
        for seed in seeds:
            folder = Path(config.output_dir) / "runs" / name
            data = {**common, **extras, "method": entry.method}
            if seed is not None:
                data["seed"], folder = seed, folder / f"seed{seed}"
            data["output_dir"] = str(folder)
            planned.append(PlannedMethod(name, validate(TrainConfig, data, where=where), seed))
    return planned


def target_name(config: CompareConfig, data: str) -> str | None:
    """The eval target: explicit, or ``auto`` = the training data when it is a known target."""
    from forgetless.data import BUILTIN_TASKS
    from forgetless.eval import registered_targets

    if config.eval.target != "auto":
        return config.eval.target
    return data if data in set(registered_targets()) | set(BUILTIN_TASKS) else None


def ensure_target(name: str) -> None:
    """Make a built-in training task usable as an eval target (its test split), if the eval
    package does not register it itself; fail early on unknown targets."""
    from forgetless.data import BUILTIN_TASKS, load_conversations
    from forgetless.eval import (
        Target,
        TargetRow,
        extract_answer,
        get_target,
        register_target,
        registered_targets,
    )

    if name in registered_targets() or name not in BUILTIN_TASKS:
        get_target(name)  # raises a one-line error for unknown names and missing files
        return

    def rows() -> list[TargetRow]:
        out = []
        for i, messages in enumerate(load_conversations(name, "test")):
            response = messages[-1]["content"]
            out.append(TargetRow(f"test:{i}", messages[:-1], response, extract_answer(response)))
        return out

    # Room for a chatty answer that ends in the number (a token holds at least one character).
    longest = max(len(row.response) for row in rows())
    register_target(Target(name, load=rows, max_new_tokens=min(256, max(32, longest + 16))))


def train_hash(planned: PlannedMethod) -> str:
    """Identity of what a method learns: the resolved TrainConfig minus logging/output keys."""
    data = planned.train.model_dump()
    data["dtype"] = _run_dtype(planned.train)
    if data["dtype"] == "float32":
        data.pop("fp32_master_weights")  # master weights only exist for a half dtype
    return runs.config_hash({k: v for k, v in data.items() if k not in _UNHASHED_KEYS
                             and not (k in _HASHED_IF_NOT and v == _HASHED_IF_NOT[k])})


def _run_dtype(train: TrainConfig) -> str:
    """The dtype a run's weights load in, ``auto`` resolved for its device."""
    from forgetless.devices import dtype_name, resolve_device, resolve_dtype

    return dtype_name(resolve_dtype(train.dtype, resolve_device(train.device)))


def eval_hash(config: CompareConfig, target: str | None, model: str,
              dtype: str = "float32") -> str:
    """Identity of how results were measured: eval settings, target, λs, base model, the
    evaluation dtype and the evaluator's metric set (a newer one re-evaluates saved models
    instead of mixing sets)."""
    settings = {**config.eval.model_dump(), "target": target}
    if dtype != "float32":  # float32 is what every earlier compare evaluated in
        settings["dtype"] = dtype
    return runs.config_hash({"eval": settings, "interpolate": config.interpolate, "base": model,
                  "metrics_version": METRICS_VERSION})


# --- orchestration --------------------------------------------------------------------------


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once, not once per process of a launch
        print(f"[forgetless compare] {message}", flush=True)


class _Processes:
    """Who does what under ``accelerate launch``: all train, the main process does the rest."""

    def __init__(self, device) -> None:
        from accelerate import PartialState

        # As the Trainer sets it up (train.py passes use_cpu), so both share one process group.
        self.state = PartialState(cpu=device.type == "cpu")
        self.count = self.state.num_processes
        self.main = self.state.is_main_process

    def barrier(self) -> None:
        if self.count > 1:
            self.state.wait_for_everyone()


class _Session:
    """The state one compare run shares across methods: base model, eval settings, tracker."""

    def __init__(self, config: CompareConfig, tracking_uri: str | None, callbacks: list | None):
        from forgetless.devices import resolve_device, resolve_dtype
        from forgetless.tracking import Tracker, default_tracking_uri

        self.config = config
        self.out = Path(config.output_dir)
        self.callbacks = callbacks
        self.plan = plan_methods(config)
        # One device and dtype (train: section) for training and evaluation alike.
        self.device = resolve_device(self.plan[0].train.device)
        self.dtype = resolve_dtype(self.plan[0].train.dtype, self.device)
        self.procs = _Processes(self.device)
        if self.procs.count > 1 and not all(p.train.save_model for p in self.plan):
            raise ForgetlessError("compare under accelerate launch evaluates the saved models: "
                                  "remove save_model=false")
        self.model_name = self.plan[0].train.model
        self.target = target_name(config, self.plan[0].train.data)
        if self.target:
            ensure_target(self.target)
        _check_inputs(config, self.plan[0].train.data)  # before the base model loads
        self.eval_hash = eval_hash(config, self.target, self.model_name,
                                   _run_dtype(self.plan[0].train))
        self.out.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri or config.tracking_uri or default_tracking_uri(self.out)
        experiment = config.experiment or self.out.resolve().name
        # One writer: two processes creating one SQLite store collide, and runs would double.
        self.tracker = (Tracker(uri, experiment, self.out / "mlartifacts")
                        if self.procs.main else None)
        self.base = self.tokenizer = None

    def load_base(self) -> None:
        from forgetless.models import load_model
        from forgetless.train import check_training_sets

        _say(f"loading base model {self.model_name}")
        self.base, self.tokenizer = load_model(
            self.model_name, dtype=self.dtype, device=self.device,
            attn_implementation=self.plan[0].train.attn_implementation,
        )
        self.base.eval()
        check_training_sets(self.tokenizer, [planned.train for planned in self.plan])

    def evaluate(self, model, name: str, with_base: bool = True):
        from forgetless.eval import evaluate

        settings = self.config.eval
        fault_point("compare.evaluate")
        _say(f"evaluating {name} ({', '.join(settings.suite)}"
             + (f", {self.target}" if self.target else "") + (", drift" if with_base else "") + ")")
        started, cpu = time.perf_counter(), time.process_time()
        result = evaluate(
            model, self.tokenizer, suite=settings.suite, limit=settings.limit,
            seed=settings.seed, target=self.target, target_limit=settings.target_limit,
            base_model=self.base if with_base else None, drift_prompts=self.drift_prompts(),
            batch_size=settings.batch_size,
            num_fewshot=settings.num_fewshot, model_name=name, base_name=self.model_name,
        )
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        _say(f"evaluated {name} in {seconds:.0f} s ({cpu:.0f} CPU s): {_headline(result)}")
        return result

    def drift_prompts(self) -> list[str] | None:
        """The first ``eval.drift_prompts`` held-out contexts, as ``evaluate`` would pick them."""
        from forgetless.eval import DEFAULT_LIMIT, default_drift_prompts, load_spec, load_task

        settings = self.config.eval
        if settings.drift_prompts is None:
            return None
        limit = settings.limit
        tasks = [load_task(spec, limit.get(spec.name, DEFAULT_LIMIT) if isinstance(limit, dict)
                           else limit, settings.seed, settings.num_fewshot or 0)
                 for spec in map(load_spec, settings.suite)]
        return default_drift_prompts(tasks, settings.drift_prompts) or None

    def base_record(self) -> dict | None:
        """The base model's evaluation (main process; ``None`` on the others)."""
        record = self._base_record() if self.procs.main else None
        self.procs.barrier()
        return record

    def _base_record(self) -> dict:
        """The base model's evaluation, reused when its eval settings did not change."""
        folder = self.out / "base"
        record = runs.read_json(folder / "compare.json")
        done = record and (folder / record.get("eval_file", "eval.json")).is_file()
        if done and record.get("eval_hash") == self.eval_hash:
            _say("base: reusing its evaluation")
        else:
            (folder / "compare.json").unlink(missing_ok=True)
            self.evaluate(self.base, "base", with_base=False).save(folder / "eval.json")
            record = {"name": "base", "eval_hash": self.eval_hash, "eval_file": "eval.json",
                      "model": self.model_name}
            atomic_write_json(folder / "compare.json", record)
        return self._tracked(folder, record, params={"model": self.model_name}, train=None)

    def method_record(self, planned: PlannedMethod) -> dict | None:
        """Train + evaluate one method, or reuse its finished run folder (``None`` off main)."""
        folder = Path(planned.train.output_dir)
        record = runs.read_json(folder / "compare.json")
        thash = train_hash(planned)
        complete = bool(record) and self._complete(folder, record, thash)
        self.procs.barrier()  # every process decides on the same files before main changes them
        if complete:
            _say(f"{planned.label}: reusing the finished run in {folder}")
        else:
            record = self._train_and_evaluate(planned, folder, thash, record)
        self.procs.barrier()
        if not self.procs.main:
            return None
        params = {"train": planned.train.model_dump(), "eval": self.config.eval.model_dump(),
                  "target": self.target, "interpolate": self.config.interpolate}
        train = runs.read_json(folder / "metrics.json")
        return self._tracked(folder, record, params=params, train=train, label=planned.label)

    def _complete(self, folder: Path, record: dict, thash: str) -> bool:
        files = [record.get("eval_file"), *record.get("interpolation", {}).values()]
        return (
            record.get("train_hash") == thash and record.get("eval_hash") == self.eval_hash
            and runs.has_files(folder, ["metrics.json", *files])
        )

    def _train_and_evaluate(self, planned, folder: Path, thash: str, old: dict | None) -> dict:
        from forgetless.interpolate import interpolate
        from forgetless.models import is_model_folder, load_model
        from forgetless.train import train

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
            result = train(planned.train, callbacks=self.callbacks,
                           model=copy.deepcopy(self.base), tokenizer=self.tokenizer)
            tuned = result.model
            if self.procs.main:  # trained, not evaluated: an interruption keeps the weights
                atomic_write_json(folder / "compare.json", trained_only)
        if not self.procs.main:
            return None
        if reusable or self.procs.count > 1:  # sharded weights: evaluate what training saved
            tuned = load_model(str(saved), dtype=self.dtype, device=self.device)[0]
        tuned.eval()
        self.evaluate(tuned, planned.label).save(folder / "eval.json")
        points = {}
        for lam in self.config.interpolate:
            mixed = interpolate(self.base, tuned, lam)
            file = f"eval_lambda_{lam:g}.json"
            self.evaluate(mixed, f"{planned.label} λ={lam:g}").save(folder / file)
            points[f"{lam:g}"] = file
            del mixed
        del tuned
        gc.collect()
        record = {"name": planned.name, "method": planned.train.method, "seed": planned.seed,
                  "train_hash": thash,
                  "eval_hash": self.eval_hash, "eval_file": "eval.json", "interpolation": points}
        fault_point("compare.method_done")
        atomic_write_json(folder / "compare.json", record)  # last: marks the method complete
        return record

    def _tracked(self, folder: Path, record: dict, params: dict, train: dict | None,
                 label: str | None = None) -> dict:
        """Log the finished entry to MLflow once (a reused entry keeps its logged run)."""
        if self.tracker.has_run(record.get("mlflow_run_id")):
            return record
        from forgetless.eval import EvalResult

        result = EvalResult.load(folder / record["eval_file"])
        metrics = {k: m.value for k, m in result.metrics.items()}
        series = {}
        if train:
            metrics.update({f"train/{k}": v for k, v in train.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})
            series["train/loss"] = [(p["step"], p["loss"]) for p in train.get("loss_history", [])]
        for lam, file in record.get("interpolation", {}).items():
            mixed = EvalResult.load(folder / file)
            metrics.update({f"lambda_{lam}/{k}": m.value for k, m in mixed.metrics.items()})
        artifacts = [folder / name for name in
                     ("compare.json", record["eval_file"], "metrics.json", "config.yaml")]
        record["mlflow_run_id"] = self.tracker.log_run(
            label or record["name"], params, metrics, series, artifacts,
            tags={"forgetless.compare": str(self.out.resolve())},
        )
        fault_point("compare.tracked")
        atomic_write_json(folder / "compare.json", record)
        return record


def _check_inputs(config: CompareConfig, data: str) -> None:
    """Training data and held-out task files read and parse (a typo fails in a second)."""
    from forgetless.data import load_conversations
    from forgetless.eval import load_spec
    from forgetless.eval.consent import require_code_consent

    load_conversations(data, "train")
    require_code_consent(config.eval.suite, config.confirm_run_unsafe_code,
                         config.allow_unisolated_code)
    names = [load_spec(name).name for name in config.eval.suite]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # results are keyed by task name: one would overwrite the other
        raise ForgetlessError(f"eval.suite: two tasks are named {', '.join(twice)}")


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
    from forgetless.report import build_results, write_report

    session = _Session(config, tracking_uri, callbacks)  # validates everything first
    started, cpu_started = time.perf_counter(), time.process_time()
    main = session.procs.main
    if main:
        atomic_write_text(session.out / "compare.yaml",
                          yaml.safe_dump(config.model_dump(), sort_keys=False))
        (session.out / "results.json").unlink(missing_ok=True)  # the old report is out of date
    session.load_base()
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
    from forgetless.report import write_report

    settings = load_compare_config(config, overrides)
    out = Path(settings.output_dir)
    results = runs.read_json(out / "results.json")
    if results is None:
        raise ForgetlessError(f"no finished compare in {out}: results.json is missing")
    # the report settings given now win (e.g. another report.forgetting_measure)
    results.setdefault("config", {})["report"] = settings.report.model_dump()
    with runs.RunLock(out, "compare --report-only"):
        return write_report(results, out)


def compare_command(
    config: str = typer.Argument(..., help="Compare YAML (train:, methods:, eval:, ...)."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, dotted into sections: train.max_steps=5 eval.limit=50"
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in the output folder)."
    ),
    report_only: bool = typer.Option(
        False, "--report-only", help="Only redraw the report from the output's results.json."
    ),
) -> None:
    """Fine-tune several methods under one budget and report learning vs forgetting."""
    if report_only:
        files = redraw(config, overrides or [])
        print(f"[forgetless compare] report: {files['html']} (and report.md)")
        return
    result = compare(config, overrides or [], tracking_uri=tracking_uri)
    if not result.results:  # not the main process of an ``accelerate launch``
        return
    from forgetless.report import summary_text

    out = result.output_dir
    uri = result.results["tracking"]["uri"]
    print(summary_text(result.results))
    print(f"[forgetless compare] done in {result.results['compare_seconds']:.0f} s "
          f"({result.results['compare_cpu_seconds']:.0f} CPU s)")
    print(f"[forgetless compare] report: {out / 'report.html'} (and report.md, results.json)")
    print(f"[forgetless compare] MLflow UI: mlflow ui --backend-store-uri {uri}")
