"""``forgetless tune``'s settings: the YAML schema, the search space and one recipe from it.

A recipe is one point of the space (``method`` plus the settings the method uses) on top of the
fixed ``train:`` settings; ``check_config`` makes every choice and range end a valid TrainConfig
before a model loads or the output folder is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from forgetless.config import MethodEntry, TrainConfig, load_sectioned_config, validate
from forgetless.errors import ForgetlessError
from forgetless.methods.registry import uses_option  # sampled only when the method uses it

# Fixed for the whole search (set under train:); the space may not vary them.
FIXED = {"model", "data", "output_dir", "device", "dtype", "seed", "resume", "report_to",
         "save_model", "monitor_every", "monitor_max_kl", "monitor_action"}
INT_KEYS = {"max_steps", "lora_r", "warmup_steps", "grad_accum", "batch_size"}
# A trial's own training: no TensorBoard, no saved weights, no update analytics (time).
TRIAL_TRAIN = {"report_to": [], "save_model": False, "update_stats_every": None,
               "resume": False}


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
    # small: every trial is evaluated on it; the reported test sample is larger (ARCHITECTURE.md)
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
                                                  "fraction": 0.1}],
        validate_default=True)  # the default's dict becomes a MethodEntry like a given one


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
    # Opt-ins for code tasks (forgetless.eval.consent); not part of any run's identity.
    confirm_run_unsafe_code: bool = False
    allow_unisolated_code: bool = False


def load_tune_config(config: TuneConfig | dict | str | Path | None = None,
                     overrides: list[str] | dict | None = None) -> TuneConfig:
    """File or dict + dotted ``key=value`` overrides (``search.n_trials=3``)."""
    return load_sectioned_config(TuneConfig, config, overrides)


def check_config(config: TuneConfig) -> None:
    """Every choice and range end must make a valid TrainConfig: a typo fails in a second,
    before a model loads or the output folder is made."""
    fixed = sorted(FIXED & config.space.keys())
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
            value = int(value) if key in INT_KEYS and isinstance(value, float) else value
            validate(TrainConfig, {**config.train, key: value}, where=f"space.{key}")
    for index, entry in enumerate(config.test.baselines):
        entry = MethodEntry(method=entry) if isinstance(entry, str) else entry
        validate(TrainConfig, {**config.train, **(entry.model_extra or {}),
                               "method": entry.method}, where=f"test.baselines[{index}]")


# --- recipes ---------------------------------------------------------------------------------


def _plain(value: Any) -> bool:
    """A value Optuna stores as a categorical choice itself."""
    return value is None or isinstance(value, bool | int | float | str)


def suggest(trial, space: dict[str, list[Any] | Range]) -> dict[str, Any]:
    """One recipe from the space; method-specific settings only where the method uses them."""
    recipe: dict[str, Any] = {"method": trial.suggest_categorical("method", space["method"])}
    for key, values in space.items():
        if key == "method" or not uses_option(recipe["method"], key):
            continue
        if isinstance(values, list) and all(_plain(v) for v in values):
            recipe[key] = trial.suggest_categorical(key, values)
        elif isinstance(values, list):  # structured choices (a mix: list): drawn by position
            recipe[key] = values[trial.suggest_categorical(key, list(range(len(values))))]
        elif key in INT_KEYS:
            recipe[key] = trial.suggest_int(key, int(values.low), int(values.high),
                                            step=int(values.step or 1), log=values.log)
        else:
            recipe[key] = trial.suggest_float(key, values.low, values.high, step=values.step,
                                              log=values.log)
    return recipe


def train_config(config: TuneConfig, recipe: dict, folder: Path, seed: int | None = None,
                  **extra: Any) -> TrainConfig:
    """The TrainConfig of ``recipe`` writing into ``folder``/train (``seed``: a test seed)."""
    data = {**config.train, **recipe, "output_dir": str(folder / "train"), **extra}
    if seed is not None:
        data["seed"] = seed
    return validate(TrainConfig, data, where="recipe")
