"""``forgetless tune``'s search: the Optuna study, its trials and the trial guard.

The study lives in ``optuna.db`` (SQLite) in the run folder, so a search resumes after Ctrl-C or
SIGKILL and several processes may share it; a trial that died with its process (same host, pid
gone) is marked failed and its recipe queued again. ``session`` is the tune job's session: it
trains and evaluates one recipe in its folder (``run``) and logs it (``track``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from transformers import TrainerCallback

from forgetless import runs
from forgetless.errors import ForgetlessError
from forgetless.io import fault_point
from forgetless.jobs.identity import tune_train_key
from forgetless.jobs.session import say
from forgetless.jobs.tune_space import TRIAL_TRAIN, suggest, train_config


def _say(message: str) -> None:
    say("tune", message)


class TrialGuard(TrainerCallback):
    """Trainer callback ending a trial whose target progress is hopeless: the training loss
    goes to Optuna as the intermediate value and its pruner decides (single objective), or,
    for NSGA-II (no intermediate values), the loss has not fallen below its first value by
    half-way. Never at the last step: training is done, the evaluation alone is left."""

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


def open_study(session, seed_offset: int = 0):
    """The shared study (created on first use); ``seed_offset``: a resumed search draws new
    recipes."""
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
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted"))


def _recover(study) -> int:
    """Trials left RUNNING by a dead process of this host: mark failed, queue their recipe
    again (its folder, if it finished, is reused). Returns how many."""
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


def search(session) -> Any:
    """Run the trials the budget has left; returns the study."""
    config = session.config
    study = open_study(session, 0)
    _recover(study)
    study = open_study(session, len(study.trials))
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
        train = train_config(config, recipe, Path("."), **TRIAL_TRAIN)
        folder = session.out / "trials" / tune_train_key(train)
        train = train_config(config, recipe, folder, **TRIAL_TRAIN)
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


def trial_rows(study) -> list[dict]:
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


def within_budget(trial: dict) -> bool:
    """Every budget constraint of a trial row holds (a dict by name; a list in early stores)."""
    values = trial["constraints"] or {}
    return all(v <= 0 for v in (values.values() if isinstance(values, dict) else values))


def choose(trials: list[dict], objective: str) -> dict | None:
    """The best complete trial within budget (ties: the smaller held-out drop)."""
    ok = [t for t in trials if t["state"] == "complete" and t["scores"]
          and within_budget(t)]
    if not ok:
        return None
    sign = 1 if objective == "exact_match" else -1
    return max(ok, key=lambda t: (sign * t["scores"]["target"], -t["scores"]["heldout_drop"]))
