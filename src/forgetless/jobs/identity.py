"""One recipe for a run's identity: the hash that names and keys a run folder.

A finished folder is reused while its identity holds, so the identity must say everything a
result depends on (train settings, eval settings, model, data, metric set) and nothing else
(where it writes, how it logs). Each job's profile below is pinned to the hashes its folders
already carry (tests/test_run_identity.py): a profile that changed would retrain every folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from forgetless import runs
from forgetless.config import TrainConfig
from forgetless.eval.result import METRICS_VERSION
from forgetless.methods.options import DEFAULT_OPTIONS, LATER_OPTIONS

FLOAT32 = "float32"  # what every run evaluated in before the dtype joined the identity
# Train keys added after run folders existed (data mixing, the remedies' options): a run's
# identity names them only away from these defaults, so earlier folders are still reused.
LATER_KEYS: Mapping[str, Any] = {"mix": [], "mix_budget": "steps", **LATER_OPTIONS}

# Keys that change where or how a run is logged or computed, not what it learns.
COMPARE_UNHASHED = frozenset({"output_dir", "report_to", "logging_steps", "save_steps", "resume",
                              "device", "gradient_checkpointing", "update_stats_every",
                              "update_stats_sample"})
# Keys added after compare folders existed: hashed only away from the value earlier runs used
# (dtype resolved first: "auto" is bfloat16 on a CUDA device), so those runs stay reusable.
COMPARE_HASHED_IF_NOT: Mapping[str, Any] = {
    "dtype": FLOAT32, "fp32_master_weights": True, "attn_implementation": "sdpa",
    **{name: getattr(DEFAULT_OPTIONS, name) for name in
       ("freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model")},
    **LATER_KEYS}
# A tune recipe also leaves out whether it saves weights and how its monitor watches it.
TUNE_UNHASHED = frozenset({"output_dir", "report_to", "logging_steps", "save_steps", "resume",
                           "save_model", "update_stats_every", "update_stats_sample",
                           "monitor_every", "monitor_max_kl", "monitor_action"})


def identity(parts: Mapping[str, Any], metrics_version: bool = True) -> str:
    """The hash of ``parts``; with ``metrics_version`` the evaluator's metric set joins it, so a
    newer set re-evaluates instead of mixing sets."""
    data = {**parts, "metrics_version": METRICS_VERSION} if metrics_version else dict(parts)
    return runs.config_hash(data)


def with_dtype(settings: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """``settings`` plus the dtype a run computes in, named only away from float32."""
    return dict(settings) if dtype == FLOAT32 else {**settings, "dtype": dtype}


def train_settings(train: TrainConfig, unhashed: Iterable[str],
                   hashed_if_not: Mapping[str, Any] | None = None,
                   dtype: str | None = None) -> dict[str, Any]:
    """What a run learns: the resolved TrainConfig minus ``unhashed`` keys and keys still at
    the value (``hashed_if_not``) earlier runs used; ``dtype``: the resolved one replaces
    ``auto`` (float32 then has no master weights)."""
    data = train.model_dump()
    if dtype is not None:
        data["dtype"] = dtype
        if dtype == FLOAT32:
            data.pop("fp32_master_weights")  # master weights only exist for a half dtype
    legacy = hashed_if_not or {}
    skip = set(unhashed)
    return {k: v for k, v in data.items()
            if k not in skip and not (k in legacy and v == legacy[k])}


def compare_train_key(train: TrainConfig, dtype: str) -> str:
    """A compare method's identity (``dtype``: the run's resolved dtype)."""
    return identity(train_settings(train, COMPARE_UNHASHED, COMPARE_HASHED_IF_NOT, dtype),
                    metrics_version=False)


def tune_train_key(train: TrainConfig) -> str:
    """A tune trial's or test run's identity; it also names a trial's folder."""
    return identity(train_settings(train, TUNE_UNHASHED, LATER_KEYS), metrics_version=False)


def chained_key(previous: str, settings: Mapping[str, Any]) -> str:
    """A continual stage's identity: the previous stage's (or the base evaluation's) key and
    the stage's raw TrainConfig keys (where it writes left out)."""
    return identity({"previous": previous, "train": {k: v for k, v in settings.items()
                                                     if k != "output_dir"}},
                    metrics_version=False)
