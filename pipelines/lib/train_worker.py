"""The Ray Train worker: drc_core's EM step, data-parallel, with worker-local chain shards.

Sharding design. The training split's sorted sample ids are cut into `world_size` contiguous
shares; worker r reads only its share's rows from Parquet (row-group statistics skip the rest)
and owns the posterior chains of exactly those samples (and its share of the prior pool). Data
and chains are aligned, so a chain is read and written in the worker's memory, with no network
traffic per step. The price: a sample is only ever seen by its own worker (shuffling is within
the share, per epoch), and changing the number of workers re-shards through the checkpoint.

Data parallelism. Parameters start identical (same seed); after each backward pass the
gradients of all workers are averaged with one flat all-reduce (torch.distributed; gloo on CPU,
NCCL on GPU), then every worker applies the same optimiser step, so the parameters stay equal.
The Langevin loops run with frozen parameters and need no communication. We do not wrap the
model in DistributedDataParallel: its hooks are built around `forward()`, while the Langevin
loop calls the generators hundreds of times per step for gradients with respect to z only.
`optim.batch_size` is the batch per worker.
"""
from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from drc_core.chains import shard_bounds
from drc_core.config import DRCConfig
from drc_core.fit import TrainState, rank_seed
from drc_core.inference import images_to_tensor
from pipelines.lib import checkpoints as ckpt
from pipelines.lib import tracking
from pipelines.lib.errors import os_reason
from pipelines.lib.parquet_store import load_rows, split_ids


@dataclass
class TrainJob:
    """Everything a worker needs; travels as the trainer's `train_loop_config`."""
    data: str                                  # Parquet dataset URI (pipelines.preprocess output)
    config: dict                               # resolved DRCConfig.to_dict()
    iterations: int
    checkpoint_every: int = 50
    eval_every: int = 50                       # held-out IoU/Dice (when the data has masks); 0: off
    eval_images: int = 64
    eval_steps: int | None = None              # default: langevin.test_steps
    eval_split: str = "test"
    grid_every: int = 100                      # image grids to MLflow; 0: off
    progress_every: int = 10                   # a progress line (losses, it/s, ETA) every N iterations; 0: off
    threads: int = 1                           # torch threads per worker
    gpu: bool = False
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    run_dir: str | None = None                 # the run's local storage folder, if local
    events_path: str | None = None             # JSON lines of restore/fault events (local runs)
    fault: dict = field(default_factory=dict)  # fault drills: {"kind", "iteration", "rank", "marker"}

    def to_dict(self) -> dict:
        return asdict(self)


def batch_ids(ids: torch.Tensor, batch: int, steps_per_epoch: int, iteration: int, seed: int,
              rank: int) -> torch.Tensor:
    """The sample ids of this worker's batch at `iteration`: a fresh permutation of its share
    every epoch, a pure function of (seed, epoch, rank), so a resumed run continues exactly."""
    epoch, pos = divmod(iteration, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch, rank]).permutation(len(ids))
    return ids[torch.from_numpy(perm[pos * batch:(pos + 1) * batch])]


class Comms:
    """Gradient and metric averaging over the Ray Train process group (no-ops for one worker)."""

    def __init__(self, world_size: int):
        self.world = world_size
        self.seconds = 0.0                     # time spent communicating (includes waiting for peers)
        if world_size > 1:
            import torch.distributed as dist
            self.dist = dist

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        t0 = time.perf_counter()
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        self.seconds += time.perf_counter() - t0

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return dict(values)
        t0 = time.perf_counter()
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        self.dist.all_reduce(t)
        self.seconds += time.perf_counter() - t0
        return dict(zip(keys, t.tolist()))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        return {k: v / self.world for k, v in self.sum(values).items()}


def _event(job: TrainJob, **event) -> None:
    print("[drc-train]", json.dumps(event), flush=True)
    if job.events_path:
        with open(job.events_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **event}) + "\n")


def _fault_fires(job: TrainJob, kind: str, iteration: int, rank: int) -> bool:
    """True once per drill: the marker file makes a restarted worker run clean."""
    f = job.fault
    if not f or f.get("kind") != kind or int(f["iteration"]) != iteration or int(f.get("rank", 0)) != rank:
        return False
    try:
        os.close(os.open(f["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    _event(job, event="fault", kind=kind, iteration=iteration, rank=rank, pid=os.getpid())
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def restore(state: TrainState, folder: str, job: TrainJob, rank: int, world: int,
            verified: tuple[dict, list[dict]] | None = None) -> None:
    meta, records = verified or ckpt.verify(folder)
    ckpt.check_compatible(ckpt.load_config(folder), state.cfg, folder)
    state.load_state_dict(ckpt.load_state(folder, state.device))
    dtype = state.chains.z.dtype
    state.chains, state.prior_chains, gens = ckpt.load_chains(folder, records, state.chains.ids,
                                                              state.prior_chains.ids, dtype)
    if meta["world_size"] == world:
        state.generator.set_state(gens[rank].to(state.generator.device))
    else:                                   # re-sharded: a fresh, still deterministic noise stream
        state.generator.manual_seed(rank_seed(state.cfg.seed + 10_007 * state.iteration, rank))
    _event(job, event="restored", rank=rank, world_size=world, saved_world_size=meta["world_size"],
           iteration=state.iteration, checkpoint=str(folder), ids=[int(state.chains.ids[0]), int(state.chains.ids[-1])],
           posterior_digest=ckpt.tensor_digest(state.chains.z))


def resume(state: TrainState, job: TrainJob, rank: int, world: int) -> None:
    """Restore from Ray's last registered checkpoint; else (a failure hit before Ray registered a
    checkpoint whose files were complete, or `--resume`) from the newest intact one in the run
    folder. A registered checkpoint whose files fail verification (corrupted on disk) is passed
    over for the newest intact one, said in a `checkpoint_rejected` event; with none left the
    worker fails naming the damaged file rather than silently starting over."""
    import ray.train
    found = ray.train.get_checkpoint()
    if found is None:
        if (folder := ckpt.latest(job.run_dir)) is not None:
            restore(state, str(folder), job, rank, world)
        return
    with found.as_directory() as folder:
        try:
            verified = ckpt.verify(folder)
        except ckpt.CheckpointError as exc:
            fallback = ckpt.latest(job.run_dir)
            if fallback is None:
                raise ckpt.CheckpointError(f"cannot resume: {exc}; no earlier intact checkpoint "
                                           f"{'under ' + job.run_dir if job.run_dir else 'is reachable'}") from None
            _event(job, event="checkpoint_rejected", rank=rank, checkpoint=str(folder), reason=str(exc),
                   fallback=str(fallback))
            restore(state, str(fallback), job, rank, world)
            return
        restore(state, folder, job, rank, world, verified)


LABEL_FREE = ("recon", "nontrivial", "separability", "confidence", "frame")


def evaluate_shard(state: TrainState, data: dict | None, comms: Comms, steps: int | None) -> dict[str, float]:
    """Held-out evaluation over all workers' slices of the evaluation images, from fresh chains:
    IoU/Dice (%) when the data has masks (eval_iou/eval_dice with the default threshold policy,
    eval_iou_protocol/eval_dice_protocol at the DRC protocol's π_f > ½), and always the
    label-free scores of `drc_core.metrics.label_free_scores` (eval_lf_<name>) and the
    unsupervised score that Tune ranks trials by without labels

        eval_score = eval_lf_separability − eval_trivial

    eval_lf_separability: Otsu's η of π_f (between-class over total variance at the mask's split,
    averaged over images): how cleanly the model splits each image in two; eval_trivial: the
    fraction of images whose mask is (almost) all foreground or all background, the degenerate
    partitions, each costing a full unit. Chosen by measurement (docs/benchmarks.md: two studies,
    Spearman ρ with IoU 0.98 and 0.88, where the reconstruction error gave 0.94 and −0.17)."""
    from drc_core.inference import segment
    from drc_core.metrics import iou_dice, label_free_scores
    from drc_core.threshold import DEFAULT
    sums = dict.fromkeys(("iou", "dice", "iou_protocol", "dice_protocol", "n_masks", "n", "mask_area",
                          *LABEL_FREE), 0.0)
    if data is not None and len(data["images"]):
        seg = segment(state.model, data["images"], state.cfg, steps=steps, seed=0, device=state.device)
        masks = DEFAULT.masks(seg.prob)
        scores = label_free_scores(seg.prob, masks, seg.recon_l1)
        sums.update(n=float(len(masks)), mask_area=float(seg.mask.float().mean(dim=(1, 2)).sum()),
                    **{k: float(v.sum()) for k, v in scores.items()})
        if "masks" in data:
            truth = torch.as_tensor(data["masks"]) > 0
            iou, dice = iou_dice(masks, truth)
            iou_p, dice_p = iou_dice(seg.mask, truth)
            sums.update(iou=float(iou.sum()), dice=float(dice.sum()), iou_protocol=float(iou_p.sum()),
                        dice_protocol=float(dice_p.sum()), n_masks=float(len(iou)))
    t = comms.sum(sums)
    n = max(t["n"], 1.0)
    out = {"eval_mask_area": t["mask_area"] / n, "eval_recon_l1": -t["recon"] / n,
           "eval_trivial": -t["nontrivial"] / n, **{f"eval_lf_{k}": t[k] / n for k in LABEL_FREE}}
    out["eval_score"] = out["eval_lf_separability"] - out["eval_trivial"]
    if t["n_masks"]:
        out.update({f"eval_{k}": 100 * t[k] / t["n_masks"] for k in ("iou", "dice", "iou_protocol", "dice_protocol")})
    return out


def _grid(state: TrainState, x: torch.Tensor, ids: torch.Tensor, masks) -> np.ndarray:
    from drc_core.viz import composition_grid
    with torch.no_grad():
        comp = state.model.compose(state.chains.get(ids).to(state.device))
    return composition_grid(x.cpu(), comp, None if masks is None else torch.as_tensor(masks))


def _eval_slice(job: TrainJob, rank: int, world: int) -> dict | None:
    """This worker's slice of the first `eval_images` of the evaluation split (held out). A
    dataset without that split is scored on its last training images instead (said in the log)."""
    if not job.eval_every:
        return None
    ids = split_ids(job.data, job.eval_split)[:job.eval_images]
    if not len(ids):
        ids = split_ids(job.data, "train")[-job.eval_images:]
        if rank == 0:
            print(f"[drc-train] {job.data} has no {job.eval_split!r} split: evaluating on the last "
                  f"{len(ids)} training images", flush=True)
    lo, hi = shard_bounds(len(ids), world, rank)
    return load_rows(job.data, ids[lo:hi]) if hi > lo else None


def _clock(seconds: float) -> str:
    """1h02m, 4m05s, 9s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class DivergenceError(FloatingPointError):
    pass


def _quiet_report_lines() -> None:
    """Ray 2.60's worker context logs each report, with its whole metrics dict, at INFO from a logger
    named after its source file, which the trainer's LoggingConfig level does not reach."""
    import logging
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:                    # another Ray layout: nothing to quieten
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict) -> None:
    """Ray Train entry point (also runs in-process with world size 1 for unit tests)."""
    import ray.train
    import ray.train.torch
    _quiet_report_lines()
    job = TrainJob(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.threads)
    device = ray.train.torch.get_device() if job.gpu else torch.device("cpu")
    cfg = DRCConfig.from_dict(job.config)

    train_ids = split_ids(job.data, "train")
    if len(train_ids) < world:
        raise ValueError(f"{job.data}: {len(train_ids)} training images cannot be shared by {world} workers")
    lo, hi = shard_bounds(len(train_ids), world, rank)
    rows = load_rows(job.data, train_ids[lo:hi])
    ids = torch.tensor(rows["sample_id"])                  # a copy: Parquet's arrays are read-only
    x_all = images_to_tensor(rows["images"])
    masks_all = rows.get("masks")
    batch = min(cfg.optim.batch_size, len(train_ids) // world)
    steps_per_epoch = max(1, (len(train_ids) // world) // batch)
    eval_data = _eval_slice(job, rank, world)

    state = TrainState.create(cfg, ids, rank=rank, world_size=world, device=device)
    resume(state, job, rank, world)
    comms = Comms(world)
    log = rank == 0 and job.mlflow_run_id is not None and job.tracking_uri is not None
    meta = {"mlflow_run_id": job.mlflow_run_id, "data": job.data, "num_train": int(len(train_ids))}
    _event(job, event="start", rank=rank, world_size=world, iteration=state.iteration, pid=os.getpid(),
           shard=[int(ids[0]), int(ids[-1])])

    seconds, chain_seconds, comm_seconds, timed = 0.0, 0.0, 0.0, 0
    warm_from = state.iteration + 2          # the first iterations of an attempt are not timed
    while state.iteration < job.iterations:
        t0, comm0 = time.perf_counter(), comms.seconds
        b = batch_ids(ids, batch, steps_per_epoch, state.iteration, cfg.seed, rank)
        m = state.step(x_all[torch.searchsorted(ids, b)], b, sync_grads=comms.sync_grads)
        it = state.iteration
        if m["chains_reset"]:                # drc_core reset them and logged a warning; training goes on
            _event(job, event="chains_reset", rank=rank, iteration=it, chains=int(m["chains_reset"]))
        bad = [k for k in ("gen_loss", "ebm_loss", "prior_energy") if not math.isfinite(m[k])]
        if bad:
            raise DivergenceError(f"training diverged at iteration {it}: "
                                  + ", ".join(f"{k}={m[k]}" for k in bad))
        if _fault_fires(job, "raise", it, rank):
            raise RuntimeError(f"injected fault at iteration {it} on rank {rank}")
        if _fault_fires(job, "kill", it, rank):
            _die()
        m = comms.mean({k: v for k, v in m.items() if k != "iteration"})
        m["chains_reset"] = round(m["chains_reset"] * world)     # a count over all workers, not a mean
        dt = time.perf_counter() - t0
        if it > warm_from or job.iterations - warm_from < 2:
            seconds, chain_seconds, timed = seconds + dt, chain_seconds + m["chain_seconds"], timed + 1
            comm_seconds += comms.seconds - comm0
        m.update(seconds=dt, images_per_s=batch * world / dt, epoch=it / steps_per_epoch)
        if job.eval_every and (it % job.eval_every == 0 or it == job.iterations):
            m.update(evaluate_shard(state, eval_data, comms, job.eval_steps))
        if rank == 0 and job.progress_every and (it % job.progress_every == 0 or it == job.iterations):
            keys = ("gen_loss", "ebm_loss", "recon_l1", "mask_area", "images_per_s", "eval_iou")
            per_it = seconds / timed if timed else dt
            print(f"[drc-train] iteration {it}/{job.iterations} "
                  + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
                  + f" it/s={1 / max(per_it, 1e-9):.3g} eta={_clock((job.iterations - it) * per_it)}", flush=True)
        if log:
            tracking.log_metrics(job.tracking_uri, job.mlflow_run_id, m, step=it)
            if job.grid_every and (it % job.grid_every == 0 or it == job.iterations):
                k = min(8, len(ids))
                g = _grid(state, x_all[:k], ids[:k], None if masks_all is None else masks_all[:k])
                tracking.log_image(job.tracking_uri, job.mlflow_run_id, g, f"grids/iter_{it:07d}.png")
        if it % job.checkpoint_every == 0 or it == job.iterations:
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="drc-ckpt-") as tmp:
                kill = _fault_fires(job, "kill-in-checkpoint", it, rank)
                ckpt.write_shard(tmp, rank=rank, world_size=world, state=state, meta=meta,
                                 before_commit=_die if kill else None)
                summary = {**m, "iteration": it, "mean_seconds": seconds / max(timed, 1),
                           "chain_share": chain_seconds / max(seconds, 1e-9),
                           "comm_share": comm_seconds / max(seconds, 1e-9),
                           "checkpoint_write_seconds": time.perf_counter() - t1}
                try:
                    ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"checkpoint_{it:08d}")
                except OSError as exc:       # Ray's copy into storage failed (disk full, permissions)
                    raise ckpt.CheckpointError(
                        f"cannot save checkpoint_{it:08d} into {job.run_dir or 'the run storage'} ({os_reason(exc)}); "
                        f"earlier checkpoints are unchanged and a partial copy fails verification") from exc
