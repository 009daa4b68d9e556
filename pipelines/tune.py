"""Ray Tune studies over DRC's step sizes and regulariser weights.

    python -m pipelines.tune --space tune_spaces/quick.yaml --data data/tmds-32 --trials 8
    python -m pipelines.tune --space tune_spaces/langevin.yaml --data … --trials 64 --workers-per-trial 4 --device cuda
    python -m pipelines.tune --resume <study> --space … --data …          # continue an interrupted study
    python -m pipelines.tune --space … --data s3://… --storage s3://bucket/tune [--resume <study>]

The study lives under <storage>/<study>/ (a local folder or a URI): Ray Tune's experiment state,
drc_study.json (what --resume needs), summary.json and trials/<trial>/checkpoint_* (each trial's
checkpoints).

Each trial runs pipelines.train's worker loop (the same steps, the same checkpoints): in the
trial's own process with one worker per trial (the default), as a Ray Train job built by
`pipelines.train.build_trainer` with `--workers-per-trial` > 1. It reports every `--report-every`
iterations; ASHA stops the weak trials
early; Optuna's TPE proposes the next ones (`--search random` for random/grid search). The
first trial runs the preset's own values (the reference). The metric is the held-out IoU when
the data has masks and the unsupervised `eval_score` otherwise (pipelines/lib/train_worker.py says
what it is); both are recorded, and a study on masked data prints their rank correlation.
MLflow: a parent run per study, a child run per trial, the best config and checkpoint on the parent.
"""
from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path


from drc_core.config import apply_overrides, merged_overrides
from drc_core.presets import get_config, preset_names
from pipelines.lib import devices, locations, search_space, tracking
from pipelines.lib.errors import os_reason
from pipelines.lib.parquet_store import load_rows, split_ids
from pipelines.lib.ray_env import ScratchPathError, check_job_outputs, init_ray, joins_cluster
from pipelines.train import build_trainer, check_dataset, run_name
from pipelines.lib.train_eval import LABEL_FREE
from pipelines.lib.train_session import TrialSession
from pipelines.lib.train_worker import TrainJob, train_loop

STUDY_FILE = "drc_study.json"
# What the actor of a trial with a Ray Train group reserves. It only starts the trial's Ray Train
# run and waits for its reports; the Train workers reserve their own CPUs in their own placement
# group. No CPU, so that N trials with W workers of C CPUs fit on exactly N*W*C CPUs (0.01 CPU
# per trial left 1.98 of 2 CPUs: two 1-CPU trials could not run at once). Tune needs some
# non-zero resource in the bundle: a nominal share of memory.
GROUP_TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 1024 ** 2}


def trial_resources(study: dict) -> dict:
    """A one-worker trial trains in its own actor, which reserves the worker's CPUs (and GPU)."""
    if study["workers"] > 1:
        return GROUP_TRIAL_RESOURCES
    return {"cpu": study["cpus_per_worker"], **({"gpu": 1} if study["gpu"] else {})}


def make_trainable(study: dict):
    """The Tune function trainable, logged as an MLflow child run: with one worker per trial the
    worker loop runs in the trial's own process (two processes fewer per trial than a Ray Train
    group: its controller and its worker); with several, a Ray Train job per trial."""
    from ray import tune

    def trial(params: dict) -> None:
        from ray import tune
        ctx = tune.get_context()
        name = ctx.get_trial_name()
        cfg = apply_overrides(get_config(study["preset"]), {**study["overrides"], **params})
        uri = study["tracking_uri"]
        run_id = tracking.start_run(uri, name, {**cfg.flat(), **{f"trial.{k}": v for k, v in params.items()}},
                                    experiment=study["experiment"], parent_run_id=study["parent_run_id"],
                                    tags={"drc.stage": "tune-trial", "drc.study": study["name"],
                                          "drc.trial_id": ctx.get_trial_id()})
        job = TrainJob(data=study["data"], config=cfg.to_dict(), iterations=study["iterations"],
                       checkpoint_every=study["report_every"], eval_every=study["report_every"],
                       eval_images=study["eval_images"], eval_steps=study["eval_steps"], grid_every=0,
                       threads=study["threads"], gpu=study["gpu"], tracking_uri=uri, mlflow_run_id=run_id,
                       progress_every=0 if study.get("quiet") else 10,
                       run_uri=locations.join(study["train_storage"], name),
                       chain_checkpoints=bool(study.get("trial_chains")), train_subset=study.get("train_subset"),
                       subset_seed=study.get("subset_seed", 0))
        try:
            if study["workers"] == 1:
                train_loop(job.to_dict(), TrialSession(keep=1))
            else:
                from ray.tune.integration.ray_train import TuneReportCallback
                trainer = build_trainer(job, workers=study["workers"], name=name, storage=study["train_storage"],
                                        cpus_per_worker=study["cpus_per_worker"], gpu=study["gpu"], max_failures=0,
                                        keep=1, callbacks=[TuneReportCallback()])
                result = trainer.fit()
                if result.error is not None:
                    raise result.error
        except BaseException as e:
            import ray.exceptions
            c = tracking.client(uri)
            if isinstance(e, (ray.exceptions.RayActorError, KeyboardInterrupt, SystemExit)):
                # the scheduler stopped this trial (ASHA; Ctrl-C): Tune ends a trial's function with
                # SystemExit at its next report, and a trial's Ray Train controller goes with its actor
                c.set_tag(run_id, "stopped_early", "true")
                tracking.end_run(uri, run_id, "KILLED")
            else:                      # diverged or crashed: the reason goes on the child run
                c.set_tag(run_id, "failure_reason", str(e)[:5000])
                tracking.end_run(uri, run_id, "FAILED")
            raise
        tracking.end_run(uri, run_id)
    return tune.with_resources(trial, trial_resources(study))


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def _reason(error: BaseException) -> str:
    """The line of a trial's (Ray-wrapped) error that says what went wrong."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return next((x for x in reversed(lines) if "Error:" in x), lines[-1] if lines else repr(error))[:300]


def _has_masks(data: str, split: str) -> bool:
    ids = split_ids(data, split)
    return bool(len(ids)) and "masks" in load_rows(data, ids[:1])


def check_subset(args) -> None:
    if args.train_subset is not None and args.train_subset < max(1, args.workers_per_trial):
        raise SystemExit(f"--train-subset {args.train_subset}: each of the {args.workers_per_trial} worker(s) of a "
                         f"trial needs at least one image")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True, help="tune_spaces/<study>.yaml")
    p.add_argument("--data", required=True, help="Parquet dataset from pipelines.preprocess")
    p.add_argument("--preset", default="cpu-32", choices=preset_names())
    p.add_argument("--trials", type=int, default=8, help="number of trials (grid values multiply it)")
    p.add_argument("--iterations", type=int, default=200, help="EM iterations of a trial that is not stopped")
    p.add_argument("--report-every", type=int, default=20, help="evaluate + report (an ASHA rung step) every N iterations")
    p.add_argument("--grace", type=int, default=2, help="ASHA: reports every trial gets before it can be stopped")
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--no-early-stopping", action="store_true", help="FIFO instead of ASHA")
    p.add_argument("--search", choices=["optuna", "random"], default="optuna")
    p.add_argument("--no-default-trial", action="store_true", help="do not run the preset's own values first")
    p.add_argument("--concurrency", type=int, default=2, help="trials running at once")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    devices.add_argument(p, what="each trial's workers")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="every trial trains on the same seeded N training images (default: the whole split); each "
                        "worker reads only its share of them")
    p.add_argument("--trial-chains", action="store_true",
                   help="trial checkpoints keep the persistent chains (default: the model only; a trial restarts "
                        "from it with fresh chains)")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-steps", type=int, default=None)
    p.add_argument("--metric", choices=["auto", "eval_iou", "eval_score"], default="auto")
    p.add_argument("--name", type=run_name, default=None)
    p.add_argument("--resume", type=run_name, metavar="NAME", default=None, help="continue an interrupted study")
    p.add_argument("--storage", "--output", dest="storage", default="runs/tune",
                   help="study state and trial checkpoints (folder or URI, e.g. s3://bucket/tune)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=tracking.default_experiment("drc-tune"),
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or %(default)s)")
    p.add_argument("--address", default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="search algorithm seed")
    p.add_argument("--quiet", action="store_true", help="no trial progress lines or Tune status tables "
                   "(the trial table and the best trial are printed at the end)")
    p.add_argument("--config", default=None, metavar="RUN_YAML",
                   help="a YAML file of section.key: value overrides (the command line's overrides win)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every trial")
    return p.parse_args(argv)


def _search(args, params: dict, base, metric: str):
    points = [] if args.no_default_trial else [search_space.defaults(params, base)]
    if args.search == "optuna":
        if any(s["type"] == "grid" for s in params.values()):
            raise SystemExit(f"{args.space}: 'grid' parameters need --search random")
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        algo = OptunaSearch(metric=metric, mode="max", points_to_evaluate=points or None, seed=args.seed)
        return ConcurrencyLimiter(algo, max_concurrent=args.concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=args.seed,
                                 max_concurrent=args.concurrency)


def build_tuner(args, study: dict, params: dict, base, metric: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    rungs = max(1, args.iterations // args.report_every)
    # max_t one past the last report: a trial that survives every rung ends by itself
    # (finished in MLflow) instead of being stopped by the scheduler at its final report
    scheduler = (FIFOScheduler() if args.no_early_stopping else
                 ASHAScheduler(time_attr="training_iteration", max_t=rungs + 1,
                               grace_period=min(args.grace, rungs), reduction_factor=args.reduction_factor))
    trainable = make_trainable(study)
    return tune.Tuner(
        trainable, param_space=search_space.to_tune(params),
        tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=args.trials, scheduler=scheduler,
                                    search_alg=_search(args, params, base, metric),
                                    # a fresh trial actor per trial: killing the one of a trial that
                                    # ASHA stopped also ends its Ray Train controller and workers
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=study["name"], storage_path=study["storage"], verbose=0 if args.quiet else None,
                                  failure_config=tune.FailureConfig(max_failures=0)))


def run(args: argparse.Namespace) -> dict:
    check_job_outputs("tune", {"--storage": args.storage, "--tracking-uri": tracking.configured_uri(args.tracking_uri)})
    overrides = merged_overrides(args.config, args.overrides)
    base = get_config(args.preset, overrides)
    params = search_space.load(args.space, base)
    check_dataset(args.data, base, args.preset)
    check_subset(args)
    args.data = locations.absolute(args.data)             # each trial runs in its own folder
    devices.check(args.device, "tune")
    metric = args.metric if args.metric != "auto" else ("eval_iou" if _has_masks(args.data, "test") else "eval_score")
    storage = locations.absolute(args.storage)            # a local folder or a URI (s3://bucket/tune)
    uri = tracking.tracking_uri(args.tracking_uri)
    name = args.resume or args.name or f"{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    study_dir = locations.join(storage, name)              # Tune's experiment state, drc_study.json, trials/
    study_file = locations.join(study_dir, STUDY_FILE)
    try:
        found = locations.exists(study_file if args.resume else study_dir)
    except OSError as exc:                                 # an object store out of reach, no such bucket
        raise SystemExit(f"--storage {storage}: cannot read it ({os_reason(exc)})") from None
    print(f"tune {name}: study state and trial checkpoints → {study_dir}, MLflow → {uri} (experiment "
          f"{args.experiment})", flush=True)
    # the dashboard's State API (pinned to this instance by init_ray) lets Ray Train free the
    # placement group of a trial ASHA stopped
    init_ray(args.address, num_cpus=args.num_cpus, include_dashboard=True)
    from ray import tune
    if args.resume:
        if not found:
            raise SystemExit(f"--resume {name}: no study of that name under {storage}")
        study = json.loads(locations.read_text(study_file))
        tracking.client(uri).update_run(study["parent_run_id"], status="RUNNING")
        tuner = tune.Tuner.restore(study_dir, trainable=make_trainable(study),
                                   resume_errored=False, restart_errored=False)
    else:
        if found:
            raise SystemExit(f"study {name} already exists under {storage}: use --resume {name} or another --name")
        parent = tracking.start_run(uri, name, {"space": args.space, "preset": args.preset, "data": args.data,
                                                "trials": args.trials, "iterations": args.iterations,
                                                "metric": metric, "search": args.search,
                                                **{f"space.{k}": json.dumps(v) for k, v in params.items()}},
                                    experiment=args.experiment, tags={"drc.stage": "tune"})
        study = {"name": name, "preset": args.preset, "overrides": overrides,
                 "data": args.data, "iterations": args.iterations, "report_every": args.report_every,
                 "eval_images": args.eval_images, "eval_steps": args.eval_steps, "threads": args.threads,
                 "gpu": devices.reserves_gpu(args.device, "tune", joined=joins_cluster(args.address)),
                 "workers": args.workers_per_trial, "cpus_per_worker": args.cpus_per_worker,
                 "tracking_uri": uri, "experiment": args.experiment, "parent_run_id": parent,
                 "storage": storage, "train_storage": locations.join(study_dir, "trials"), "metric": metric,
                 "quiet": args.quiet, "train_subset": args.train_subset, "subset_seed": args.seed,
                 "trial_chains": args.trial_chains}
        locations.write_text(study_file, json.dumps(study, indent=1))
        tuner = build_tuner(args, study, params, base, metric)
    print(f"study {name}: {args.trials} trials of {args.space} on {args.data}, metric {study['metric']}, "
          f"MLflow parent run {study['parent_run_id']}", flush=True)
    import ray
    before = set(ray.util.placement_group_table())
    grid = tuner.fit()
    return summarize(grid, study, list(params), released_resources(before))


def released_resources(before: set[str], timeout: float = 60.0) -> dict:
    """Wait until the placement groups created during the study (trial actors', Train worker
    groups') are removed; report those still reserved after `timeout` and the free CPUs.

    Ray Train frees the group of a trial that the scheduler stopped a second or two after the
    trial's controller died (see pipelines.lib.ray_env._pin_state_api); a group still reserved here
    is a leak that would have starved later trials."""
    import ray
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(k for k, v in ray.util.placement_group_table().items()
                      if k not in before and v["state"] != "REMOVED")
        out = {"placement_groups_left": left, "cpus_free": ray.available_resources().get("CPU", 0.0),
               "cpus_total": ray.cluster_resources().get("CPU", 0.0)}
        # a removed group's CPUs reach available_resources() a moment later (the resource view is
        # synced asynchronously), so wait for both rather than read the CPUs once
        if (not left and out["cpus_free"] == out["cpus_total"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if left:
        print(f"WARNING: {len(left)} placement group(s) of this study still reserved {timeout:.0f} s after "
              f"it ended: {left}", flush=True)
    elif out["cpus_free"] < out["cpus_total"]:
        print(f"WARNING: {out['cpus_total'] - out['cpus_free']:g} CPU(s) still held {timeout:.0f} s after the "
              f"study ended", flush=True)
    return out


def summarize(grid, study: dict, searched: list[str], resources: dict | None = None) -> dict:
    """Trial table, best trial (recorded on the parent run) and the score ↔ IoU rank correlation."""
    uri, parent, metric = study["tracking_uri"], study["parent_run_id"], study["metric"]
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial": Path(r.path).name, **{k: r.config.get(k) for k in searched},
                     "iterations": m.get("iteration"), "eval_iou": m.get("eval_iou"),
                     "eval_score": m.get("eval_score"),
                     **{k: m.get(k) for k in LABEL_FREE_METRICS}, "status": "error" if r.error else "ok",
                     "error": _reason(r.error) if r.error else None,
                     # Ray gives the path on the storage's filesystem (no scheme on object stores)
                     "checkpoint": locations.from_fs_path(study["train_storage"], m["checkpoint_path"])
                     if m.get("checkpoint_path") else None})
    done = [x for x in rows if x["status"] == "ok" and x[metric] is not None]
    out = {"name": study["name"], "parent_run_id": parent, "metric": metric, "trials": rows}
    c = tracking.client(uri)
    if done:
        best = max(done, key=lambda x: x[metric])
        out["best"] = best
        c.set_tag(parent, "best_trial", best["trial"])
        for k in searched:                       # tags, not params: a resumed study may find a better one
            c.set_tag(parent, f"best.{k}", best[k])
        tracking.log_metrics(uri, parent, {f"best_{metric}": best[metric]}, step=0)
        if best["checkpoint"] and locations.exists(best["checkpoint"]):
            c.set_tag(parent, "best_checkpoint", best["checkpoint"])
            _log_checkpoint(c, parent, best["checkpoint"])
        rho = _rank_correlations(done)
        if rho:
            out["spearman_vs_iou"] = rho
            out["spearman_score_vs_iou"] = rho["eval_score"]
            tracking.log_metrics(uri, parent, {"spearman_score_vs_iou": rho["eval_score"],
                                               **{f"spearman_{k}_vs_iou": v for k, v in rho.items()
                                                  if k != "eval_score"}}, step=0)
    # trials that ASHA stopped were killed mid-fit: close their child runs as such
    for run in c.search_runs([c.get_run(parent).info.experiment_id],
                             f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'"):
        c.set_tag(run.info.run_id, "stopped_early", "true")
        tracking.end_run(uri, run.info.run_id, "KILLED")
    c.log_text(parent, json.dumps(rows, indent=1, default=str), "trials.json")
    unfinished = len(rows) - grid.num_terminated - grid.num_errors
    if unfinished:                               # interrupted (Ctrl-C): resumable, not finished
        c.set_tag(parent, "interrupted", f"{unfinished} trial(s) unfinished")
        tracking.end_run(uri, parent, "KILLED")
        print(f"study interrupted with {unfinished} unfinished trial(s): continue with --resume {study['name']}")
    else:
        tracking.end_run(uri, parent)
    out["unfinished"] = unfinished
    out["resources_after"] = resources
    _print_table(rows, searched, out)
    locations.write_text(locations.join(study["storage"], study["name"], "summary.json"),
                         json.dumps(out, indent=1, default=str))
    return out


LABEL_FREE_METRICS = [f"eval_lf_{k}" for k in LABEL_FREE]


def _rank_correlations(done: list[dict]) -> dict[str, float]:
    """Spearman's ρ between each label-free score and the IoU over the finished trials (≥ 3 with both):
    how well a study on unlabelled data would have ranked them."""
    rho = {}
    for k in ["eval_score", *LABEL_FREE_METRICS]:
        paired = [x for x in done if x["eval_iou"] is not None and x.get(k) is not None]
        r = spearman([x[k] for x in paired], [x["eval_iou"] for x in paired]) if len(paired) >= 3 else None
        if r is not None and r == r:                      # NaN where a score is constant over the trials
            rho[k] = r
    return rho


def _log_checkpoint(c, run_id: str, checkpoint: str) -> None:
    """The checkpoint's files as the run's best_checkpoint/ artifacts (copied from object storage
    to a temporary folder first: MLflow logs local files)."""
    if not locations.is_uri(checkpoint):
        c.log_artifacts(run_id, checkpoint, "best_checkpoint")
        return
    import tempfile
    with tempfile.TemporaryDirectory(prefix="drc-best-") as tmp:
        c.log_artifacts(run_id, str(locations.download(checkpoint, tmp)), "best_checkpoint")


def _print_table(rows, searched, out) -> None:
    cols = ["trial", *searched, "iterations", "eval_iou", "eval_score", "status"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)   # noqa: E731
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c)) for c in cols) + (f"  ({r['error']})" if r["error"] else ""))
    if "best" in out:
        print(f"best: {out['best']['trial']} {out['metric']}={out['best'][out['metric']]:.4g}")
    for k, v in out.get("spearman_vs_iou", {}).items():
        print(f"Spearman rank correlation, label-free {k} vs IoU: {v:.3f}")


def main(argv=None) -> dict:
    try:
        return run(parse_args(argv))
    except (devices.DeviceError, ScratchPathError) as exc:       # each names the stage
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
