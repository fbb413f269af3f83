"""``forgetless tune``: the recipe that learns the target within a forgetting budget.

An Optuna study (TPE, or NSGA-II for the two objectives target vs held-out drop) searches
methods and their settings. Each trial trains one recipe from a copy of the in-memory base
(``forgetless.train``) and is scored by ``forgetless.eval`` on a *validation* sample of the
held-out suite and the target; the budget (held-out drop in points, KL, continuous held-out
drop in nats) enters as Optuna constraints. A ``ForgettingMonitor`` over the KL budget prunes a
trial while it trains, and so does hopeless target progress (training loss, Optuna's median
pruner). The winner and the default recipes are then retrained over the test seeds and scored on
a *test* sample disjoint from the validation one, so the reported gain is not the search's luck.

Fault safety (runs.py rules): the study lives in ``optuna.db`` (SQLite) in the run folder, so a
search resumes after Ctrl-C or SIGKILL and several processes may share it; a trial that died
with its process (same host, pid gone) is marked failed and its recipe queued again. Every trial
and test run has its own folder keyed by a hash of its recipe, whose ``tune.json`` is written
last: a re-run reuses finished folders and never mistakes a half-done one for finished.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from forgetless import __version__, runs
from forgetless.compare import MethodEntry, ensure_target, target_name
from forgetless.config import TrainConfig, load_sectioned_config, validate
from forgetless.errors import ForgetlessError
from forgetless.eval.result import METRICS_VERSION
from forgetless.io import atomic_write_json, atomic_write_text, fault_point

# Fixed for the whole search (set under train:); the space may not vary them.
_FIXED = {"model", "data", "output_dir", "device", "dtype", "seed", "resume", "report_to",
          "save_model", "monitor_every", "monitor_max_kl", "monitor_action"}
# Settings that only mean something for some methods: sampled only when the method uses them.
_ONLY_FOR = {"fraction": "mofo", "mofo_filter": "mofo", "mofo_exact": "mofo", "lora_r": "lora",
             "lora_alpha": "lora", "lora_dropout": "lora", "merge_lora": "lora",
             "anchor_weight": "anchor"}
_INT_KEYS = {"max_steps", "lora_r", "warmup_steps", "grad_accum", "batch_size"}
# A trial's own training: no TensorBoard, no saved weights, no update analytics (time).
_TRIAL_TRAIN = {"report_to": [], "save_model": False, "update_stats_every": None,
                "resume": False}


def _say(message: str) -> None:
    print(f"[forgetless tune] {message}", flush=True)


# --- configuration --------------------------------------------------------------------------


class Range(BaseModel):
    """A numeric range; ``log`` samples on a log scale, ``step`` on a grid."""

    model_config = ConfigDict(extra="forbid")

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError("low must be below high")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class Budget(BaseModel):
    """How much forgetting a recipe may cost, on the validation sample (unset: no limit)."""

    model_config = ConfigDict(extra="forbid")

    max_heldout_drop: float | None = Field(None, ge=0)  # points of held-out accuracy
    max_kl: float | None = Field(None, gt=0)  # KL(base || model), nats/token; also prunes
    max_gold_logprob_drop: float | None = Field(None, ge=0)  # nats, continuous held-out measure


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(..., ge=1)  # items per held-out task
    target_limit: int = Field(..., ge=1)


class TuneEval(BaseModel):
    """Held-out suite, target, and the two disjoint samples drawn from them."""

    model_config = ConfigDict(extra="forbid")

    suite: list[str] = Field(default_factory=lambda: ["arc_easy", "piqa"])
    target: str | None = "auto"
    validation: Sample = Field(default_factory=lambda: Sample(limit=40, target_limit=20))
    test: Sample = Field(default_factory=lambda: Sample(limit=100, target_limit=40))
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    drift_prompts: int = Field(32, ge=1)


class Search(BaseModel):
    """The trial budget and the Optuna sampler."""

    model_config = ConfigDict(extra="forbid")

    n_trials: int | None = Field(12, ge=1)
    timeout: float | None = Field(None, gt=0)  # seconds of trials, summed over resumes
    sampler: Literal["tpe", "nsga2"] = "tpe"
    seed: int = 0
    monitor_every: int | None = Field(2, ge=1)  # KL check every N steps (needs budget.max_kl)
    prune_startup_trials: int = Field(3, ge=0)  # median pruner: trials before it prunes
    # median pruner: the first step it may prune at (the training loss of the first steps
    # favours high learning rates); a trial's last step is never pruned (only its evaluation
    # would be left, and that is what measures the target)
    prune_warmup: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _bounded(self) -> Search:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("give n_trials and/or timeout")
        return self


class TestSettings(BaseModel):
    """The honest check: the recommendation and default recipes retrained per seed."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    baselines: list[str | MethodEntry] = Field(
        default_factory=lambda: ["full", "attn", {"name": "mofo", "method": "mofo",
                                                  "fraction": 0.1}])


class TuneConfig(BaseModel):
    """A tune run: fixed ``train`` settings, the ``space``, objective, budget, outputs."""

    model_config = ConfigDict(extra="forbid")

    train: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, list[Any] | Range] = Field(default_factory=lambda: {
        "method": ["full", "attn", "mofo", "attn+mofo"],
        "learning_rate": Range(low=1e-5, high=1e-3, log=True)})
    objective: Literal["exact_match", "answer_nll"] = "exact_match"
    budget: Budget = Field(default_factory=Budget)
    search: Search = Field(default_factory=Search)
    eval: TuneEval = Field(default_factory=TuneEval)
    test: TestSettings = Field(default_factory=TestSettings)
    output_dir: str = "runs/tune"
    tracking_uri: str | None = None
    experiment: str | None = None
    # Opt-ins for code tasks (forgetless.eval.consent); not part of any run's hash.
    confirm_run_unsafe_code: bool = False
    allow_unisolated_code: bool = False


def load_tune_config(config: TuneConfig | dict | str | Path | None = None,
                     overrides: list[str] | dict | None = None) -> TuneConfig:
    """File or dict + dotted ``key=value`` overrides (``search.n_trials=3``)."""
    return load_sectioned_config(TuneConfig, config, overrides)


def check_config(config: TuneConfig) -> None:
    """Every choice and range end must make a valid TrainConfig: a typo fails in a second,
    before a model loads or the output folder is made."""
    fixed = sorted(_FIXED & config.space.keys())
    if fixed:
        raise ForgetlessError(f"space: {', '.join(fixed)} cannot be searched (set it under "
                              "train:)")
    for key in ("method", "output_dir"):
        if key in config.train:
            raise ForgetlessError(f"train.{key} is set by tune; remove it (search 'method' "
                                  "under space:)")
    if "method" not in config.space:
        raise ForgetlessError("space: give 'method' (a list of methods to search)")
    validate(TrainConfig, config.train, where="train")
    for key, values in config.space.items():
        if key not in TrainConfig.model_fields:
            raise ForgetlessError(f"space: unknown key '{key}' (a TrainConfig setting)")
        if isinstance(values, list) and not values:
            raise ForgetlessError(f"space.{key}: give at least one value")
        ends = values if isinstance(values, list) else [values.low, values.high]
        if key == "method" and not isinstance(values, list):
            raise ForgetlessError("space.method: give a list of methods")
        for value in ends:
            value = int(value) if key in _INT_KEYS and isinstance(value, float) else value
            validate(TrainConfig, {**config.train, key: value}, where=f"space.{key}")
    for index, entry in enumerate(config.test.baselines):
        entry = MethodEntry(method=entry) if isinstance(entry, str) else entry
        validate(TrainConfig, {**config.train, **(entry.model_extra or {}),
                               "method": entry.method}, where=f"test.baselines[{index}]")


# --- recipes and their identities -----------------------------------------------------------


def suggest(trial, space: dict[str, list[Any] | Range]) -> dict[str, Any]:
    """One recipe from the space; method-specific settings only where the method uses them."""
    recipe: dict[str, Any] = {"method": trial.suggest_categorical("method", space["method"])}
    for key, values in space.items():
        if key == "method" or (key in _ONLY_FOR and _ONLY_FOR[key] not in recipe["method"]):
            continue
        if isinstance(values, list):
            recipe[key] = trial.suggest_categorical(key, values)
        elif key in _INT_KEYS:
            recipe[key] = trial.suggest_int(key, int(values.low), int(values.high),
                                            step=int(values.step or 1), log=values.log)
        else:
            recipe[key] = trial.suggest_float(key, values.low, values.high, step=values.step,
                                              log=values.log)
    return recipe


def _train_config(config: TuneConfig, recipe: dict, folder: Path, seed: int | None = None,
                  **extra: Any) -> TrainConfig:
    data = {**config.train, **recipe, "output_dir": str(folder / "train"), **extra}
    if seed is not None:
        data["seed"] = seed
    return validate(TrainConfig, data, where="recipe")


def recipe_hash(train: TrainConfig) -> str:
    """What a run learns: the resolved config minus where it writes and how it logs."""
    skip = {"output_dir", "report_to", "logging_steps", "save_steps", "resume", "save_model",
            "update_stats_every", "update_stats_sample", "monitor_every", "monitor_max_kl",
            "monitor_action"}
    return runs.config_hash({k: v for k, v in train.model_dump().items() if k not in skip})


# --- the search session ---------------------------------------------------------------------


class _TrialGuard:
    """Trainer callback ending a trial whose target progress is hopeless: the training loss
    goes to Optuna as the intermediate value and its pruner decides (single objective), or,
    for NSGA-II (no intermediate values), the loss has not fallen below its first value by
    half-way. Never at the last step: training is done, the evaluation alone is left."""

    def __new__(cls, *args, **kwargs):  # a TrainerCallback subclass, imported lazily
        from transformers import TrainerCallback

        class Guard(TrainerCallback):
            def __init__(self, trial, sign: float, multi: bool) -> None:
                self.trial, self.sign, self.multi = trial, sign, multi
                self.first: float | None = None
                self.pruned: str | None = None

            def on_log(self, args, state, control, logs=None, **kwargs):
                loss = (logs or {}).get("loss")
                if loss is None or self.pruned:
                    return
                self.first = loss if self.first is None else self.first
                step = state.global_step
                last = step >= state.max_steps
                if self.multi:
                    if step >= state.max_steps / 2 and not last and loss >= self.first:
                        self.pruned = f"training loss {loss:.3f} not below {self.first:.3f}"
                else:
                    self.trial.report(self.sign * loss, step)
                    if not last and self.trial.should_prune():
                        self.pruned = f"training loss {loss:.3f} at step {step}: median pruner"
                if self.pruned:
                    control.should_training_stop = True

        return Guard(*args, **kwargs)


class _Session:
    """What the search and the test phase share: base model, samples, study, tracker."""

    def __init__(self, config: TuneConfig, tracking_uri: str | None):
        from forgetless.devices import resolve_device, resolve_dtype
        from forgetless.eval import load_spec
        from forgetless.eval.consent import require_code_consent
        from forgetless.tracking import Tracker, default_tracking_uri

        self.config = config
        self.out = Path(config.output_dir)
        train = validate(TrainConfig, {**config.train, "method": config.space["method"][0]})
        self.model_name = train.model
        self.device = resolve_device(train.device)
        self.dtype = resolve_dtype(train.dtype, self.device)
        self.target = target_name(config, train.data)
        if self.target is None:
            raise ForgetlessError("eval.target: tune needs a target task to score learning")
        ensure_target(self.target)
        from forgetless.data import load_conversations

        load_conversations(train.data, "train")
        for name in config.eval.suite:
            load_spec(name)
        require_code_consent(config.eval.suite, config.confirm_run_unsafe_code,
                             config.allow_unisolated_code)
        self.val_hash = self._eval_hash("validation")
        self.test_hash = self._eval_hash("test")
        runs.make_dir(self.out)
        uri = tracking_uri or config.tracking_uri or default_tracking_uri(self.out)
        self.tracker = Tracker(uri, config.experiment or self.out.resolve().name,
                               self.out / "mlartifacts")
        self.base = self.tokenizer = None

    def _eval_hash(self, which: str) -> str:
        settings = self.config.eval.model_dump()
        return runs.config_hash({"eval": settings, "which": which, "target": self.target,
                                 "base": self.model_name, "metrics_version": METRICS_VERSION})

    # --- samples and evaluation -----------------------------------------------------------

    def load_base(self) -> None:
        from forgetless.eval import sampled_rows
        from forgetless.models import load_model
        from forgetless.train import check_training_sets

        _say(f"loading base model {self.model_name}")
        self.base, self.tokenizer = load_model(self.model_name, dtype=self.dtype,
                                               device=self.device)
        self.base.eval()
        lengths = self.config.space.get("max_length")
        lengths = lengths if isinstance(lengths, list) else [None]  # a range: its trials check
        first = {"method": self.config.space["method"][0]}
        check_training_sets(self.tokenizer, [
            _train_config(self.config, {**first, **({} if n is None else {"max_length": n})},
                          self.out)
            for n in lengths])
        settings = self.config.eval
        val = settings.validation
        # the test sample never holds a validation row
        self.exclude = {name: sampled_rows(name, val.limit, settings.seed)
                        for name in settings.suite}
        self.exclude[self.target] = sampled_rows(self.target, val.target_limit, settings.seed,
                                                 target=True)
        self.prompts = self._drift_prompts()

    def _drift_prompts(self) -> list:
        from forgetless.eval import default_drift_prompts, load_spec, load_task

        settings = self.config.eval
        tasks = [load_task(load_spec(name), settings.validation.limit, settings.seed)
                 for name in settings.suite]
        return default_drift_prompts(tasks, settings.drift_prompts)

    def evaluate(self, model, which: str, name: str, with_base: bool = True):
        from forgetless.eval import evaluate

        settings = self.config.eval
        sample = getattr(settings, which)
        return evaluate(
            model, self.tokenizer, suite=settings.suite, limit=sample.limit,
            seed=settings.seed, target=self.target, target_limit=sample.target_limit,
            base_model=self.base if with_base else None, drift_prompts=self.prompts,
            batch_size=settings.batch_size, model_name=name, base_name=self.model_name,
            exclude=self.exclude if which == "test" else None,
        )

    def base_eval(self, which: str):
        """The base on one sample, reused while its eval settings hold."""
        from forgetless.eval import EvalResult

        folder = self.out / "base"
        key = self.val_hash if which == "validation" else self.test_hash
        if runs.finished(folder, f"{which}.done.json", (f"{which}.json",), eval_hash=key):
            return EvalResult.load(folder / f"{which}.json")
        _say(f"evaluating the base on the {which} sample")
        result = self.evaluate(self.base, which, "base", with_base=False)
        result.save(folder / f"{which}.json")
        atomic_write_json(folder / f"{which}.done.json", {"eval_hash": key})
        return result

    def scores(self, result, base) -> dict[str, float]:
        """What selection looks at: target metric, held-out drops, KL (plain floats)."""
        metrics = {k: m.value for k, m in result.metrics.items()}
        base_m = {k: m.value for k, m in base.metrics.items()}
        return {
            "target": metrics[f"{self.target}/{self.config.objective}"],
            "target_base": base_m[f"{self.target}/{self.config.objective}"],
            "heldout_drop": 100 * (base_m["heldout/acc"] - metrics["heldout/acc"]),
            "gold_logprob_drop": base_m["heldout/gold_logprob"] - metrics["heldout/gold_logprob"],
            "kl": metrics.get("drift/kl", 0.0),
        }

    def violations(self, scores: dict[str, float]) -> dict[str, float]:
        """Optuna constraints (<= 0: within budget), one per budget limit set."""
        budget = self.config.budget
        pairs = [("heldout_drop", budget.max_heldout_drop), ("kl", budget.max_kl),
                 ("gold_logprob_drop", budget.max_gold_logprob_drop)]
        return {key: scores[key] - limit for key, limit in pairs if limit is not None}

    # --- one run (trial or test) ----------------------------------------------------------

    def run(self, train: TrainConfig, folder: Path, which: str, name: str,
            trial=None) -> dict:
        """Train + evaluate one recipe in ``folder``, or reuse its finished record."""
        rhash = recipe_hash(train)
        key = self.val_hash if which == "validation" else self.test_hash
        record = runs.finished(folder, "tune.json", (), recipe_hash=rhash, eval_hash=key)
        if record and (record.get("pruned") or (folder / "eval.json").is_file()):
            _say(f"{name}: reusing the finished run in {folder}")
            return record
        with runs.RunLock(folder, f"tune {which}"):
            record = self._run_locked(train, folder, which, name, trial, rhash, key)
        return record

    def _run_locked(self, train, folder, which, name, trial, rhash, key) -> dict:
        from forgetless.monitor import ForgettingMonitor
        from forgetless.train import train as train_run

        (folder / "tune.json").unlink(missing_ok=True)
        callbacks, monitor, guard = [], None, None
        budget, search = self.config.budget, self.config.search
        if trial is not None and budget.max_kl and search.monitor_every:
            monitor = ForgettingMonitor(every=search.monitor_every, max_kl=budget.max_kl,
                                        prompts=self.prompts, base_model=self.base,
                                        tokenizer=self.tokenizer)
            callbacks.append(monitor)
        if trial is not None:
            multi = search.sampler == "nsga2"
            guard = _TrialGuard(trial, -1.0 if self.config.objective == "exact_match" else 1.0,
                                multi)
            callbacks.append(guard)
        _say(f"{name}: training {train.method} ({train.max_steps} steps, lr "
             f"{train.learning_rate:g})")
        started = time.perf_counter()
        result = train_run(train, callbacks=callbacks, model=copy.deepcopy(self.base),
                           tokenizer=self.tokenizer)
        record: dict[str, Any] = {"name": name, "recipe_hash": rhash, "eval_hash": key,
                                  "train": train.model_dump(), "steps": result.metrics["steps"],
                                  "train_seconds": round(result.metrics["train_seconds"], 1)}
        stopped = monitor.stopped if monitor else None
        if stopped or (guard and guard.pruned):
            record["pruned"] = (f"KL budget: {stopped['reason']} at step {stopped['step']}"
                                if stopped else f"hopeless target progress: {guard.pruned}")
            if stopped:
                record["kl"] = monitor.history[-1]["forgetting/kl"]
        else:
            fault_point("tune.evaluate")
            tuned = result.model.eval()
            _say(f"{name}: evaluating on the {which} sample")
            evaluated = self.evaluate(tuned, which, name)
            evaluated.save(folder / "eval.json")
            record["scores"] = self.scores(evaluated, self.base_eval(which))
        del result
        record["seconds"] = round(time.perf_counter() - started, 1)
        fault_point("tune.run_done")
        atomic_write_json(folder / "tune.json", record)  # last: the run is finished
        return record

    def track(self, folder: Path, record: dict, tags: dict[str, str]) -> None:
        """One MLflow run per trial / test run, logged once."""
        if self.tracker.has_run(record.get("mlflow_run_id")):
            return
        metrics = dict(record.get("scores") or {})
        metrics["pruned"] = float(bool(record.get("pruned")))
        metrics["seconds"] = record.get("seconds")
        train = runs.read_json(folder / "train" / "metrics.json") or {}
        series = {"train/loss": [(p["step"], p["loss"]) for p in train.get("loss_history", [])]}
        record["mlflow_run_id"] = self.tracker.log_run(
            record["name"], {"train": record["train"]}, metrics, series,
            [folder / "tune.json", folder / "eval.json"],
            tags={"forgetless.tune": str(self.out.resolve()), **tags})
        atomic_write_json(folder / "tune.json", record)


# --- the study ------------------------------------------------------------------------------


def _study(session: _Session, seed_offset: int = 0):
    import optuna

    config = session.config
    n_limits = len(session.violations({k: 0.0 for k in
                                       ("heldout_drop", "kl", "gold_logprob_drop")}))

    def constraints(trial) -> list[float]:
        values = trial.user_attrs.get("constraints") or {}
        return list(values.values() if isinstance(values, dict) else values) or [1.0] * n_limits

    # Optuna 5 takes constraints from Trial.set_constraint; 4 only from constraints_func.
    old_api = not hasattr(optuna.trial.Trial, "set_constraint")
    kwargs = {"constraints_func": constraints} if n_limits and old_api else {}
    seed = config.search.seed + seed_offset  # a resumed search draws new recipes
    if config.search.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, **kwargs)
        directions = ["maximize" if config.objective == "exact_match" else "minimize",
                      "minimize"]
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, **kwargs)
        directions = ["maximize" if config.objective == "exact_match" else "minimize"]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=config.search.prune_startup_trials,
                                         n_warmup_steps=config.search.prune_warmup)
    storage = f"sqlite:///{(session.out / 'optuna.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name="tune", directions=directions,
                               sampler=sampler, pruner=pruner, load_if_exists=True)


def _counted(trial) -> bool:
    """Finished trials that use the budget (one killed with its process is retried instead)."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted"))


def _recover(study) -> int:
    """Trials left RUNNING by a dead process of this host: mark failed, queue their recipe
    again (its folder, if it finished, is reused). Returns how many."""
    from optuna.trial import TrialState

    found = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid, host = trial.user_attrs.get("pid"), trial.user_attrs.get("host")
        if host != socket.gethostname() or not pid or runs.alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        found += 1
    if found:
        _say(f"{found} trial(s) interrupted by a killed run: queued again")
    return found


def _search(session: _Session) -> Any:
    import optuna

    config = session.config
    study = _study(session, 0)
    _recover(study)
    study = _study(session, len(study.trials))
    done = [t for t in study.trials if _counted(t)]
    spent = sum((t.duration.total_seconds() for t in done if t.duration), 0.0)
    left = None if config.search.n_trials is None else config.search.n_trials - len(done)
    timeout = None if config.search.timeout is None else config.search.timeout - spent
    if (left is not None and left <= 0) or (timeout is not None and timeout <= 0):
        _say(f"search budget used ({len(done)} trials, {spent:.0f} s of trials)")
        return study

    def objective(trial) -> Any:
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        recipe = suggest(trial, config.space)
        train = _train_config(config, recipe, Path("."), **_TRIAL_TRAIN)
        folder = session.out / "trials" / recipe_hash(train)
        train = _train_config(config, recipe, folder, **_TRIAL_TRAIN)
        trial.set_user_attr("folder", str(folder.relative_to(session.out)))
        trial.set_user_attr("recipe", recipe)
        record = session.run(train, folder, "validation", f"trial {trial.number}", trial)
        session.track(folder, record, {"forgetless.trial": str(trial.number)})
        fault_point("tune.trial_done")
        if record.get("pruned"):
            trial.set_user_attr("pruned", record["pruned"])
            raise optuna.TrialPruned(record["pruned"])
        scores = record["scores"]
        trial.set_user_attr("scores", scores)
        violations = session.violations(scores)
        trial.set_user_attr("constraints", violations)
        if hasattr(trial, "set_constraint"):
            for key, value in violations.items():
                trial.set_constraint(key, value)
        if config.search.sampler == "nsga2":
            return scores["target"], scores["heldout_drop"]
        return scores["target"]

    def enough(study, trial) -> None:  # several processes share one budget
        if left is not None and sum(map(_counted, study.trials)) >= config.search.n_trials:
            study.stop()

    _say(f"searching: {left if left is not None else 'unbounded'} more trial(s)"
         + (f", {timeout:.0f} s left" if timeout is not None else ""))
    study.optimize(objective, n_trials=left, timeout=timeout, callbacks=[enough],
                   catch=(ForgetlessError,))
    return study


def _trials(study) -> list[dict]:
    rows = []
    for trial in study.trials:
        if trial.state.name in ("RUNNING", "WAITING"):
            continue
        rows.append({"number": trial.number, "state": trial.state.name.lower(),
                     "recipe": trial.user_attrs.get("recipe", trial.params),
                     "scores": trial.user_attrs.get("scores"),
                     "constraints": trial.user_attrs.get("constraints"),
                     "pruned": trial.user_attrs.get("pruned"),
                     "interrupted": bool(trial.user_attrs.get("interrupted")),
                     "folder": trial.user_attrs.get("folder"),
                     "seconds": round(trial.duration.total_seconds(), 1)
                     if trial.duration else None})
    return rows


def _within(trial: dict) -> bool:
    """Every budget constraint of a trial row holds (a dict by name; a list in early stores)."""
    values = trial["constraints"] or {}
    return all(v <= 0 for v in (values.values() if isinstance(values, dict) else values))


def choose(trials: list[dict], objective: str) -> dict | None:
    """The best complete trial within budget (ties: the smaller held-out drop)."""
    ok = [t for t in trials if t["state"] == "complete" and t["scores"]
          and _within(t)]
    if not ok:
        return None
    sign = 1 if objective == "exact_match" else -1
    return max(ok, key=lambda t: (sign * t["scores"]["target"], -t["scores"]["heldout_drop"]))


# --- test phase -----------------------------------------------------------------------------


def _test(session: _Session, best: dict | None) -> list[dict]:
    """The recommendation and the baselines, each over the test seeds, on the test sample."""
    from forgetless.eval import EvalResult
    from forgetless.report import summarize

    config = session.config
    entries = [("recommended", best["recipe"])] if best else []
    for entry in config.test.baselines:
        entry = MethodEntry(method=entry) if isinstance(entry, str) else entry
        entries.append((entry.name or entry.method,
                        {**(entry.model_extra or {}), "method": entry.method}))
    base = session.base_eval("test")
    out = []
    for name, recipe in entries:
        for seed in config.test.seeds:
            folder = session.out / "test" / f"{name}-seed{seed}"
            train = _train_config(config, recipe, folder, seed=seed, **_TRIAL_TRAIN)
            record = session.run(train, folder, "test", f"{name} seed {seed}")
            session.track(folder, record, {"forgetless.test": name})
            result = EvalResult.load(folder / "eval.json")
            summary = summarize(result, base, config.eval.suite, session.target)
            out.append({"name": name, "seed": seed, "recipe": recipe,
                        "seconds": record["seconds"], "scores": record["scores"],
                        "summary": summary})
    return out


# --- report ---------------------------------------------------------------------------------


def plot_front(trials: list[dict], best: dict | None, path: Path, budget: Budget) -> None:
    """Target gain vs held-out drop over every complete trial, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forgetless.report import _pareto

    done = [t for t in trials if t["scores"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if done:
        xs = [t["scores"]["heldout_drop"] for t in done]
        ys = [t["scores"]["target"] - t["scores"]["target_base"] for t in done]
        inside = [_within(t) for t in done]
        ax.scatter([x for x, i in zip(xs, inside) if i], [y for y, i in zip(ys, inside) if i],
                   c="tab:blue", label="within budget")
        ax.scatter([x for x, i in zip(xs, inside) if not i],
                   [y for y, i in zip(ys, inside) if not i], c="tab:gray", marker="x",
                   label="over budget")
        front = sorted(_pareto([(-x, y) for x, y in zip(xs, ys)]), key=lambda i: xs[i])
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


def _recipe_text(recipe: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in recipe.items())


def write_report(results: dict, out: Path) -> dict[str, Path]:
    from forgetless.report import _html, _pts, html_table, md_table

    trials, best, target = results["trials"], results["best"], results["target"]
    counts = results["counts"]
    objective = results["config"]["objective"]
    settings = [
        f"model `{results['model']}`, target `{target}` ({objective}), held-out "
        f"{', '.join(results['config']['eval']['suite'])}",
        f"budget: {_recipe_text({k: v for k, v in results['config']['budget'].items() if v is not None}) or 'none'}",  # noqa: E501
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
                     _recipe_text(t["recipe"]),
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
        test_rows.append([r["name"], str(r["seed"]), _pts(summary["target"]["delta"]),
                          _pts(avg["delta"]),
                          f"{gold['value']:+.3f} [{gold['ci_low']:+.3f}, {gold['ci_high']:+.3f}]"
                          if gold else "–",
                          f"{summary['drift']['kl']['value']:.4f}"
                          if "kl" in summary["drift"] else "–", f"{r['seconds']:.0f}"])
    for name, mean in results["test_means"].items():
        test_rows.append([f"{name} (mean)", "", f"{mean['target']:+.1f}",
                          f"{mean['heldout']:+.1f}", f"{mean['gold_logprob']:+.3f}", "", ""])
    if best:
        headline = (f"Recommended (trial {best['number']}): `{_recipe_text(best['recipe'])}`; "
                    "`forgetless train best.yaml` trains it.")
    else:
        headline = "No trial met the budget: nothing is recommended (widen the space or budget)."
    from forgetless.verdict import tune_verdict

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
    atomic_write_text(files["html"], _html(f"forgetless tune: {target}", settings, tables,
                                           {"plot": files["plot"]},
                                           {"plot": "Target gain vs held-out drop"},
                                           f"forgetless {__version__}, {results['created']}",
                                           verdict=[headline, *verdict]))
    return files


def _means(tests: list[dict]) -> dict[str, dict]:
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


# --- entry points ---------------------------------------------------------------------------


def tune(config: TuneConfig | dict | str | Path | None = None,
         overrides: list[str] | dict | None = None,
         tracking_uri: str | None = None) -> dict:
    """Search, test the winner against the baselines, write the report; returns results."""
    config = load_tune_config(config, overrides)
    check_config(config)
    session = _Session(config, tracking_uri)  # inputs checked before any model loads
    atomic_write_text(session.out / "tune.yaml",
                      yaml.safe_dump(config.model_dump(), sort_keys=False))
    session.load_base()
    started = time.perf_counter()
    session.base_eval("validation")
    study = _search(session)
    search_seconds = time.perf_counter() - started
    trials = _trials(study)
    best = choose(trials, config.objective)
    with runs.RunLock(session.out / "test", "tune test"):
        (session.out / "tune.json").unlink(missing_ok=True)
        test_started = time.perf_counter()
        tests = _test(session, best)
        if best:
            recipe = _train_config(config, best["recipe"], Path("."),
                                   seed=config.train.get("seed", 0)).model_dump()
            recipe["output_dir"] = str(session.out / "best")
            atomic_write_text(session.out / "best.yaml",
                              "# forgetless tune's recommendation: forgetless train best.yaml\n"
                              + yaml.safe_dump(recipe, sort_keys=False))
        counts = {"total": len(trials),
                  **{s: sum(t["state"] == s and not t["interrupted"] for t in trials)
                     for s in ("complete", "pruned")},
                  "failed": sum(t["state"] == "fail" and not t["interrupted"] for t in trials),
                  "interrupted": sum(t["interrupted"] for t in trials)}
        results = {
            "config": config.model_dump(mode="json"), "model": session.model_name,
            "target": session.target, "trials": trials, "best": best, "counts": counts,
            "test": tests, "test_means": _means(tests),
            "samples": {"validation": config.eval.validation.model_dump(),
                        "test": config.eval.test.model_dump()},
            "search_seconds": round(search_seconds, 1),
            "test_seconds": round(time.perf_counter() - test_started, 1),
            "tracking_uri": session.tracker.uri,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "forgetless_version": __version__,
        }
        files = write_report(results, session.out)
        fault_point("tune.report")
        atomic_write_json(session.out / "tune.json", results)  # last: the tune is complete
    results["files"] = {k: str(v) for k, v in files.items()}
    return results


def tune_command(
    config: str = typer.Argument(..., help="Tune YAML (train:, space:, budget:, search:, ...)."),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, dotted into sections: search.n_trials=3"),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in the output folder)."
    ),
) -> None:
    """Search methods and settings for the best target score within a forgetting budget."""
    results = tune(config, overrides or [], tracking_uri=tracking_uri)
    counts, best = results["counts"], results["best"]
    _say(f"{counts['total']} trials ({counts['complete']} complete, {counts['pruned']} pruned) "
         f"in {results['search_seconds']:.0f} s; test phase {results['test_seconds']:.0f} s")
    if best:
        _say(f"recommended: {_recipe_text(best['recipe'])}")
    else:
        _say("no trial met the budget")
    for name, mean in results["test_means"].items():
        _say(f"test {name}: target {mean['target']:+.1f} pts, held-out {mean['heldout']:+.1f} "
             "pts")
    _say(f"report: {results['files']['markdown']} (and tune.html, best.yaml, optuna.db)")

