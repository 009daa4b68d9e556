"""Data-parallel DRC training with Ray Train, persistent sharded chains, checkpoints and MLflow.

    python -m pipelines.train --data data/tmds-32 --preset cpu-32 --workers 2 [section.key=value ...]
    python -m pipelines.train --data … --resume NAME [--workers 1]      # continue (re-shards)
    ray job submit --working-dir . -- python -m pipelines.train --data s3://… --storage s3://… --device cuda
    python -m pipelines.train --data s3://… --storage s3://… --resume NAME   # continue a run on object storage

Runs locally on an embedded Ray instance, or joins the cluster of a `ray job submit` (RAY_ADDRESS).
One MLflow run per job: params = the resolved config; metrics per iteration from rank 0;
image grids; the final checkpoint; the model as a pyfunc that segments images. Checkpoints go
to <storage>/<name>/checkpoint_<iteration>, beside the run record drc_run.json (a local folder
or a URI: pipelines/lib/locations.py); a crashed worker restarts the group from the last one
(--max-failures), and --resume NAME continues from it (Ray Train restores a run given the same
name and storage). See pipelines/lib/train_worker.py for the sharding design.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import uuid
from pathlib import Path

from drc_core.config import ConfigError, merged_overrides
from drc_core.presets import get_config, preset_names
from pipelines.lib import checkpoints as ckpt
from pipelines.lib import devices, locations, tracking
from pipelines.lib.errors import find_cause, os_reason
from pipelines.lib.parquet_store import DatasetError, Store
from pipelines.lib.ray_env import ScratchPathError, check_job_outputs, init_ray, joins_cluster
from pipelines.lib.train_worker import DivergenceError, TrainJob, train_loop

RUN_FILE = "drc_run.json"


def _workers(text: str) -> int | tuple[int, int]:
    lo, _, hi = str(text).partition("-")
    try:
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers must be N or MIN-MAX, got {text!r}") from None
    if not 1 <= lo_n <= hi_n:
        raise argparse.ArgumentTypeError(f"--workers needs 1 <= MIN <= MAX, got {text!r}")
    return lo_n if not hi else (lo_n, hi_n)


def run_name(text: str) -> str:
    """A run or study name: one plain folder name under --storage, never a path out of it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name: use letters, digits, '.', '_', '-' "
                                         f"(starting with a letter or digit), at most 128 characters")
    return text


def build_trainer(job: TrainJob, *, workers: int | tuple[int, int], name: str, storage: str, cpus_per_worker: float = 1.0,
                  gpu: bool = False, max_failures: int = 2, keep: int = 2, callbacks=()):
    """The TorchTrainer for one training job (pipelines.tune builds its trials with this too)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    # Ray Train's INFO lines on the console repeat what the workers' own progress line says (one
    # "Checkpoint successfully created" per checkpoint and worker, metrics dicts); WARNING keeps its
    # warnings and errors (worker failures, restarts); train_loop quietens the per-report line.
    return TorchTrainer(
        train_loop, train_loop_config=job.to_dict(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep),
                             logging_config=LoggingConfig(log_level="WARNING")))


def check_dataset(data: str, cfg, preset: str) -> dict:
    """The dataset's manifest, after checking that every part's footer reads (DatasetError naming
    a damaged part, before any worker starts) and that its resolution is the model's."""
    manifest = Store(data).check_parts()
    if manifest["resolution"] != cfg.model.resolution:
        raise SystemExit(f"--data {data} has resolution {manifest['resolution']} but "
                         f"model.resolution is {cfg.model.resolution} (preset {preset})")
    return manifest


def export_model(checkpoint_dir: str | Path, out: Path) -> Path:
    """model.pt = resolved config + model weights from a checkpoint (what the pyfunc loads); reads
    and verifies the model files only."""
    from pipelines.lib.models import save_drc
    _, cfg, state = ckpt.load_model(checkpoint_dir)
    return save_drc(out, cfg, state["model"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Parquet dataset from pipelines.preprocess (folder or URI)")
    p.add_argument("--preset", default="cpu-32", choices=preset_names())
    p.add_argument("--workers", type=_workers, default=2,
                   help="N, or MIN-MAX for elastic training (continues on fewer workers after a node loss)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPUs per worker)")
    devices.add_argument(p, what="each worker")
    p.add_argument("--iterations", type=int, default=None, help="total EM iterations (default: optim.iterations)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--eval-every", type=int, default=50, help="held-out IoU every N iterations (0: off)")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-steps", type=int, default=None, help="posterior steps for evaluation")
    p.add_argument("--grid-every", type=int, default=100, help="image grids every N iterations (0: off)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    p.add_argument("--name", type=run_name, default=None, help="run name (default: <preset>-<time>-<random>)")
    p.add_argument("--resume", type=run_name, metavar="NAME", default=None,
                   help="continue run NAME from its last checkpoint")
    p.add_argument("--storage", "--output", dest="storage", default="runs/ray", help="checkpoint storage (folder or URI)")
    p.add_argument("--tracking-uri", default=None, help="MLflow (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment", default=tracking.default_experiment(),
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or %(default)s)")
    p.add_argument("--no-model", action="store_true", help="do not log the pyfunc model")
    p.add_argument("--quiet", action="store_true", help="no progress lines (where things go and the summary are printed)")
    p.add_argument("--address", default=None, help="Ray address (default: local, or the job's cluster)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    p.add_argument("--inject-fault", default=None, metavar="KIND:ITER[:RANK]",
                   help="fault drill: raise | kill | kill-in-checkpoint, once, at iteration ITER")
    p.add_argument("--config", default=None, metavar="RUN_YAML",
                   help="a YAML file of section.key: value overrides (the command line's overrides win)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def check_resumable(run_dir: str, name: str, storage: str, cfg) -> dict:
    """The saved run record of --resume NAME, after checking that the run exists, that its newest
    complete checkpoint's model files are intact and that it was trained with this preset and
    architecture (ConfigError naming the field otherwise). `run_dir` is a local folder or a URI;
    only small files and the model are read (the workers verify the chains they restore)."""
    record = locations.join(run_dir, RUN_FILE)
    if not locations.exists(record):
        raise SystemExit(f"--resume {name}: no run of that name under {storage}")
    previous = json.loads(locations.read_text(record))
    if previous.get("preset", cfg.preset) != cfg.preset:
        raise ConfigError(f"preset is {cfg.preset!r} but run {name} was started with preset "
                          f"{previous['preset']!r}: resume with --preset {previous['preset']}")
    last = ckpt.latest(run_dir)
    if last is not None:
        ckpt.check_compatible(ckpt.load_config(last), cfg, str(last))
    elif saved := ckpt.candidates(run_dir):
        try:                                  # every checkpoint damaged: say which file, do not start over
            ckpt.model_intact(saved[0])
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"--resume {name}: no intact checkpoint under {run_dir}; the newest: "
                                       f"{exc}") from None
    return previous


def run(args: argparse.Namespace) -> dict:
    """Every check that can fail (config, resume compatibility, dataset) runs before Ray starts."""
    cfg = get_config(args.preset, merged_overrides(args.config, args.overrides))
    check_job_outputs("train", {"--storage": args.storage, "--tracking-uri": tracking.configured_uri(args.tracking_uri)})
    storage = locations.absolute(args.storage)            # a local folder or a URI (s3://bucket/runs)
    local = not locations.is_uri(storage)
    uri = tracking.tracking_uri(args.tracking_uri)
    name = args.resume or args.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    run_dir = locations.join(storage, name)                # the run record lives beside its checkpoints
    try:
        previous = check_resumable(run_dir, name, storage, cfg) if args.resume else None
        exists = previous is None and locations.exists(run_dir)
    except OSError as exc:                                 # an object store out of reach, no such bucket
        raise SystemExit(f"--storage {storage}: cannot read it ({os_reason(exc)})") from None
    check_dataset(args.data, cfg, args.preset)
    args.data = locations.absolute(args.data)             # workers may run in another folder
    iterations = args.iterations or cfg.optim.iterations
    devices.check(args.device, "train")

    job = TrainJob(data=args.data, config=cfg.to_dict(), iterations=iterations,
                   checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                   eval_images=args.eval_images, eval_steps=args.eval_steps, grid_every=args.grid_every,
                   threads=args.threads or max(1, int(args.cpus_per_worker)),
                   tracking_uri=uri, progress_every=0 if args.quiet else 10)
    if previous is not None:
        job.mlflow_run_id = previous["mlflow_run_id"]
        tracking.client(uri).update_run(job.mlflow_run_id, status="RUNNING")
    else:
        if exists:
            raise SystemExit(f"run {name} already exists under {storage}: pick another --name or --resume it")
        params = {**cfg.flat(), "job.workers": args.workers, "job.data": args.data,
                  "job.iterations": iterations, "job.device": args.device}
        job.mlflow_run_id = tracking.start_run(uri, name, params, experiment=args.experiment,
                                               tags={"drc.stage": "train", "drc.preset": cfg.preset})
    locations.write_text(locations.join(run_dir, RUN_FILE), json.dumps(
        {"mlflow_run_id": job.mlflow_run_id, "data": args.data, "preset": cfg.preset, "tracking_uri": uri}))
    job.run_uri = run_dir                 # checkpoints and the workers' chain logs
    if local:                             # workers append events to a local run folder
        job.events_path = str(Path(run_dir) / "events.jsonl")
    if args.inject_fault:
        kind, it, *rank = args.inject_fault.split(":")
        marker = str(Path(run_dir if local else tempfile.gettempdir()) / f"fault-{kind}-{it}.fired")
        job.fault = {"kind": kind, "iteration": int(it), "rank": int(rank[0]) if rank else 0, "marker": marker}

    print(f"train {name}: checkpoints → {storage.rstrip('/')}/{name}, MLflow → {uri} (experiment {args.experiment}, "
          f"run {job.mlflow_run_id})", flush=True)
    init_ray(args.address, num_cpus=args.num_cpus)
    job.gpu = devices.reserves_gpu(args.device, "train", joined=joins_cluster(args.address))
    print(f"training {name}: {args.workers} worker(s){' with a GPU each' if job.gpu else ''}, {iterations} "
          f"iterations", flush=True)
    t0 = time.perf_counter()
    trainer = build_trainer(job, workers=args.workers, name=name, storage=storage,
                            cpus_per_worker=args.cpus_per_worker, gpu=job.gpu,
                            max_failures=args.max_failures, keep=args.keep)
    try:
        result = trainer.fit()
    except Exception:
        tracking.end_run(uri, job.mlflow_run_id, "FAILED")
        raise
    if result.error is not None:
        tracking.end_run(uri, job.mlflow_run_id, "FAILED")
        raise result.error
    summary = {"name": name, "mlflow_run_id": job.mlflow_run_id, "tracking_uri": uri, "storage": storage,
               "wall_seconds": time.perf_counter() - t0, "metrics": result.metrics or {}}
    if result.checkpoint is not None:
        # MLflow gets the model and the checkpoint's small records, not its chains: the checkpoint
        # stays in --storage, named by the run's `checkpoint` tag
        folder = locations.from_fs_path(storage, result.checkpoint.path)
        ckpt.model_intact(folder)
        summary["checkpoint"] = folder
        c = tracking.client(uri)
        c.set_tag(job.mlflow_run_id, "checkpoint", folder)
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("config.json", "meta.json"):
                (Path(tmp) / name).write_bytes(locations.read_bytes(locations.join(folder, name)))
            c.log_artifacts(job.mlflow_run_id, tmp, "checkpoint")
            if not args.no_model:
                from pipelines.lib.mlflow_model import log_pyfunc
                weights = export_model(folder, Path(tmp) / "model.pt")
                summary["model_uri"] = log_pyfunc(uri, job.mlflow_run_id, weights, cfg.langevin.test_steps)
    tracking.end_run(uri, job.mlflow_run_id)
    print("done:", json.dumps({k: v for k, v in summary.items() if k != "metrics"}), flush=True)
    return summary


# errors whose message says everything: the CLI prints it in one line, also when a worker raised it
CLEAR_ERRORS = (ConfigError, DatasetError, ckpt.CheckpointError, DivergenceError, devices.DeviceError,
                ScratchPathError)


def main(argv: list[str] | None = None) -> dict:
    try:
        return run(parse_args(argv))
    except Exception as exc:
        clear = find_cause(exc, CLEAR_ERRORS)
        if clear is None:
            raise
        failed = str(clear) if isinstance(clear, (devices.DeviceError, ScratchPathError)) else f"train: {clear}"
    raise SystemExit(failed)              # outside the handler: the Ray error is not kept alive


if __name__ == "__main__":
    main()
