"""pipelines.train beyond one local instance: a node lost mid-run, and `ray job submit`.

Both need their own Ray cluster, so they run in subprocesses next to the session instance.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipelines.lib import checkpoints as ckpt
from tests.procs import kill_tree
from tests.test_train import TINY, dataset, tracking_uri  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    return env


@pytest.mark.faults
def test_a_node_removed_mid_run_training_completes_on_the_remaining_node(dataset, tmp_path, record_property):
    proc = subprocess.run([sys.executable, "-m", "tests.node_loss_drill", dataset, str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("DRILL ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("DRILL "):])
    assert out.get("error") is None and out["finished"] and out["removed_after"] == "checkpoint_00000005"
    starts = [e for e in out["events"] if e["event"] == "start"]
    assert {e["world_size"] for e in starts} == {1, 2}, "one worker per node, then one on the survivor"
    (restored,) = [e for e in out["events"] if e["event"] == "restored"]
    assert restored["world_size"] == 1 and restored["saved_world_size"] == 2 and restored["iteration"] >= 5
    meta, records = ckpt.verify(Path(out["summary"]["checkpoint"]))
    assert meta["iteration"] == 40 and meta["world_size"] == 1 and records[0]["count"] == 48
    record_property("outcome", f"completed: node removed after checkpoint 5, resumed from {restored['iteration']} "
                               "on 1 worker (chains re-sharded), finished at 40")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_start_head_and_job_submit_run_pipelines_train(dataset, tracking_uri, tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")          # short: Ray's socket paths must fit
    dash = _free_port()
    ports = [f"--port={_free_port()}", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}"]
    env = _env()
    # a job's entrypoint inherits the cluster's environment: without MLflow's variable (which an
    # earlier test's mlflow.set_tracking_uri leaves in this process) the tracking store is the default
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats", *ports],
                   env=env, check=True, capture_output=True, timeout=180)
    submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
              "--", sys.executable, "-m", "pipelines.train", "--data", dataset, "--workers", "2",
              "--iterations", "3", "--checkpoint-every", "3", "--eval-every", "0", "--grid-every", "0",
              "--name", "submitted", *TINY]

    def run_job(extra):
        for attempt in range(6):          # the job agent may need a few seconds after `ray start`
            proc = subprocess.run(submit + extra, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in proc.stdout + proc.stderr:
                return proc
            subprocess.run(["sleep", "5"])
        return proc
    storage = tmp_path / "ray"
    try:
        # the defaults (runs/ray, ./mlflow.db) would land in Ray's temporary copy of the working
        # directory, which Ray deletes: the job fails at once, naming both
        proc = run_job([])
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "inside Ray job" in out, out[-3000:]
        assert "--storage runs/ray" in out and "--tracking-uri sqlite:///mlflow.db" in out, out[-3000:]
        proc = run_job(["--storage", str(storage), "--tracking-uri", tracking_uri])
        assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
        first = next(x for x in proc.stdout.splitlines() if x.startswith("train submitted:"))
        assert f"checkpoints → {storage}/submitted" in first and tracking_uri in first
    finally:
        kill_tree(temp)
    # after the cluster is gone, what the job wrote is still there
    meta, records = ckpt.verify(storage / "submitted" / "checkpoint_00000003")
    assert meta["world_size"] == 2 and len(records) == 2
    import mlflow
    run = mlflow.tracking.MlflowClient(tracking_uri).get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "submitted"
    client = mlflow.tracking.MlflowClient(tracking_uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "gen_loss")]
    assert steps == [1, 2, 3], steps                  # one value per EM iteration the job ran
