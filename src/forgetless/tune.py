"""``forgetless tune``: the recipe that learns the target within a forgetting budget.

An Optuna study (TPE, or NSGA-II for the two objectives target vs held-out drop) searches
methods and their settings. Each trial trains one recipe from a copy of the in-memory base
(``forgetless.train``) and is scored by ``forgetless.eval`` on a *validation* sample of the
held-out suite and the target; the budget (held-out drop in points, KL, continuous held-out
drop in nats) enters as Optuna constraints. A ``ForgettingMonitor`` over the KL budget prunes a
trial while it trains, and so does hopeless target progress (training loss, Optuna's median
pruner). The winner and the default recipes are then retrained over the test seeds and scored on
a *test* sample disjoint from the validation one, so the reported gain is not the search's luck.

Fault safety (runs.py rules): the study lives in ``optuna.db`` (``forgetless.jobs.tune_study``).
Every trial and test run has its own folder keyed by a hash of its recipe, whose ``tune.json``
is written last: a re-run reuses finished folders and never mistakes a half-done one for
finished. Settings: ``forgetless.jobs.tune_space``; report: ``forgetless.jobs.tune_report``.
"""

from __future__ import annotations

import copy
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from forgetless import __version__, runs
from forgetless.config import MethodEntry, TrainConfig, validate
from forgetless.errors import ForgetlessError
from forgetless.eval import EvalResult, sampled_rows
from forgetless.io import atomic_write_json, atomic_write_text, fault_point
from forgetless.jobs.identity import FLOAT32, identity, tune_train_key, with_dtype
from forgetless.jobs.session import (
    JobSession,
    check_inputs,
    check_target,
    drift_prompts,
    loss_series,
    say,
    target_for,
)
from forgetless.jobs.tune_report import mean_over_seeds, write_report
from forgetless.jobs.tune_space import (
    TRIAL_TRAIN,
    TuneConfig,
    check_config,
    load_tune_config,
    train_config,
)
from forgetless.jobs.tune_study import TrialGuard, choose, search, trial_rows
from forgetless.monitor import ForgettingMonitor
from forgetless.report import summarize

__all__ = ["TuneConfig", "load_tune_config", "recipe_hash", "tune"]


def _say(message: str) -> None:
    say("tune", message)


def recipe_hash(train: TrainConfig) -> str:
    """What a run learns: the resolved config minus where it writes and how it logs."""
    return tune_train_key(train)


def eval_hash(config: TuneConfig, which: str, target: str | None, model: str,
              dtype: str = FLOAT32) -> str:
    """Identity of one sample's evaluation (``which``: validation or test), with the dtype the
    base and trials evaluate in (named away from float32, as compare and continual do: cached
    float32 evaluations stay valid, a bfloat16 search no longer reuses them)."""
    return identity({"eval": with_dtype(config.eval.model_dump(), dtype), "which": which,
                     "target": target, "base": model})


class _Session(JobSession):
    """What the search and the test phase share: base model, samples, study, tracker."""

    def __init__(self, config: TuneConfig, tracking_uri: str | None):
        self.config = config
        train = validate(TrainConfig, {**config.train, "method": config.space["method"][0]})
        super().__init__("tune", config.output_dir, train)
        self.target = target_for(config.eval.target, train.data)
        if self.target is None:
            raise ForgetlessError("eval.target: tune needs a target task to score learning")
        check_target(self.target)
        check_inputs([train.data], config.eval.suite, False, config.confirm_run_unsafe_code,
                     config.allow_unisolated_code)
        self.val_hash = eval_hash(config, "validation", self.target, self.model_name,
                                  self.dtype_name)
        self.test_hash = eval_hash(config, "test", self.target, self.model_name, self.dtype_name)
        runs.make_dir(self.out)
        self.open_tracker(tracking_uri or config.tracking_uri, config.experiment)

    # --- samples and evaluation -----------------------------------------------------------

    def load_base(self) -> None:
        lengths = self.config.space.get("max_length")
        lengths = lengths if isinstance(lengths, list) else [None]  # a range: its trials check
        first = {"method": self.config.space["method"][0]}
        super().load_base([
            train_config(self.config, {**first, **({} if n is None else {"max_length": n})},
                         self.out)
            for n in lengths])
        settings = self.config.eval
        val = settings.validation
        # the test sample never holds a validation row
        self.exclude = {name: sampled_rows(name, val.limit, settings.seed)
                        for name in settings.suite}
        self.exclude[self.target] = sampled_rows(self.target, val.target_limit, settings.seed,
                                                 target=True)
        self.prompts = drift_prompts(settings.suite, val.limit, settings.seed,
                                     settings.drift_prompts)

    def evaluate(self, model, which: str, name: str, with_base: bool = True):
        settings = self.config.eval
        sample = getattr(settings, which)
        return self.measure(
            model, name, with_base, suite=settings.suite, limit=sample.limit,
            seed=settings.seed, target=self.target, target_limit=sample.target_limit,
            drift_prompts=self.prompts, batch_size=settings.batch_size,
            exclude=self.exclude if which == "test" else None,
        )

    def base_eval(self, which: str):
        """The base on one sample, reused while its eval settings hold."""
        def run():
            _say(f"evaluating the base on the {which} sample")
            return self.evaluate(self.base, which, "base", with_base=False)

        folder = self.out / "base"
        key = self.val_hash if which == "validation" else self.test_hash
        self.cached_eval(folder, f"{which}.done.json", f"{which}.json", run, eval_hash=key)
        return EvalResult.load(folder / f"{which}.json")

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
            guard = TrialGuard(trial, -1.0 if self.config.objective == "exact_match" else 1.0,
                                multi)
            callbacks.append(guard)
        _say(f"{name}: training {train.method} ({train.max_steps} steps, lr "
             f"{train.learning_rate:g})")
        started = time.perf_counter()
        result = self.train(train, copy.deepcopy(self.base), callbacks)
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
        if self.tracker.has_run(record.get("mlflow_run_id")):  # before reading the files
            return
        metrics = dict(record.get("scores") or {})
        metrics["pruned"] = float(bool(record.get("pruned")))
        metrics["seconds"] = record.get("seconds")
        series = {"train/loss": loss_series(runs.read_json(folder / "train" / "metrics.json"))}
        if self.track_once(record, record["name"], {"train": record["train"]}, metrics, series,
                           [folder / "tune.json", folder / "eval.json"],
                           tags={"forgetless.tune": str(self.out.resolve()), **tags}):
            atomic_write_json(folder / "tune.json", record)


# --- test phase -----------------------------------------------------------------------------


def _test(session: _Session, best: dict | None) -> list[dict]:
    """The recommendation and the baselines, each over the test seeds, on the test sample."""
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
            train = train_config(config, recipe, folder, seed=seed, **TRIAL_TRAIN)
            record = session.run(train, folder, "test", f"{name} seed {seed}")
            session.track(folder, record, {"forgetless.test": name})
            result = EvalResult.load(folder / "eval.json")
            summary = summarize(result, base, config.eval.suite, session.target)
            out.append({"name": name, "seed": seed, "recipe": recipe,
                        "seconds": record["seconds"], "scores": record["scores"],
                        "summary": summary})
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
    study = search(session)
    search_seconds = time.perf_counter() - started
    trials = trial_rows(study)
    best = choose(trials, config.objective)
    with runs.RunLock(session.out / "test", "tune test"):
        (session.out / "tune.json").unlink(missing_ok=True)
        test_started = time.perf_counter()
        tests = _test(session, best)
        if best:
            recipe = train_config(config, best["recipe"], Path("."),
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
            "test": tests, "test_means": mean_over_seeds(tests),
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
