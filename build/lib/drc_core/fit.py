"""Training state and a local single-process fit loop (the Ray Train worker reuses `TrainState`)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from drc_core.chains import InMemoryChainBuffer, shard_bounds
from drc_core.config import DRCConfig
from drc_core.em import Optimizers, em_step
from drc_core.inference import images_to_tensor
from drc_core.model import DRCModel

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything one training process owns: model, optimisers, its chains, RNGs, the counter.

    In data-parallel training each process creates one with its own `sample_ids` and `rank`:
    parameters start identical everywhere (seeded by cfg.seed), chains start from a function of
    (seed, sample_id), the Langevin noise differs per rank, and a shared prior pool of
    `langevin.prior_pool_size` chains is split across the ranks like the samples.
    """
    cfg: DRCConfig
    model: DRCModel
    opt: Optimizers
    chains: InMemoryChainBuffer            # posterior chains z⁺ of this process's samples
    prior_chains: InMemoryChainBuffer      # this process's share of the prior pool, or one per sample
    generator: torch.Generator             # Langevin noise and prior-pool draws
    iteration: int = 0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: DRCConfig, sample_ids, *, rank: int = 0, world_size: int = 1,
               device: str | torch.device = "cpu") -> "TrainState":
        """`sample_ids`: this process's training samples (sorted), or a count n for ids 0..n−1."""
        if isinstance(sample_ids, int):
            sample_ids = torch.arange(sample_ids)
        torch.manual_seed(cfg.seed)                               # identical parameters on every rank
        model = DRCModel(cfg.model, cfg.ablation).to(device)
        dim, pool = cfg.model.latent_dim, cfg.langevin.prior_pool_size
        dtype = torch.float16 if cfg.langevin.chain_fp16 else torch.float32
        chains = InMemoryChainBuffer(sample_ids, dim, seed=cfg.seed + 1, dtype=dtype)
        if pool > 0:
            if pool < world_size:
                raise ValueError(f"langevin.prior_pool_size ({pool}) must be >= the number of workers "
                                 f"({world_size})")
            prior = InMemoryChainBuffer(torch.arange(*shard_bounds(pool, world_size, rank)), dim,
                                        seed=cfg.seed + 2, dtype=dtype)
        else:
            prior = InMemoryChainBuffer(sample_ids, dim, seed=cfg.seed + 2, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, rank))
        return cls(cfg=cfg, model=model, opt=Optimizers.create(model, cfg), chains=chains,
                   prior_chains=prior, generator=gen)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _fresh(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.latent_dim, generator=self.generator, device=self.device)

    def step(self, x: torch.Tensor, ids: torch.Tensor, *,
             sync_grads: Callable[[list[torch.nn.Parameter]], None] | None = None) -> dict[str, float]:
        """One EM iteration on images x (B, 3, H, W) in [-1, 1] with sample ids (B,).
        `chain_seconds` in the result is the time spent reading and writing the chain buffers."""
        lv, dev, n = self.cfg.langevin, self.device, x.shape[0]
        t0 = time.perf_counter()
        if lv.prior_pool_size > 0:
            rows = torch.randint(len(self.prior_chains), (n,), generator=self.generator,
                                 device=self.generator.device).cpu()
            prior_ids = self.prior_chains.ids[rows]
        else:
            prior_ids = ids
        if lv.persistent:
            z_pos, z_neg = self.chains.get(ids).to(dev), self.prior_chains.get(prior_ids).to(dev)
        else:                                                    # short-run ablation
            z_pos, z_neg = self._fresh(n), self._fresh(n)
        chain_seconds = time.perf_counter() - t0
        z_pos, z_neg, metrics = em_step(self.model, self.opt, x.to(dev), z_pos, z_neg, self.cfg,
                                        generator=self.generator, sync_grads=sync_grads)
        t0 = time.perf_counter()
        if lv.persistent:
            self.chains.set(ids, z_pos)
            self.prior_chains.set(prior_ids, z_neg)
        metrics["chain_seconds"] = chain_seconds + time.perf_counter() - t0
        self.iteration += 1
        metrics["iteration"] = self.iteration
        if metrics["chains_reset"]:
            # em_step replaced them by N(0, I) draws; training goes on, but many resets in a row
            # mean the Langevin step sizes are too large for this model
            log.warning("iteration %d: reset %d diverged Langevin chain(s) (non-finite or |z| > %g) "
                        "to N(0, I)", self.iteration, int(metrics["chains_reset"]), lv.divergence_threshold)
        return metrics

    # ---- checkpointing (chains are saved per shard by the caller) -------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizers": self.opt.state_dict(),
                "iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizers"])
        self.iteration = int(state["iteration"])


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's Langevin-noise generator."""
    return seed + 3 + 7919 * rank


def fit(cfg: DRCConfig, images: np.ndarray, *, iterations: int | None = None, max_seconds: float | None = None,
        state: TrainState | None = None, on_iteration: Callable[[TrainState, dict], bool | None] | None = None,
        device: str | torch.device = "cpu") -> TrainState:
    """Train on uint8 images (N, H, W, 3) whose sample ids are 0..N−1, in shuffled epochs.

    Stops after `iterations` (default: cfg.optim.iterations) or `max_seconds` of wall time.
    `on_iteration(state, metrics)` runs after every iteration (logging, evaluation, checkpoints);
    returning True stops training.
    """
    x_all = images_to_tensor(images)
    n, batch = x_all.shape[0], min(cfg.optim.batch_size, x_all.shape[0])
    state = state or TrainState.create(cfg, n, device=device)
    total = cfg.optim.iterations if iterations is None else iterations
    order_rng = np.random.default_rng([cfg.seed, 7])
    order, cursor = order_rng.permutation(n), 0
    start = time.perf_counter()
    while state.iteration < total:
        if cursor + batch > n:
            order, cursor = order_rng.permutation(n), 0
        ids = torch.from_numpy(order[cursor:cursor + batch])
        cursor += batch
        t0 = time.perf_counter()
        metrics = state.step(x_all[ids], ids)
        metrics["seconds"] = time.perf_counter() - t0
        metrics["images_per_s"] = batch / metrics["seconds"]
        state.history.append(metrics)
        if on_iteration is not None and on_iteration(state, metrics):
            break
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            break
    return state
