"""Corpus scale on real Ray clusters started with `ray start` (separate raylets, separate object
stores): preprocess SIGKILLed half-way and continued with --resume, and a cluster of a head and two
worker nodes running preprocess → train → segment → evaluate as a `ray job submit` job with every
input and output on the local S3 server, then segment with one of its actors' nodes killed a third
of the way and its driver half-way, continued with --resume. The growth curves themselves are
`python -m pipelines.bench scale` (docs/scale.md)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.bench.cluster import LocalCluster
from pipelines.bench.scale import written_rows as _rows_written

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _run(cluster: LocalCluster, module: str, argv: list[str], kill_at: tuple[Path, int] | None = None,
         timeout: float = 600) -> tuple[int, bool, str]:
    """`python -m module argv` joining `cluster`; SIGKILLed once `kill_at`'s folder holds that many
    rows. (exit code, killed, output)."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed, deadline = False, time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if kill_at is not None and not killed and _rows_written(kill_at[0]) >= kill_at[1]:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    return proc.returncode, killed, out


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(head_cpus=2, object_store_mb=300) as c:
        yield c


def test_a_preprocess_killed_half_way_resumes_to_the_same_dataset(cluster, tmp_path):
    from pipelines.lib.parquet_store import load_arrays
    train, test = 900, 100                     # 20 parts of 50 rows: killed after 10 of them
    argv = ["--source", "tm-dsprites", "--preset", "cpu-32", "--train", str(train), "--test", str(test),
            "--rows-per-file", "50", "--quiet"]
    code, _, out = _run(cluster, "pipelines.preprocess", [*argv, "--out", str(tmp_path / "whole")])
    assert code == 0, out[-3000:]
    target = tmp_path / "killed"
    code, killed, out = _run(cluster, "pipelines.preprocess", [*argv, "--out", str(target)],
                             kill_at=(tmp_path / ".killed.partial", 500))
    assert killed and not (target / "_manifest.json").exists()
    kept = _rows_written(tmp_path / ".killed.partial")
    code, _, out = _run(cluster, "pipelines.preprocess", [*argv, "--out", str(target), "--resume"])
    assert code == 0, out[-3000:]
    manifest, whole = (json.loads((d / "_manifest.json").read_text()) for d in (target, tmp_path / "whole"))
    assert manifest["run"]["parts_reused"] * 50 >= kept - 50 and manifest["run"]["inputs_processed"] <= 0.55 * (train + test)
    assert manifest["sample_id_checksum"] == whole["sample_id_checksum"] and manifest["splits"] == whole["splits"]
    a, b = load_arrays(str(target)), load_arrays(str(tmp_path / "whole"))
    assert a["sample_id"].tolist() == list(range(train + test))
    assert a["images"].tobytes() == b["images"].tobytes() and a["masks"].tobytes() == b["masks"].tobytes()


def test_a_benchmark_stopped_with_sigterm_stops_its_cluster():
    """`kill <bench>` must not leave raylets behind: LocalCluster turns SIGTERM into SystemExit."""
    from pipelines.bench.cluster import processes
    code = ("import time\nfrom pipelines.bench.cluster import LocalCluster\n"
            "with LocalCluster(head_cpus=1) as c:\n    print(c.temp, flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    temp = proc.stdout.readline().strip()
    assert processes(temp), "the cluster did not start"
    proc.terminate()
    assert proc.wait(60) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while processes(temp) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes(temp)


# ---- several nodes, object storage, ray job submit -------------------------------------------------
N_PHOTOS = 500
@pytest.fixture(scope="module")
def three_nodes(s3_server):
    """A head without CPUs and two worker nodes of one CPU each (separate raylets and object
    stores), whose every process sees the local S3 server, with the job server. No MLflow
    variable (an earlier test's mlflow.set_tracking_uri may leave one in this process): a job's
    entrypoint inherits the cluster's environment, and the defaults are what a user's job gets."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cluster = LocalCluster(head_cpus=0, workers=[1, 1], dashboard=True, object_store_mb=200)
    with cluster as c:
        yield c


def _submit(cluster: LocalCluster, args: list[str], timeout: float = 1200) -> subprocess.CompletedProcess:
    """`ray job submit ARGS` to the cluster's job server (retried while its job agent starts)."""
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard, *args]
    for _ in range(6):                        # the job agent may need a few seconds after `ray start`
        proc = subprocess.run(submit, env=cluster.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def test_a_job_with_its_working_dir_refuses_outputs_inside_rays_copy_of_it(three_nodes, tmp_path):
    """`ray job submit --working-dir .` (cluster/README.md's form): the job runs in Ray's temporary
    copy of the checkout, so the default outputs (runs/ray, ./mlflow.db) would be deleted with it;
    the stage refuses both by name before Ray Train starts."""
    proc = _submit(three_nodes, ["--working-dir", str(ROOT), "--", sys.executable, "-m", "pipelines.train",
                                 "--data", str(tmp_path / "data"), "--workers", "2", "--iterations", "3"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "inside Ray job" in out and "working_dir_files" in out, out[-3000:]
    assert "--storage runs/ray" in out and "--tracking-uri sqlite:///mlflow.db" in out, out[-3000:]


def test_a_submitted_job_runs_every_stage_on_both_worker_nodes_with_everything_on_s3(three_nodes, tmp_path):
    from pipelines.lib import locations
    root = "s3://drc-test/multinode"
    before = {p for p in ROOT.iterdir()}
    mlflow_db = tmp_path / "mlflow.db"
    # no --working-dir: the nodes import this checkout (PYTHONPATH) and the job runs in the nodes' own
    # folder, which must stay empty
    proc = _submit(three_nodes, ["--", sys.executable, "-m", "tests.multinode_job", "--root", root,
                                 "--images", str(N_PHOTOS), "--tracking-uri", f"sqlite:///{mlflow_db}"])
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    workers = set(result["workers"])
    print("multi-node job, seconds per stage:", result["seconds"])
    assert len(workers) == 2
    # every stage ran on both worker nodes (the head has no CPU)
    assert set(result["corpus_nodes"]) == workers
    assert set(result["preprocess"]["nodes"]) == workers and result["preprocess"]["ok"] == N_PHOTOS
    assert set(result["train"]["nodes"]) == workers                  # one worker per node
    assert set(result["segment"]["nodes"]) == workers and result["segment"]["ok"] == N_PHOTOS
    assert set(result["evaluate"]["nodes"]) == workers and result["evaluate"]["evaluated"] == N_PHOTOS
    # every output is on s3://, and nothing was written to a local path but the MLflow store asked for
    assert all(result["outputs"].values()) and result["train"]["checkpoint"].startswith(root)
    assert locations.exists(f"{root}/eval/report.html") and locations.exists(f"{root}/eval/per_image.parquet")
    assert list(three_nodes.cwd.iterdir()) == []
    assert {p for p in ROOT.iterdir()} == before and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlruns"]


def test_segment_survives_an_actors_node_lost_and_resumes_after_its_driver_is_killed(three_nodes, tmp_path):
    """After the job above: segment its photos again; SIGKILL one worker node (its raylet, its actor
    and every process under it) a third of the way (the run goes on with the other node's actor),
    then the driver half-way; a rerun without --resume is refused; bring the node back and --resume:
    each photo once, the resumed run did only what was not written, the masks are the job's, and a
    --resume of the finished output does nothing."""
    from pipelines import segment
    from pipelines.lib import locations
    root = "s3://drc-test/multinode"
    model = locations.subfolders(f"{root}/runs/multinode", "checkpoint_")[-1]
    out, staging = tmp_path / "seg", tmp_path / ".seg.partial"
    # the job's settings (the batch size too: masks are byte-identical to a run with the same settings)
    argv = ["--model", model, "--input", f"{root}/photos", "--output", str(out), "--steps", "2", "--actors", "2",
            "--batch-size", "64", "--rows-per-file", "64", "--quiet"]
    env = {**three_nodes.env, "RAY_ADDRESS": three_nodes.address}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.segment", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lost = None
    while proc.poll() is None and _rows_written(staging) < N_PHOTOS // 2:
        if lost is None and _rows_written(staging) >= N_PHOTOS // 3:
            lost = three_nodes.kill_node(1)
        time.sleep(0.05)
    assert lost and proc.poll() is None, "segment finished before half of it was written: make it slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    kept = _rows_written(staging)
    assert not (out / "_manifest.json").exists()
    with pytest.raises(SystemExit, match="interrupted run left its parts .* --resume"):
        segment.main(argv)                        # neither --resume nor --overwrite: refused before Ray starts
    three_nodes.start_node(1)
    code, _, log = _run(three_nodes, "pipelines.segment", [*argv, "--resume"])
    assert code == 0, log[-3000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    rows = segment.read_output(str(out), ok_only=False)
    assert rows.num_rows == N_PHOTOS and len(np.unique(rows["sample_id"].to_numpy())) == N_PHOTOS
    assert manifest["run"]["inputs_processed"] == N_PHOTOS - kept <= 0.55 * N_PHOTOS
    mine = segment.read_output(str(out), ["sample_id", "key", "mask", "prob"])
    theirs = segment.read_output(f"{root}/seg", ["sample_id", "key", "mask", "prob"])
    assert mine.equals(theirs)
    code, _, log = _run(three_nodes, "pipelines.segment", [*argv, "--resume"])   # a finished output: nothing to do
    assert code == 0 and json.loads((out / "_manifest.json").read_text()) == manifest, log[-3000:]
