"""The job session: the lifecycle compare, continual and tune share.

A job resolves one device and dtype for training and evaluation, checks its inputs before a
model loads, loads the base once (with every model option), checks the training sets against
its tokenizer, evaluates, reuses a finished folder while its identity holds (its marker written
last, atomically), logs each finished run to MLflow once and prints progress lines. Each job
keeps only what is its own: compare's methods and seeds, continual's stages, tune's study.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState

# Module attributes, not names: tests and users patch forgetless.models.load_model and
# forgetless.train.train, and a job must call the patched function.
from forgetless import models, runs
from forgetless import train as training
from forgetless.config import TrainConfig
from forgetless.data import BUILTIN_TASKS, load_conversations
from forgetless.devices import dtype_name, resolve_device, resolve_dtype
from forgetless.errors import ForgetlessError
from forgetless.eval import (
    DEFAULT_LIMIT,
    EvalResult,
    default_drift_prompts,
    evaluate,
    get_target,
    load_spec,
    load_task,
    registered_targets,
)
from forgetless.eval.consent import require_code_consent
from forgetless.io import atomic_write_json
from forgetless.tracking import Tracker, default_tracking_uri


def say(job: str, message: str) -> None:
    """A progress line, once per launch (not once per process)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[forgetless {job}] {message}", flush=True)


def target_for(setting: str | None, data: str) -> str | None:
    """The eval target: explicit, or ``auto`` = the training data when it is a known target."""
    if setting != "auto":
        return setting
    return data if data in set(registered_targets()) | set(BUILTIN_TASKS) else None


def check_target(name: str) -> None:
    """Fail early on an unknown target or a missing target file (one line)."""
    get_target(name)


def check_inputs(data: Iterable[str], suite: Sequence[str], unique: bool = False,
                 confirm_run_unsafe_code: bool = False,
                 allow_unisolated_code: bool = False) -> list[str]:
    """Training data and held-out task files read and parse (a typo fails in a second, before
    a model loads); returns the suite's task names. ``unique``: two tasks may not share a name
    (results are keyed by it: one would overwrite the other). A code task needs the opt-ins of
    ``forgetless.eval.consent``, checked here too, before any model loads."""
    for source in data:
        load_conversations(source, "train")
    require_code_consent(suite, confirm_run_unsafe_code, allow_unisolated_code)
    names = [load_spec(name).name for name in suite]
    twice = sorted({name for name in names if names.count(name) > 1})
    if unique and twice:
        raise ForgetlessError(f"eval.suite: two tasks are named {', '.join(twice)}")
    return names


def drift_prompts(suite: Sequence[str], limit: int | dict[str, int] | None, seed: int,
                  count: int, num_fewshot: int = 0) -> list:
    """The first ``count`` held-out contexts, as ``evaluate`` would pick them."""
    tasks = [load_task(spec, limit.get(spec.name, DEFAULT_LIMIT) if isinstance(limit, dict)
                       else limit, seed, num_fewshot)
             for spec in map(load_spec, suite)]
    return default_drift_prompts(tasks, count)


class Processes:
    """Who does what under ``accelerate launch``: all train, the main process does the rest."""

    def __init__(self, device) -> None:
        # As the Trainer sets it up (train.py passes use_cpu), so both share one process group.
        self.state = PartialState(cpu=device.type == "cpu")
        self.count = self.state.num_processes
        self.main = self.state.is_main_process

    def barrier(self) -> None:
        if self.count > 1:
            self.state.wait_for_everyone()


class JobSession:
    """One job's shared state: device, dtype, base model and tokenizer, tracker."""

    def __init__(self, job: str, out: str | Path, train: TrainConfig) -> None:
        self.job = job
        self.out = Path(out)
        self.model_name = train.model
        self.attn_implementation = train.attn_implementation
        # One device and dtype (train: section) for training and evaluation alike.
        self.device = resolve_device(train.device)
        self.dtype = resolve_dtype(train.dtype, self.device)
        self.dtype_name = dtype_name(self.dtype)
        self.base = self.tokenizer = None
        self.tracker: Tracker | None = None

    def say(self, message: str) -> None:
        say(self.job, message)

    def open_tracker(self, tracking_uri: str | None, experiment: str | None) -> Tracker:
        """MLflow: a SQLite store in the output folder unless a URI is given."""
        uri = tracking_uri or default_tracking_uri(self.out)
        self.tracker = Tracker(uri, experiment or self.out.resolve().name,
                               self.out / "mlartifacts")
        return self.tracker

    def load_base(self, train_configs: Sequence[TrainConfig]) -> None:
        """The base model with every model option, then each method's inputs (an ``+ewc``
        source, a layer range against the base's layer count) and the training sets against its
        tokenizer: an over-long or empty set or a bad method input fails before anything
        trains or the base is evaluated."""
        self.say(f"loading base model {self.model_name}")
        self.base, self.tokenizer = models.load_model(
            self.model_name, dtype=self.dtype, device=self.device,
            attn_implementation=self.attn_implementation,
        )
        self.base.eval()
        for config in {c.method + "|" + c.ewc_source: c for c in train_configs}.values():
            training.check_method_inputs(config, self.base)
        training.check_training_sets(self.tokenizer, list(train_configs))

    def load_saved(self, folder: str | Path):
        """A run's saved weights, in the session's dtype on its device."""
        return models.load_model(str(folder), dtype=self.dtype, device=self.device)[0]

    def train(self, config: TrainConfig, model, callbacks: list | None = None):
        """One training run on ``model`` (a fresh copy of the base or a previous stage)."""
        return training.train(config, callbacks=callbacks, model=model, tokenizer=self.tokenizer)

    def measure(self, model, name: str, with_base: bool = True, **settings: Any) -> EvalResult:
        """``forgetless.eval.evaluate`` with the session's tokenizer, base and names."""
        return evaluate(model, self.tokenizer, base_model=self.base if with_base else None,
                        model_name=name, base_name=self.model_name, **settings)

    def cached_eval(self, folder: Path, marker: str, file: str,
                    run: Callable[[], EvalResult], record: dict | None = None,
                    reused: str | None = None, **identity: Any) -> dict:
        """Reuse an evaluation whose marker holds ``identity`` (saying ``reused``), or run it
        and write its result, then the marker (last). Returns the marker's record."""
        found = runs.finished(folder, marker, (file,), **identity)
        if found:
            if reused:
                self.say(reused)
            return found
        (folder / marker).unlink(missing_ok=True)
        run().save(folder / file)
        found = {**(record or {}), **identity}
        atomic_write_json(folder / marker, found)
        return found

    def track_once(self, record: dict, name: str, params: dict, metrics: dict, series: dict,
                   artifacts: list[Path], tags: dict[str, str]) -> bool:
        """Log a finished run to MLflow, its run id into ``record`` (the caller writes it to
        the run's marker); False when it is logged already (a reused run keeps its run)."""
        if self.tracker.has_run(record.get("mlflow_run_id")):
            return False
        record["mlflow_run_id"] = self.tracker.log_run(name, params, metrics, series, artifacts,
                                                       tags=tags)
        return True


def loss_series(metrics: dict | None) -> list[tuple[int, float]]:
    """The training loss curve of a run's ``metrics.json``, for MLflow."""
    return [(p["step"], p["loss"]) for p in (metrics or {}).get("loss_history", [])]
