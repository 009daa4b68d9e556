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

import functools
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
from pipelines.lib.chain_reader import load_chains
from pipelines.lib.errors import os_reason
from pipelines.lib.train_eval import eval_slice, evaluate_shard
from pipelines.lib.train_session import TrainSession, TrialSession


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
    run_uri: str | None = None                 # the run's storage folder: checkpoints, chain logs (local or URI)
    events_path: str | None = None             # JSON lines of restore/fault events (local runs)
    chain_checkpoints: bool = True             # checkpoints keep the persistent chains (tune trials: off)
    train_subset: int | None = None            # train on a seeded subset of this many training images
    subset_seed: int = 0
    fault: dict = field(default_factory=dict)  # fault drills: {"kind", "iteration", "rank", "marker"}

    def to_dict(self) -> dict:
        return asdict(self)


def batch_ids(ids: torch.Tensor, batch: int, steps_per_epoch: int, iteration: int, seed: int,
              rank: int) -> torch.Tensor:
    """The sample ids of this worker's batch at `iteration`: a fresh permutation of its share
    every epoch, a pure function of (seed, epoch, rank), so a resumed run continues exactly."""
    epoch, pos = divmod(iteration, steps_per_epoch)
    perm = _permutation(len(ids), seed, epoch, rank)
    return ids[torch.as_tensor(perm[pos * batch:(pos + 1) * batch].copy())]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int, rank: int) -> np.ndarray:
    """An epoch's order of a shard, drawn once per epoch (not once per iteration: O(shard))."""
    perm = np.random.default_rng([seed, epoch, rank]).permutation(n)
    perm.flags.writeable = False
    return perm


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

    def gather(self, value) -> list:
        """Every rank's `value` (small, picklable), in rank order."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out


def _event(job: TrainJob, **event) -> None:
    if event["event"] != "checkpointed":              # routine: the events file only
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


def _load(folder: str, state: TrainState, job: TrainJob, counter: list) -> dict:
    """Everything this rank restores from `folder`, read and verified (nothing applied yet)."""
    meta, recs = ckpt.records(folder)
    _, cfg, saved = ckpt.load_model(folder, state.device)
    ckpt.check_compatible(cfg, state.cfg, folder)
    chains = None
    if all(r.get("chains") for r in recs):
        chains = load_chains(folder, recs, state.chains.ids, state.prior_chains.ids, state.chains.z.dtype, counter)
    return {"meta": meta, "records": recs, "state": saved, "chains": chains}


def restore(state: TrainState, folder: str, job: TrainJob, rank: int, world: int, log: ckpt.ChainLog | None,
            loaded: dict | None = None, seconds: float = 0.0, counter: list | None = None) -> None:
    """Apply a checkpoint to this rank's state (reading it unless `loaded`); with the same number of
    workers its chain log continues the saved one."""
    counter = counter if counter is not None else [0]
    t0 = time.perf_counter()
    loaded = loaded or _load(folder, state, job, counter)
    meta = loaded["meta"]
    state.load_state_dict(loaded["state"])
    if loaded["chains"] is not None:
        state.chains, state.prior_chains, gens = loaded["chains"]
    if meta["world_size"] == world and loaded["chains"] is not None:
        state.generator.set_state(gens[rank].to(state.generator.device))
        if log is not None:
            log.adopt(loaded["records"][rank])
    else:                                   # re-sharded or no chains kept: a fresh, still deterministic noise stream
        state.generator.manual_seed(rank_seed(state.cfg.seed + 10_007 * state.iteration, rank))
    _event(job, event="restored", rank=rank, world_size=world, saved_world_size=meta["world_size"],
           iteration=state.iteration, checkpoint=str(folder), ids=[int(state.chains.ids[0]), int(state.chains.ids[-1])],
           chains="restored" if loaded["chains"] is not None else "fresh (the checkpoint keeps none)",
           bytes_read=counter[0], seconds=seconds + time.perf_counter() - t0,
           posterior_digest=ckpt.tensor_digest(state.chains.z))


def resume(state: TrainState, job: TrainJob, rank: int, world: int, comms: "Comms",
           log: ckpt.ChainLog | None = None, registered: str | None = None) -> None:
    """Restore from Ray's last registered checkpoint, else from the newest complete one in the run
    folder (a failure hit before Ray registered one, or `--resume`). Every rank reads and verifies
    what it needs; if any rank finds a file damaged, all of them pass that checkpoint over for the
    next older complete one (a `checkpoint_rejected` event on each rank, with the reason). With a
    checkpoint registered and none left, the worker fails naming the damaged file rather than
    silently starting over."""
    found = [c for c in ckpt.candidates(job.run_uri) if str(c).rstrip("/") != str(registered or "").rstrip("/")]
    todo = ([registered] if registered else []) + found
    reason = None
    for i, folder in enumerate(todo):
        try:
            ckpt.records(folder)
        except ckpt.CheckpointError:            # never finished (a kill while writing it): not a checkpoint
            continue
        t0, counter, error, loaded = time.perf_counter(), [0], None, None
        try:
            loaded = _load(folder, state, job, counter)
        except ckpt.CheckpointError as exc:
            error = str(exc)
        errors = comms.gather(error)
        if not any(errors):
            restore(state, folder, job, rank, world, log, loaded, time.perf_counter() - t0, counter)
            return
        reason = next(e for e in errors if e)
        later = next((str(f) for f in todo[i + 1:]), None)
        _event(job, event="checkpoint_rejected", rank=rank, checkpoint=str(folder), reason=reason, fallback=later)
    if registered is not None and reason is not None:
        raise ckpt.CheckpointError(f"cannot resume: {reason}; no earlier intact checkpoint "
                                   f"{'under ' + job.run_uri if job.run_uri else 'is reachable'}")


def _grid(state: TrainState, x: torch.Tensor, ids: torch.Tensor, masks) -> np.ndarray:
    from drc_core.viz import composition_grid
    with torch.no_grad():
        comp = state.model.compose(state.chains.get(ids).to(state.device))
    return composition_grid(x.cpu(), comp, None if masks is None else torch.as_tensor(masks))


def _shard_rows(job: TrainJob, rank: int, world: int) -> tuple[dict, int]:
    """This rank's training rows (read from the parts that hold them, nothing else) and the number of
    training images in all: its contiguous share of the training split's ids, or of a seeded subset
    of them (`train_subset`, tune's trials)."""
    from pipelines.lib.parquet_store import Store, load_range, load_rows, split_range
    lo, hi = split_range(Store(job.data).read_manifest(), "train")
    n = hi - lo
    if job.train_subset is not None and job.train_subset < n:
        chosen = np.sort(np.random.default_rng([job.subset_seed, 11]).choice(n, job.train_subset, replace=False)) + lo
        n = len(chosen)
    else:
        chosen = None
    if n < world:
        raise ValueError(f"{job.data}: {n} training images cannot be shared by {world} workers")
    a, b = shard_bounds(n, world, rank)
    return (load_rows(job.data, chosen[a:b]) if chosen is not None else load_range(job.data, lo + a, lo + b)), n


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


def train_loop(config: dict, session: TrainSession | TrialSession | None = None) -> None:
    """Ray Train's entry point on each worker of the group; pipelines.tune runs it in a trial's own
    process with a TrialSession."""
    import ray
    if session is None:
        _quiet_report_lines()
        session = TrainSession()
    job = TrainJob(**config)
    rank, world = session.rank, session.world
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    torch.set_num_threads(job.threads)
    device = session.device(job.gpu)
    cfg = DRCConfig.from_dict(job.config)

    rows, n_train = _shard_rows(job, rank, world)
    ids = torch.tensor(rows["sample_id"])                  # a copy: Parquet's arrays are read-only
    images, masks_all = rows["images"], rows.get("masks")    # uint8; a batch becomes float when drawn
    batch = min(cfg.optim.batch_size, n_train // world)
    steps_per_epoch = max(1, (n_train // world) // batch)
    eval_data = eval_slice(job, rank, world)

    state = TrainState.create(cfg, ids, rank=rank, world_size=world, device=device)
    comms = Comms(world)
    chain_log = ckpt.ChainLog(job.run_uri, rank, world) if job.run_uri and job.chain_checkpoints else None
    resume(state, job, rank, world, comms, chain_log, session.registered(job))
    log = rank == 0 and job.mlflow_run_id is not None and job.tracking_uri is not None
    meta = {"mlflow_run_id": job.mlflow_run_id, "data": job.data, "num_train": int(n_train)}
    _event(job, event="start", rank=rank, world_size=world, iteration=state.iteration, pid=os.getpid(),
           shard=[int(ids[0]), int(ids[-1])])

    seconds, chain_seconds, comm_seconds, timed = 0.0, 0.0, 0.0, 0
    warm_from = state.iteration + 2          # the first iterations of an attempt are not timed
    while state.iteration < job.iterations:
        t0, comm0 = time.perf_counter(), comms.seconds
        b = batch_ids(ids, batch, steps_per_epoch, state.iteration, cfg.seed, rank)
        m = state.step(images_to_tensor(images[torch.searchsorted(ids, b).numpy()]), b, sync_grads=comms.sync_grads)
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
                g = _grid(state, images_to_tensor(images[:k]), ids[:k], None if masks_all is None else masks_all[:k])
                tracking.log_image(job.tracking_uri, job.mlflow_run_id, g, f"grids/iter_{it:07d}.png")
        if it % job.checkpoint_every == 0 or it == job.iterations:
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="drc-ckpt-") as tmp:
                kill = _fault_fires(job, "kill-in-checkpoint", it, rank)
                record = ckpt.write_shard(tmp, rank=rank, world_size=world, state=state, meta=meta, log=chain_log,
                                          chains=job.chain_checkpoints, node=node,
                                          before_commit=_die if kill else None)
                written = comms.sum({"bytes": float(record["chain_bytes_written"])})
                summary = {**m, "iteration": it, "mean_seconds": seconds / max(timed, 1),
                           "chain_share": chain_seconds / max(seconds, 1e-9),
                           "comm_share": comm_seconds / max(seconds, 1e-9),
                           "checkpoint_write_seconds": time.perf_counter() - t1,
                           "checkpoint_chain_bytes": written["bytes"]}
                try:
                    session.report(job, summary, tmp, f"checkpoint_{it:08d}")
                except OSError as exc:       # the copy into storage failed (disk full, permissions)
                    raise ckpt.CheckpointError(
                        f"cannot save checkpoint_{it:08d} into {job.run_uri or 'the run storage'} ({os_reason(exc)}); "
                        f"earlier checkpoints are unchanged and a partial copy fails verification") from exc
            if chain_log is not None:
                chain_log.collect_garbage()
            _event(job, event="checkpointed", rank=rank, iteration=it, seconds=time.perf_counter() - t1,
                   chain_bytes=record["chain_bytes_written"], rows=int(state.chains.ids.numel()),
                   s_per_iteration=seconds / max(timed, 1))
