"""pipelines.tune on a real local Ray instance: ASHA + Optuna over one-worker trials (each trains in
its trial's own process), MLflow parent/child runs, a diverging trial, an interrupted study
resumed; and the space schema. A study of Ray Train trials (several workers each), on S3:
tests/test_object_storage.py."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drc_core.presets import get_config
from pipelines.lib import search_space
from tests.test_train import TINY, dataset, tracking_uri  # noqa: F401  (fixtures)
from tests.test_train_cluster import _env

ROOT = Path(__file__).resolve().parent.parent
TRIAL = ["--iterations", "6", "--report-every", "2", "--grace", "1", "--reduction-factor", "2",
         "--eval-images", "8", "--eval-steps", "4", "--concurrency", "2"]


def _study(dataset, tracking_uri, tmp_path, *extra):
    """A study in its own process and Ray instance, as a user runs it: the session instance has
    run other trainers by now, and a study must not depend on what they left behind."""
    name = f"study-{len(list(tmp_path.glob('tune/*')))}"
    proc = subprocess.run([sys.executable, "-m", "pipelines.tune", "--data", dataset, "--storage",
                           str(tmp_path / "tune"), "--tracking-uri", tracking_uri, "--name", name,
                           "--num-cpus", "2", *TRIAL, *extra, *TINY],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    summary = tmp_path / "tune" / name / "summary.json"
    assert proc.returncode == 0 and summary.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {**json.loads(summary.read_text()), "stdout": proc.stdout}


def _children(tracking_uri, parent):
    import mlflow
    c = mlflow.tracking.MlflowClient(tracking_uri)
    exp = c.get_run(parent).info.experiment_id
    return c, c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


@pytest.mark.integration
def test_quick_study_with_asha_and_optuna_records_parent_children_and_best(dataset, tracking_uri, tmp_path):
    # 1 CPU per trial, 2 trials at once on 2 CPUs: every CPU is reserved by a trial, so a trial ASHA
    # stopped must give its CPU back before the next trial can start. The session's Ray instance
    # runs beside the study's (the case that used to leak: see test_ray_env.py).
    out = _study(dataset, tracking_uri, tmp_path, "--space", str(ROOT / "tune_spaces/quick.yaml"), "--trials", "4",
                 "--cpus-per-worker", "1")
    assert out["metric"] == "eval_iou" and len(out["trials"]) == 4
    freed = out["resources_after"]
    assert freed["placement_groups_left"] == [] and freed["cpus_free"] == freed["cpus_total"] == 2, freed
    assert all(t["status"] == "ok" for t in out["trials"]), out["trials"]
    first = out["trials"][0]                                    # the preset's own values come first
    assert first["langevin.posterior_step_size"] == 0.1 and first["optim.gen_lr"] == 0.001
    assert max(t["iterations"] for t in out["trials"]) == 6
    c, children = _children(tracking_uri, out["parent_run_id"])
    assert len(children) == 4 and {r.data.tags["drc.study"] for r in children} == {out["name"]}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    assert all("eval_iou" in r.data.metrics and "eval_score" in r.data.metrics for r in children)
    for m in (r.data.metrics for r in children):      # the label-free score Tune ranks by without masks
        assert m["eval_score"] == pytest.approx(m["eval_lf_separability"] - m["eval_trivial"])
        assert m["eval_lf_recon"] == pytest.approx(-m["eval_recon_l1"])
    # the rank correlations the study prints, recomputed here from what the children logged
    from scipy.stats import spearmanr
    iou = [r.data.metrics["eval_iou"] for r in children]
    expected = {k: float(spearmanr([r.data.metrics[k] for r in children], iou).statistic)
                for k in ("eval_score", "eval_lf_separability")}
    for k, rho in expected.items():
        if rho == rho:                                 # NaN: the score was the same for every trial
            assert out["spearman_vs_iou"][k] == pytest.approx(rho)
            assert f"Spearman rank correlation, label-free {k} vs IoU: {rho:.3f}" in out["stdout"]
    parent = c.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == out["best"]["trial"]
    assert float(parent.data.tags["best.optim.gen_lr"]) == pytest.approx(out["best"]["optim.gen_lr"])
    assert {Path(a.path).name for a in c.list_artifacts(parent.info.run_id, "best_checkpoint")} >= {"state.pt", "meta.json"}
    # ASHA stopped at least one trial before the end, and the searcher proposed four distinct configs
    assert min(t["iterations"] for t in out["trials"]) < 6, out["trials"]
    assert len({(t["langevin.posterior_step_size"], t["optim.gen_lr"]) for t in out["trials"]}) == 4


@pytest.mark.integration
@pytest.mark.slow
def test_an_interrupted_study_resumes_finishes_every_trial_and_a_diverging_one_fails_with_its_reason(
        dataset, tracking_uri, tmp_path):
    # a grid of four learning rates, two trials at a time, the last one diverging: Ctrl-C while the
    # first two run, so the last two start only after the resume
    space = tmp_path / "grid.yaml"
    space.write_text("params:\n  optim.gen_lr: {type: grid, values: [0.001, 0.002, 0.0005, 1.0e+30]}\n")
    args = ["--space", str(space), "--trials", "1", "--search", "random", "--no-default-trial",
            "--no-early-stopping", "--name", "interrupted", "--data", dataset, "--storage", str(tmp_path / "tune"),
            "--tracking-uri", tracking_uri, *TRIAL, "--num-cpus", "2", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.tune", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials = tmp_path / "tune" / "interrupted" / "trials"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(trials.glob("*/checkpoint_00000004")):
        time.sleep(0.5)
    assert proc.poll() is None, "the study finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)                            # Ctrl-C
    proc.communicate(timeout=180)
    resumed = subprocess.run([sys.executable, "-m", "pipelines.tune", "--resume", "interrupted", *args],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out = json.loads((tmp_path / "tune" / "interrupted" / "summary.json").read_text())
    assert len(out["trials"]) == 4 and out["unfinished"] == 0
    by_lr = {t["optim.gen_lr"]: t for t in out["trials"]}
    assert sorted(by_lr) == [0.0005, 0.001, 0.002, 1e30], out["trials"]
    assert all(by_lr[lr]["status"] == "ok" for lr in (0.0005, 0.001, 0.002)), out["trials"]
    assert by_lr[1e30]["status"] == "error" and "diverged" in by_lr[1e30]["error"], by_lr[1e30]
    # the trial that had not started at Ctrl-C ran in full after the resume; a trial that was
    # running at Ctrl-C is restored by Tune 2.60 with the result it had reached (observed here)
    assert by_lr[0.0005]["iterations"] == 6, out["trials"]
    c, children = _children(tracking_uri, out["parent_run_id"])
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(failed) == 1 and "diverged at iteration" in failed[0].data.tags["failure_reason"]
    assert float(failed[0].data.params["optim.gen_lr"]) == 1e30
    ok = [by_lr[lr] for lr in (0.0005, 0.001, 0.002)]           # the best is the best of the trials that finished
    assert out["best"]["trial"] == max(ok, key=lambda t: t[out["metric"]])["trial"] != by_lr[1e30]["trial"]
    assert out["resources_after"]["placement_groups_left"] == []


def test_a_one_worker_trial_reserves_its_workers_resources_and_a_group_trial_none():
    from pipelines.tune import GROUP_TRIAL_RESOURCES, trial_resources
    assert trial_resources({"workers": 1, "cpus_per_worker": 2.0, "gpu": False}) == {"cpu": 2.0}
    assert trial_resources({"workers": 1, "cpus_per_worker": 4.0, "gpu": True}) == {"cpu": 4.0, "gpu": 1}
    assert trial_resources({"workers": 4, "cpus_per_worker": 1.0, "gpu": True}) == GROUP_TRIAL_RESOURCES
    assert GROUP_TRIAL_RESOURCES["cpu"] == 0


def test_space_files_are_checked_with_errors_naming_file_and_parameter(tmp_path):
    base = get_config("cpu-32")
    for name in ("quick", "langevin", "regularizers"):
        assert search_space.load(ROOT / "tune_spaces" / f"{name}.yaml", base)
    cases = {
        "params:\n  langevin.step_size: {type: uniform, low: 0.1, high: 0.2}\n": "'langevin.step_size' is not a config field",
        "params:\n  loss.sigma: {type: normal, low: 0.1, high: 0.2}\n": "'type' must be one of",
        "params:\n  loss.sigma: {type: uniform, low: 0.3, high: 0.2}\n": "low (0.3) must be below high (0.2)",
        "params:\n  loss.sigma: {type: loguniform, low: 0.0, high: 0.2}\n": "loguniform needs low > 0",
        "params:\n  loss.sigma: {type: uniform, low: -1.0, high: 0.2}\n": "value -1.0 is not legal: loss.sigma must be > 0",
        "params:\n  loss.sigma: {type: choice, values: []}\n": "non-empty list",
        "params:\n  loss.sigma: {type: uniform, low: 0.1}\n": "takes exactly ['low', 'high']",
        "params:\n  ablation.tv: {type: choice, values: [maybe]}\n": "ablation.tv expects true/false",
        "space:\n  loss.sigma: {type: uniform, low: 0.1, high: 0.2}\n": "needs a non-empty 'params'",
        "params: {a: [\n": "not valid YAML",
    }
    for k, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{k}.yaml"
        path.write_text(text)
        with pytest.raises(search_space.SpaceError, match=None) as err:
            search_space.load(path, base)
        assert str(path) in str(err.value) and message in str(err.value), (text, str(err.value))
