"""pipelines.lib.ray_env: a local instance started beside another Ray instance still frees the
placement group of a Ray Train run whose controller was killed (a Tune trial ASHA stopped)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_cluster import _env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_a_killed_train_run_frees_its_placement_group_beside_another_ray_instance(ray_local, tmp_path):
    # ray_local (this session's instance) is the other instance. Without the State API address
    # pinned by init_ray, Ray Train's PlacementGroupCleaner fails with "Found multiple active
    # Ray instances" and the group stays CREATED (1 CPU reserved) until the driver exits.
    proc = subprocess.run([sys.executable, "-m", "tests.pg_cleanup_drill", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("DRILL ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("DRILL "):])
    assert out["worker_started"] and out["worker_groups"] == 1 and out["ray_instances"] >= 2, out
    assert set(out["states"].values()) == {"REMOVED"} and out["cpus_free"] == 2.0, out
    assert out["api_server"].startswith("http://127.0.0.1:"), out


@pytest.mark.integration
def test_two_local_instances_with_dashboards_started_at_once_both_come_up():
    # both would find 8265 free and the second dashboard fail to bind it (seen in CI: a study and
    # the drill above on the two xdist workers) without init_ray's machine-wide port lock
    code = ("import os\nfrom pipelines.lib.ray_env import init_ray\n"
            "init_ray(num_cpus=1, include_dashboard=True, log_to_driver=False)\n"
            "print('API', os.environ['RAY_API_SERVER_ADDRESS'], flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    urls = [next(x for x in o[0].splitlines() if x.startswith("API ")) for o in outs]
    assert len(set(urls)) == 2, urls


# ---- inside `ray job submit`: nothing may be written into the job's scratch copy ---------------

def _as_job(monkeypatch, cwd):
    import json
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_test"}}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(cwd)


def test_outside_a_job_relative_outputs_are_fine(tmp_path, monkeypatch):
    from pipelines.lib.ray_env import check_job_outputs, submitted_job
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert submitted_job() is None
    check_job_outputs("train", {"--storage": "runs/ray", "--tracking-uri": "sqlite:///mlflow.db"})


def test_inside_a_job_relative_defaults_are_refused_naming_every_flag(tmp_path, monkeypatch):
    from pipelines.lib.ray_env import ScratchPathError, check_job_outputs, submitted_job
    from pipelines.lib.tracking import configured_uri
    scratch = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    scratch.mkdir(parents=True)
    _as_job(monkeypatch, scratch)
    assert submitted_job() == "raysubmit_test"
    with pytest.raises(ScratchPathError) as err:
        check_job_outputs("train", {"--storage": "runs/ray", "--tracking-uri": configured_uri(None)})
    msg = str(err.value)
    assert msg.startswith("train: inside Ray job raysubmit_test") and str(scratch) in msg
    assert "--storage runs/ray" in msg and "--tracking-uri sqlite:///mlflow.db" in msg
    with pytest.raises(ScratchPathError, match="--output .*_ray_pkg_abc/out"):    # absolute, but inside the copy
        check_job_outputs("segment", {"--output": str(scratch / "out"), "--png": None})
    # persistent locations pass: absolute paths elsewhere, object storage, servers, absolute sqlite
    check_job_outputs("train", {"--storage": str(tmp_path / "keep"), "--tracking-uri": f"sqlite:///{tmp_path}/m.db"})
    check_job_outputs("train", {"--storage": "s3://bucket/runs", "--tracking-uri": "http://mlflow:5000"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    check_job_outputs("tune", {"--storage": "gs://b/t", "--tracking-uri": configured_uri(None)})


def test_every_writing_stage_refuses_scratch_outputs_in_a_job_before_any_work(tmp_path, monkeypatch, no_ray):
    from pipelines import distill, evaluate, preprocess, quickstart, segment, train, tune
    _as_job(monkeypatch, tmp_path)
    cases = [(train.main, ["--data", "d"], "train: inside Ray job.*--storage runs/ray.*--tracking-uri"),
             (tune.main, ["--space", "s.yaml", "--data", "d"], "tune: inside Ray job.*--storage runs/tune"),
             (distill.main, ["--teacher", "m.pt"], "distill: inside Ray job.*--out runs/distill"),
             (preprocess.main, ["--source", "tm-dsprites", "--out", "data/x"], "preprocess: inside Ray job.*--out data/x"),
             (evaluate.main, ["--data", "d", "--out", "rep"], "evaluate: inside Ray job.*--out rep"),
             (quickstart.main, [], "quickstart: inside Ray job.*--out runs/quickstart")]
    for main, argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(argv)
    model = tmp_path / "m.pt"
    from drc_core.model import DRCModel
    from pipelines.lib.models import save_drc
    from tests.conftest import tiny_config
    cfg = tiny_config()
    save_drc(model, cfg, DRCModel(cfg.model, cfg.ablation).state_dict())
    with pytest.raises(SystemExit, match="segment: inside Ray job.*--output seg"):
        segment.main(["--model", str(model), "--input", str(tmp_path), "--output", "seg"])


def test_a_stage_without_an_address_starts_its_own_instance_even_beside_a_ray_start_cluster(monkeypatch):
    """No --address and no RAY_ADDRESS: init_ray asks Ray for a new local instance ("local"), not the
    default lookup that would join whatever cluster `ray start` left in /tmp/ray/ray_current_cluster
    (a stage's settings, e.g. actor restarts, assume a local instance then); with either, it joins."""
    import ray

    from pipelines.lib import ray_env
    calls = []
    for var in ("PYTHONPATH", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", *ray_env._DEFAULT_ENV):   # init_ray sets them
        monkeypatch.setenv(var, os.environ.get(var, ray_env._DEFAULT_ENV.get(var, "")))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_env.init_ray(num_cpus=2)
    ray_env.init_ray("10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    ray_env.init_ray()
    assert [c["address"] for c in calls] == ["local", "10.0.0.1:6379", None]
    assert calls[0]["num_cpus"] == 2 and ray_env.actor_restarts() == -1
