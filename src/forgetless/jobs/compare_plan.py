"""``forgetless compare``'s settings: the YAML schema and the plan it resolves into.

``plan_methods`` turns every method entry (and seed) into the exact TrainConfig it will run
with, before anything trains, so a typo fails in a second.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forgetless.config import MethodEntry, TrainConfig, load_sectioned_config, validate
from forgetless.errors import ForgetlessError
from forgetless.merging import MergeSpec, check_specs

DEFAULT_METHODS: list[Any] = [
    "full", "lora", "attn", "mlp-gate-up", {"name": "mofo", "method": "mofo", "fraction": 0.1},
    "attn+mofo",
]
# Shared by every method, so that the comparison is fair: set them under ``train:`` only.
# ``device``/``dtype``/``attn_implementation`` also say how the shared base loads and is evaluated.
SHARED_KEYS = {"model", "data", "seed", "max_steps", "batch_size", "grad_accum", "limit",
               "max_length", "packing", "output_dir", "device", "dtype", "attn_implementation"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class EvalSettings(BaseModel):
    """How the base and every method are evaluated (see ``forgetless.eval.evaluate``)."""

    model_config = ConfigDict(extra="forbid")

    suite: list[str] = Field(default_factory=lambda: ["arc_easy", "piqa"])
    # items per held-out task: one number for every task, or per task ({humaneval: 12,
    # xcopa: 132}; a task not named gets the evaluator's default)
    # 200: the evaluator's default, one evaluation per method (continual and tune evaluate far
    # more often and default lower; ARCHITECTURE.md, "The job engine")
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
    # Sparse merges of every run's task vector onto the base (forgetless.merging), each
    # evaluated as its own row ``<name> <kind>-d<density>[-s<scale>]``: [{kind: ties,
    # density: 0.2}, {kind: dare, density: 0.1, scale: 1.0, seed: 0}].
    merge: list[MergeSpec] = Field(default_factory=list)
    # Training seeds: each method trains once per seed on the same evaluation items and the
    # report pools them. Unset: the one ``train.seed`` (default 0), folders as before.
    seeds: list[int] | None = None
    output_dir: str = "runs/compare"
    tracking_uri: str | None = None
    experiment: str | None = None  # MLflow experiment name; default: the output folder's name
    # Opt-ins for code tasks (forgetless.eval.consent); not part of any run's identity.
    confirm_run_unsafe_code: bool = False
    allow_unisolated_code: bool = False

    @field_validator("interpolate")
    @classmethod
    def _lambdas_inside(cls, values: list[float]) -> list[float]:
        if any(not 0.0 < lam < 1.0 for lam in values):
            raise ValueError("interpolation weights must lie strictly between 0 and 1")
        return sorted(set(values))

    @field_validator("merge")
    @classmethod
    def _distinct_merges(cls, values: list[MergeSpec]) -> list[MergeSpec]:
        return check_specs(values)

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
    for spec in config.merge:
        unknown = sorted(set(spec.methods or ()) - seen)
        if unknown:
            raise ForgetlessError(f"merge {spec.key}: methods {', '.join(unknown)} are not "
                                  f"compare entries (entries: {', '.join(sorted(seen))})")
    return planned
