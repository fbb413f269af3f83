"""MLflow tracking for ``compare``: one MLflow run per method (params, metrics, artifacts).

The default store is a SQLite file inside the compare folder, so results travel with the folder
and need no server; ``tracking_uri`` points at a server instead. The client API is used rather
than ``mlflow.start_run`` so that nothing global changes in the caller's process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from forgetless.io import fault_point

_BAD_CHARS = re.compile(r"[^0-9A-Za-z_\-. /:]")
_MAX_PARAM = 6000  # MLflow's limit on a parameter value
_MAX_KEY = 250  # MLflow's limit on a metric or parameter name


def default_tracking_uri(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/mlflow.db`` (absolute, so it works from any working dir)."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}``, for MLflow's flat parameter names."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def mlflow_key(name: str) -> str:
    """``name`` as a valid MLflow metric / parameter name, unchanged when it already is one.

    MLflow allows alphanumerics, ``_ - . space / :`` and, because names may become file paths,
    rejects one that is not already normalised (``//``, ``./``, ``..``, a leading or trailing
    ``/``), all at most 250 characters. A name built from a file path (a compare target like
    ``/data/x.jsonl``) breaks all of these, so: bad characters become ``_``, empty and ``.``
    path parts go, ``..`` parts become ``__``, and a cut name keeps a digest of the whole.
    """
    parts = [part for part in _BAD_CHARS.sub("_", name).split("/") if part not in ("", ".")]
    key = "/".join("__" if part == ".." else part for part in parts) or "_"
    if key.startswith(".."):
        key = "_" + key
    if len(key) > _MAX_KEY:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        key = f"{key[: _MAX_KEY - 9].rstrip('/')}_{digest}"
    return key


class Tracker:
    """Logs finished compare entries to one MLflow experiment."""

    def __init__(self, uri: str, experiment: str, artifact_dir: str | Path) -> None:
        for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            # Artifacts beside the SQLite store, not in ./mlruns of whatever the cwd is.
            location = Path(artifact_dir).resolve().as_uri() if uri.startswith("sqlite") else None
            self.experiment_id = self.client.create_experiment(experiment, location)

    def has_run(self, run_id: str | None) -> bool:
        """True when ``run_id`` exists and finished in this store (reuse it, log nothing)."""
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except Exception:  # MlflowException for an unknown id, store errors alike
            return False
        return run.info.experiment_id == self.experiment_id and run.info.status == "FINISHED"

    def log_run(
        self,
        name: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float | None],
        series: Mapping[str, Iterable[tuple[int, float]]] = (),
        artifacts: Iterable[Path] = (),
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """One finished MLflow run; returns its id. Non-finite metric values are skipped."""
        from mlflow.entities import Metric, Param, RunTag

        run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags or {}))
        run_id = run.info.run_id
        try:
            flat = flatten(params)
            param_list = [Param(mlflow_key(k), str(v)[:_MAX_PARAM]) for k, v in flat.items()]
            now = int(run.info.start_time)
            metric_list = [
                Metric(mlflow_key(k), float(v), now, 0) for k, v in metrics.items()
                if v is not None and math.isfinite(float(v))
            ]
            for key, points in dict(series).items():
                metric_list += [
                    Metric(mlflow_key(key), float(v), now, int(step)) for step, v in points
                    if math.isfinite(float(v))
                ]
            for start in range(0, max(len(param_list), len(metric_list)), 100):
                self.client.log_batch(
                    run_id,
                    metrics=metric_list[start : start + 100],
                    params=param_list[start : start + 100],
                    tags=[RunTag("forgetless.entry", name)] if start == 0 else [],
                )
            for path in artifacts:
                if Path(path).is_file():
                    self.client.log_artifact(run_id, str(path))
            fault_point("mlflow.log")  # logged, not yet marked FINISHED
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return run_id
