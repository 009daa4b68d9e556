"""MLflow tracking for the pipelines: one run per job, logged through an explicit run id.

The driver creates the run (params = the resolved config) and logs the final checkpoint and the
model; rank 0 of the Ray Train workers logs metrics and image grids into the same run by id, so
a worker restarted after a failure keeps logging into the run it belongs to.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

DEFAULT_EXPERIMENT = "drc"


def default_experiment(fallback: str = DEFAULT_EXPERIMENT) -> str:
    """$MLFLOW_EXPERIMENT_NAME (MLflow's own variable) when set, else `fallback`."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or fallback
DEFAULT_STORE = "sqlite:///mlflow.db"


def configured_uri(flag: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the embedded store ./mlflow.db, as given."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE


def tracking_uri(flag: str | None = None) -> str:
    """configured_uri(flag) as an absolute URI (Ray workers run in other folders)."""
    uri = configured_uri(flag)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:                                       # a plain folder path
        uri = str(Path(uri).resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    """For the embedded sqlite store keep artifacts next to the database, as an absolute path."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    return None


def client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception:                                            # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def start_run(uri: str, run_name: str, params: dict, *, experiment: str = DEFAULT_EXPERIMENT,
              tags: dict | None = None, parent_run_id: str | None = None) -> str:
    """Create a run, log params (values longer than MLflow's limit are truncated) and return its id."""
    from mlflow.entities import Param
    c = client(uri)
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags)
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for lo in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[lo:lo + 100])
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import math

    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())
             if isinstance(v, (int, float)) and math.isfinite(float(v))]
    client(uri).log_batch(run_id, metrics=items)


def log_image(uri: str, run_id: str, image, artifact_file: str) -> None:
    client(uri).log_image(run_id, image, artifact_file=artifact_file)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)
