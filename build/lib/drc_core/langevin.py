"""Langevin samplers for the prior and the posterior (paper Eq. 13, Listing 2), as plain functions.

z ← z − ½δ²·∇_z U(z) + δ·ε, ε ~ N(0, I). Only z moves: autograd is asked for ∂U/∂z alone, so no
parameter gradient is ever computed inside the loop, and nothing the energy does not use is run
(the auxiliary classifiers never appear here).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from drc_core.config import DRCConfig
from drc_core.model import DRCModel, to_image_layout
from drc_core.objective import region_competition, total_variation

Energy = Callable[[torch.Tensor], torch.Tensor]
# one generator for the whole batch, or one per row: then every row's noise depends only on its
# own generator, so a sample's chain is the same whatever batch it is processed in
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype)
                            for g in generator])
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class LossWeights:
    """Regulariser weights after the ablation switches (a switched-off term weighs 0)."""
    tv: float
    pseudo_label: float
    ortho: float

    @classmethod
    def from_config(cls, cfg: DRCConfig) -> "LossWeights":
        a, l = cfg.ablation, cfg.loss
        return cls(tv=l.tv_weight if a.tv else 0.0,
                   pseudo_label=l.pseudo_label_weight if a.pseudo_label else 0.0,
                   ortho=l.ortho_weight if a.ortho else 0.0)


def langevin(energy: Energy, z: torch.Tensor, *, steps: int, step_size: float,
             generator: Generators = None) -> torch.Tensor:
    """Run `steps` Langevin updates of z (B, D) under the per-sample energy `energy(z) -> (B,)`."""
    z = z.detach().clone()
    half_step2 = 0.5 * step_size ** 2
    for _ in range(steps):
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(z).sum(), z)
        noise = randn(z.shape, generator, z.device, z.dtype)
        z = (z.detach() - half_step2 * grad).add_(noise, alpha=step_size)
    return z.detach()


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad inside the block: autograd then neither computes nor keeps
    anything for weight gradients during Langevin (only ∂U/∂z is wanted)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@functools.lru_cache(maxsize=None)
def bf16_is_fast(device_type: str) -> bool:
    """Whether bf16 autocast makes the generators faster on this kind of device: a CUDA GPU that
    supports bf16, or a CPU with bf16 matrix instructions (AMX or AVX512-BF16). Elsewhere oneDNN
    emulates bf16, and a cpu-32 posterior step of 64 images was 13× slower in bf16 than in fp32
    (2,696 vs 207 ms, one thread, 2-core AMD EPYC with AVX2 only), so
    `langevin.bf16` then leaves the loop in fp32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def prior_energy(model: DRCModel, z: torch.Tensor) -> torch.Tensor:
    """U(z) = −f_α(z) + ½‖z‖² per sample."""
    f, _, _ = model.ebm(z)
    return -f + 0.5 * z.pow(2).sum(1)


def posterior_energy(model: DRCModel, x: torch.Tensor, z: torch.Tensor, cfg: DRCConfig,
                     *, bf16: bool | None = None) -> torch.Tensor:
    """U(z) = −Q(z) + w_TV·TV(warped bg) − f_α(z) + ½‖z‖² per sample.

    The generator passes run under bf16 autocast when `langevin.bf16` is on and the device runs
    bf16 natively (`bf16_is_fast`); z, the energy and the update stay fp32. `bf16` forces either.
    """
    use_bf16 = (cfg.langevin.bf16 and bf16_is_fast(z.device.type)) if bf16 is None else bf16
    with torch.autocast(device_type=z.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        comp = model.compose(z)
    rc = region_competition(x, comp, sigma=cfg.loss.sigma, responsibility=cfg.loss.responsibility,
                            window=cfg.loss.competition_window)
    energy = -rc.q + prior_energy(model, z)
    tv = LossWeights.from_config(cfg).tv
    if tv:
        energy = energy + tv * total_variation(comp.bg_warped)
    return energy


def sample_prior(model: DRCModel, z: torch.Tensor, cfg: DRCConfig, *, steps: int | None = None,
                 generator: Generators = None) -> torch.Tensor:
    lv = cfg.langevin
    with frozen(model):
        return langevin(lambda v: prior_energy(model, v), z, steps=lv.prior_steps if steps is None else steps,
                        step_size=lv.prior_step_size, generator=generator)


def sample_posterior(model: DRCModel, x: torch.Tensor, z: torch.Tensor, cfg: DRCConfig, *,
                     steps: int | None = None, generator: Generators = None) -> torch.Tensor:
    lv = cfg.langevin
    x = to_image_layout(x)
    with frozen(model):
        return langevin(lambda v: posterior_energy(model, x, v, cfg), z,
                        steps=lv.posterior_steps if steps is None else steps,
                        step_size=lv.posterior_step_size, generator=generator)


def reset_diverged(z: torch.Tensor, threshold: float, generator: Generators = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace chains that are non-finite or beyond `threshold` in any coordinate by N(0, I) draws.

    Returns the repaired z and a bool (B,) mask of the chains that were reset.
    """
    bad = ~torch.isfinite(z).all(1) | (z.abs() > threshold).any(1)
    if bad.any():
        fresh = randn(z.shape, generator, z.device, z.dtype)
        z = torch.where(bad[:, None], fresh, z)
    return z, bad
