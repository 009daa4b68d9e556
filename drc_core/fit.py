"""Training state and a local single-process fit loop (the Ray Train worker reuses `TrainState`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from drc_core.chains import InMemoryChainBuffer
from drc_core.config import DRCConfig
from drc_core.em import Optimizers, em_step
from drc_core.inference import images_to_tensor
from drc_core.model import DRCModel


@dataclass
class TrainState:
    """Everything one training process owns: model, optimisers, its chains, RNGs, the counter."""
    cfg: DRCConfig
    model: DRCModel
    opt: Optimizers
    chains: InMemoryChainBuffer            # posterior chains z⁺ of this process's samples
    prior_chains: InMemoryChainBuffer      # shared pool, or one prior chain per sample
    generator: torch.Generator             # Langevin noise and prior-pool draws
    iteration: int = 0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: DRCConfig, num_samples: int, *, id_offset: int = 0, seed: int | None = None,
               device: str | torch.device = "cpu") -> "TrainState":
        seed = cfg.seed if seed is None else seed
        torch.manual_seed(seed)                                   # parameter init
        model = DRCModel(cfg.model, cfg.ablation).to(device)
        dim = cfg.model.latent_dim
        pool = cfg.langevin.prior_pool_size
        chains = InMemoryChainBuffer(num_samples, dim, offset=id_offset, seed=seed + 1)
        prior = (InMemoryChainBuffer(pool, dim, seed=seed + 2) if pool > 0
                 else InMemoryChainBuffer(num_samples, dim, offset=id_offset, seed=seed + 2))
        gen = torch.Generator(device=device).manual_seed(seed + 3)
        return cls(cfg=cfg, model=model, opt=Optimizers.create(model, cfg), chains=chains,
                   prior_chains=prior, generator=gen)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _fresh(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.model.latent_dim, generator=self.generator, device=self.device)

    def step(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
        """One EM iteration on images x (B, 3, H, W) in [-1, 1] with sample ids (B,)."""
        lv, dev, n = self.cfg.langevin, self.device, x.shape[0]
        if lv.prior_pool_size > 0:
            prior_ids = torch.randint(lv.prior_pool_size, (n,), generator=self.generator,
                                      device=self.generator.device).cpu()
        else:
            prior_ids = ids
        if lv.persistent:
            z_pos, z_neg = self.chains.get(ids).to(dev), self.prior_chains.get(prior_ids).to(dev)
        else:                                                    # short-run ablation
            z_pos, z_neg = self._fresh(n), self._fresh(n)
        z_pos, z_neg, metrics = em_step(self.model, self.opt, x.to(dev), z_pos, z_neg, self.cfg,
                                        generator=self.generator)
        if lv.persistent:
            self.chains.set(ids, z_pos)
            self.prior_chains.set(prior_ids, z_neg)
        self.iteration += 1
        metrics["iteration"] = self.iteration
        return metrics


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
