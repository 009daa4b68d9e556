import os

import pytest
import torch

from drc_core.presets import get_config


# torch's threads in each pytest process: the machine's cores shared by the xdist workers (2 cores,
# `-n 2`: one each; alone: both). More threads than cores make a busy test starve the Ray workers of
# the test beside it (their DDP ranks wait on each other at every all-reduce).
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # the same for what a test starts: stage subprocesses, their Ray workers, this worker's Ray instance
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def tiny_config():
    """cpu-32 narrowed further so model tests run in milliseconds, with every component of the
    paper switched on (the CPU preset itself leaves re-assignment and λ_⊥ off)."""
    return get_config("cpu-32", {"ablation.pixel_reassign": True, "ablation.ortho": True, "model.fg_dim": 8, "model.reassign_dim": 8, "model.trunk_channels": 8,
                                 "model.up_widths": (8, 8, 8), "model.classifier_widths": (4, 4, 4),
                                 "model.ebm_hidden": 16, "model.ebm_reassign_hidden": 16,
                                 "langevin.posterior_steps": 2, "langevin.prior_steps": 2,
                                 "langevin.prior_pool_size": 16, "optim.batch_size": 4})


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if an entry point gets as far as starting (or joining) Ray: for errors
    that must come before any worker starts."""
    import pipelines.lib.ray_env
    import pipelines.train

    def refuse(*args, **kwargs):
        pytest.fail("Ray was started before the error")
    monkeypatch.setattr(pipelines.train, "init_ray", refuse)
    monkeypatch.setattr(pipelines.lib.ray_env, "init_ray", refuse)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto's, in a thread of this process) with one bucket, `drc-test`, for
    the object-storage tests; returns its endpoint URL.

    Its endpoint and dummy credentials go into this process's environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, …), where pyarrow's S3 client (so Ray Data, Ray Train, Ray Tune and
    pipelines.lib.locations) and boto3 read them, as on a real cluster they read the real ones.
    Ray's worker processes inherit the environment of the process that starts Ray, so
    `ray_local` starts this server first in every session that collected a test using it."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)          # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="drc-test")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(request):
    """One local Ray instance for the whole session: 2 CPUs, small object store, the dashboard on
    127.0.0.1: Ray Train's PlacementGroupCleaner needs its State API to free the placement group
    of a trainer whose controller was killed (a trial ASHA stopped); without it the group's CPUs
    stay reserved and the next trials wait forever. When the session runs object-storage tests,
    the local S3 server starts first so that every Ray worker inherits its endpoint."""
    import os
    if any("s3_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("s3_server")
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                 "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}.items():
        os.environ.setdefault(k, v)
    import ray

    from pipelines.lib.ray_env import _free_port
    # A dashboard port of its own, and the State API of this instance's processes pointed at it (as
    # init_ray does): under `pytest -n 2` the other worker's session has a Ray instance too, and Ray
    # Train's placement-group cleaner, left to guess, finds two and gives up. Only the instance gets
    # the address: a stage a test starts as a subprocess runs its own Ray, whose cleaner must not ask
    # this one (an actor it does not find there counts as dead, and it frees the run's group).
    port = _free_port("127.0.0.1", preferred=0)
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 object_store_memory=300 * 1024 ** 2, log_to_driver=False)
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS")
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# ---- tiers: the fast tier is `-m "not integration and not slow"` ------------------------------------
STARTS_SERVICES = ("ray_local", "s3_server")


# The longest modules first (`--durations` of the full suite on 2 cores): under `pytest -n 2` (whole
# modules per worker: `--dist loadfile` in pyproject.toml) the long ones start at once and the many
# short ones even out the end.
LONGEST_FIRST = ("test_scale", "test_learning", "test_segment", "test_train", "test_faults", "test_quickstart",
                 "test_bench_quality", "test_train_cluster", "test_tune", "test_object_storage")


def pytest_collection_modifyitems(config, items):
    """Every test that starts Ray or the S3 server, itself or through a fixture it uses, is an
    integration test whether or not its module says so (the fast tier cannot pick one up by
    accident); `learning` tests are also `slow`. Modules run longest first (LONGEST_FIRST)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
    for item in items:
        if any(name in item.fixturenames for name in STARTS_SERVICES):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("learning"):
            item.add_marker(pytest.mark.slow)


# ---- fault-injection suite: a results table (python -m pytest -m faults) ------------------------
_fault_rows: list[tuple[str, str, float, str]] = []


def pytest_runtest_logreport(report):
    """Collect one row per `faults` case: its result, time and the outcome it recorded with
    `record_property("outcome", …)` (what the run ended in: completed, or which clear error)."""
    if "faults" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = dict(report.user_properties).get("outcome", "")
        if report.outcome == "failed":
            outcome = (report.longreprtext.strip().splitlines() or ["failed"])[-1][:160]
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            outcome = str(report.longrepr[2])[:160]
        case = report.nodeid.split("::", 1)[-1]
        _fault_rows.append((case, report.outcome, report.duration, outcome))


def pytest_terminal_summary(terminalreporter):
    if not _fault_rows:
        return
    width = min(max(len(r[0]) for r in _fault_rows), 90)
    tr = terminalreporter
    tr.section("fault injection: case → outcome")
    tr.write_line(f"{'case':<{width}}  {'result':<7} {'seconds':>7}  outcome")
    for case, result, seconds, outcome in _fault_rows:
        tr.write_line(f"{case[:width]:<{width}}  {result:<7} {seconds:>7.1f}  {outcome}")
    passed = sum(r[1] == "passed" for r in _fault_rows)
    tr.write_line(f"{passed}/{len(_fault_rows)} cases ended as designed (a completed run or a clear error, "
                  f"nothing previously written lost); {sum(r[2] for r in _fault_rows):.0f} s in the cases")


# ---- where the suite's time goes: DRC_TEST_CPU=FILE records, per test, its wall seconds and the ----
# machine's busy CPU-seconds over it (every process: Ray's workers and `ray start` nodes included),
# from /proc/stat. On a machine running nothing else and one pytest process (no -n), wall ≫ busy
# means the test waits (a timeout, a poll, a start-up), not computes.
def _busy_seconds() -> float:
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")      # all but idle and iowait


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    target = os.environ.get("DRC_TEST_CPU")
    if not target:
        yield
        return
    import json
    import time
    t0, b0 = time.perf_counter(), _busy_seconds()
    yield
    row = {"test": item.nodeid, "wall": time.perf_counter() - t0, "busy": _busy_seconds() - b0,
           "start": time.time() - (time.perf_counter() - t0), "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}
    with open(target, "a") as f:
        f.write(json.dumps(row) + "\n")
