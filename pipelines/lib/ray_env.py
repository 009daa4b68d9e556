"""Starting or joining Ray the same way from every entry point."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

# Quiet, fast defaults for local runs; a cluster's own environment wins (setdefault).
_DEFAULT_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "0",
}


def submitted_job() -> str | None:
    """The submission id when this process is the entrypoint of a `ray job submit` (Ray's job
    supervisor hands it its job config in RAY_JOB_CONFIG_JSON_ENV_VAR), else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        meta = {}
    return str(meta.get("job_submission_id") or "unknown")


class ScratchPathError(ValueError):
    """A job would write where Ray deletes it."""


def _local_path(location: str) -> str | None:
    """The filesystem path a --storage / --output / tracking URI writes to, or None for a remote URI."""
    if location.startswith("sqlite:///"):
        return location[len("sqlite:///"):]
    if location.startswith("file://"):
        return location[len("file://"):]
    return None if "://" in location else location


def check_job_outputs(stage: str, outputs: dict[str, str | None]) -> None:
    """Inside a submitted Ray job, refuse every output location that would land in the job's
    scratch copy of its working directory (`…/runtime_resources/working_dir_files/_ray_pkg_…`,
    deleted by Ray when the job's cluster session ends): a relative path, or a path under the
    job's current directory. One error names every offending flag. Outside a job: nothing."""
    job = submitted_job()
    if job is None:
        return
    cwd = Path.cwd().resolve()
    bad = []
    for flag, location in outputs.items():
        path = None if location is None else _local_path(str(location))
        if path is None:
            continue
        resolved = (cwd / path).resolve()
        if not Path(path).is_absolute() or resolved == cwd or cwd in resolved.parents:
            bad.append(f"{flag} {location}")
    if bad:
        raise ScratchPathError(
            f"{stage}: inside Ray job {job}, {'; '.join(bad)} would be written into the job's temporary copy of "
            f"its working directory ({cwd}), which Ray deletes: give each an absolute path on storage that outlives "
            f"the job, or a URI (s3://…, gs://…; an MLflow server http://… or sqlite:////abs/path/mlflow.db for "
            f"--tracking-uri / MLFLOW_TRACKING_URI)")


# Blocks per Ray Data execution in the stages that make one block per unit of work (segment,
# evaluate): each map operator keeps the stats of every block it made until its execution ends
# (~12 KB per block in segment's driver: +195 B/image at 64-image units, measured from 10⁴ to 10⁶
# images by `bench scale`), so a corpus goes through in windows of this many blocks, one execution
# each, and the driver holds one window's.
WINDOW_BLOCKS = 2048


def end_window() -> None:
    """After a window's execution: collect the cycles its operators leave. Ray Data's finished
    operators sit in reference cycles that hold the window's input blocks (the driver's own small
    objects, one per unit) until Python's full collection, which a streaming driver rarely reaches:
    measured in segment's driver, 1 such object per unit left after every window (38, 76, 111 after
    windows of 32 units), none with a collection after each window."""
    import gc
    gc.collect()


def joins_cluster(address: str | None = None) -> bool:
    """Whether init_ray(address) joins a running cluster rather than starting a local instance."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join `address` (or RAY_ADDRESS, as under `ray job submit`), or else start a local instance of
    its own whose dashboard binds to 127.0.0.1 (not a cluster that `ray start` runs on the machine)."""
    import ray

    for k, v in _DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return ray
    if joins_cluster(address):
        ray.init(address=address, **kwargs)
    else:
        # workers of a local instance import drc_core/pipelines from this checkout wherever the
        # driver was started (under `ray job submit --working-dir` the working dir does this)
        root = str(Path(__file__).resolve().parents[2])
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
        # Ray Train's preemption watcher serves cloud nodes that can be taken away; on a local
        # instance it only logs an E-level line about its constructor arguments
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        if not kwargs["include_dashboard"]:
            env = dict(kwargs.get("runtime_env") or {})
            env.setdefault("worker_process_setup_hook", "pipelines.lib.ray_env.quiet_state_api_warnings")
            kwargs["runtime_env"] = env
        with _dashboard_port_lock() if kwargs["include_dashboard"] else contextlib.nullcontext():
            if kwargs["include_dashboard"]:
                _pin_state_api(kwargs)
            # "local": a new instance even where a cluster started with `ray start` runs on this machine
            # (Ray's default would join that one, which joins_cluster() and the stage's settings don't expect)
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return ray


@contextlib.contextmanager
def _dashboard_port_lock():
    """Held from choosing a dashboard port until ray.init returns (the dashboard is listening by
    then): two local instances started at once on one machine (two studies; a study beside a test)
    would otherwise both find 8265 free, and the second dashboard fails to bind it ("Failed to find
    a valid port for dashboard", seen in CI). A lock file in the temporary folder, machine-wide."""
    import fcntl
    with open(Path(tempfile.gettempdir()) / "drc-ray-dashboard-port.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def actor_restarts(address: str | None = None) -> int:
    """max_restarts for a stage's Ray Data actor pool. On a cluster, -1 (Ray Data's default): an
    actor on a lost node comes back. On a local instance there is no node to lose, a dead actor
    is a crash that would recur, and with restarts on Ray logs an E-level line for every pool
    ("constructor arguments in the object store and max_restarts > 0"): 0."""
    return -1 if joins_cluster(address) else 0


def wait_for_free_cpus(cpus: float, timeout: float = 10.0) -> bool:
    """Wait until `cpus` CPUs show as free in Ray's resource view, or `timeout` seconds; whether they
    did. The view is synced asynchronously, so the CPUs of tasks that have just run show as held a
    moment longer, and Ray Data warns that the cluster "does not have any available CPUs … will
    hang" when it starts a dataset then (segment on 2 cores, both CPUs shown held 2 s after start)."""
    import ray
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < cpus:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class _DropProgressBarsDisabled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


def set_progress_bars(ctx, enabled: bool) -> None:
    """Ray Data progress bars on or off; off (a --quiet run) without Ray Data's warning saying so
    and without its INFO lines ("Starting execution of Dataset …"); its warnings still show."""
    ctx.enable_progress_bars = enabled
    if enabled:
        return
    log = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _DropProgressBarsDisabled) for f in log.filters):
        log.addFilter(_DropProgressBarsDisabled())
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def quiet_state_api_warnings() -> None:
    """Worker setup hook of a local instance without a dashboard: there is no State API, so
    Ray Train's PlacementGroupCleaner warns "Failed to query Ray Train Controller actor state"
    every few seconds for the whole run (129 lines in one quickstart). Its only job, freeing the
    placement group of a Tune trial that a scheduler stopped, needs the dashboard; runs that
    tune start one (`_pin_state_api`)."""
    import logging
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)


def _free_port(host: str, preferred: int = 8265) -> int:
    """Ray's usual dashboard port if it is free, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host}")


def _pin_state_api(kwargs: dict) -> None:
    """Point the State API of every process of the local instance about to start at that
    instance's own dashboard.

    Ray Train's PlacementGroupCleaner (a detached actor per Train run) asks the State API
    whether the run's controller is alive and frees the run's placement group once it is
    dead; that is the only thing that frees the group of a Ray Tune trial that the scheduler
    stopped (the trial actor is killed and its controller dies with it, but a placement group
    lives as long as the job that created it). The cleaner gives the State API no address, so
    Ray auto-detects the cluster from the GCS processes running on the machine; with a second
    Ray instance on the machine (the pytest session's, another user's) that raises
    "Found multiple active Ray instances", the cleaner's thread dies, and the stopped trial's
    CPUs stay reserved until the study ends. RAY_API_SERVER_ADDRESS, set before ray.init so
    that the raylet and every worker inherit it, removes the guess. The dashboard needs a port
    known in advance for that: 8265 if free, else a free one (the check-then-bind gap is the
    same one Ray's own port probing has)."""
    host = kwargs["dashboard_host"]
    kwargs.setdefault("dashboard_port", _free_port(host))
    url_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{url_host}:{kwargs['dashboard_port']}"
