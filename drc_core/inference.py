"""Test-time segmentation: a fresh posterior chain from N(0, I), T Langevin steps, then π_f."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from drc_core.config import DRCConfig
from drc_core.langevin import randn, reset_diverged, sample_posterior
from drc_core.model import DRCModel


@dataclass
class Segmentation:
    prob: torch.Tensor       # (N, H, W) foreground probability π_f
    mask: torch.Tensor       # (N, H, W) bool, π_f > 0.5
    z: torch.Tensor          # (N, D) final posterior latents
    recon_l1: torch.Tensor   # (N,) mean |x̂ − x|: how well the model explains the image


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    t = torch.as_tensor(images)
    if t.dim() != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def decode(model: DRCModel, x: torch.Tensor, z: torch.Tensor) -> Segmentation:
    comp = model.compose(z)
    prob = comp.pi_f[:, 0]
    return Segmentation(prob=prob, mask=prob > 0.5, z=z,
                        recon_l1=(comp.recon - x).abs().flatten(1).mean(1))


def sample_generators(seed: int, sample_ids, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, sample_id): a sample's chain (its start and
    every noise draw) is then the same whichever batch, actor or machine segments it."""
    return [torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + 7_919 + int(i))
            for i in sample_ids]


def segment(model: DRCModel, images: np.ndarray | torch.Tensor, cfg: DRCConfig, *,
            steps: int | None = None, z_init: torch.Tensor | None = None, batch_size: int = 64,
            seed: int = 0, sample_ids=None, device: str | torch.device | None = None,
            on_batch: Callable[[int, int], None] | None = None) -> Segmentation:
    """Segment uint8 images (N, H, W, 3) with `steps` posterior Langevin steps (default: the
    preset's test steps). `z_init` continues from given chains (e.g. the training chains)
    instead of N(0, I). Same model + images + seed → same masks; with `sample_ids` each image's
    chain depends only on (seed, its id), not on the batch it is in. `device`: where the
    chains run (default: the model's device). With `langevin.test_average` = N > 0, π_f is the
    mean over the chain's last N steps (of the `steps`) rather than its value at the last one.
    `on_batch(done, total)`: called after each batch (progress)."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    steps = cfg.langevin.test_steps if steps is None else steps
    average = min(cfg.langevin.test_average, steps)
    x_all = images_to_tensor(images)
    if sample_ids is not None and len(sample_ids) != x_all.shape[0]:
        raise ValueError(f"{len(sample_ids)} sample ids for {x_all.shape[0]} images")
    batch_gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    parts: list[Segmentation] = []
    for lo in range(0, x_all.shape[0], batch_size):
        x = x_all[lo:lo + batch_size].to(device)
        gen = (batch_gen if sample_ids is None else
               sample_generators(seed, sample_ids[lo:lo + batch_size], device))
        if z_init is None:
            z = randn((x.shape[0], model.latent_dim), gen, device)
        else:
            z = z_init[lo:lo + batch_size].to(device)
        z = sample_posterior(model, x, z, cfg, steps=steps - average, generator=gen)
        prob_sum = None
        for _ in range(average):
            z = sample_posterior(model, x, z, cfg, steps=1, generator=gen)
            pi = decode(model, x, z).prob
            prob_sum = pi if prob_sum is None else prob_sum + pi
        z, _ = reset_diverged(z, cfg.langevin.divergence_threshold, gen)
        seg = decode(model, x, z)
        if average:
            seg.prob = prob_sum / average
            seg.mask = seg.prob > 0.5
        parts.append(seg)
        if on_batch is not None:
            on_batch(min(lo + batch_size, x_all.shape[0]), x_all.shape[0])
    return Segmentation(*(torch.cat([getattr(p, f).cpu() for p in parts]) for f in
                          ("prob", "mask", "z", "recon_l1")))


POLICIES_REPORTED = ("otsu", "otsu-corpus", "gmm", "gmm-corpus")


def policy_scores(prob, target, policies=POLICIES_REPORTED) -> dict[str, dict[str, float]]:
    """IoU/Dice (%) and predicted foreground area (%) of π_f maps under each threshold policy
    (drc_core.threshold; the policies never see `target`, which only scores them)."""
    from drc_core.metrics import mean_iou_dice
    from drc_core.threshold import ThresholdPolicy
    t = torch.as_tensor(target) > 0
    out = {}
    for name in policies:
        masks = ThresholdPolicy.parse(name).masks(prob)
        out[name] = {**mean_iou_dice(masks, t), "area": 100.0 * float(masks.float().mean())}
    return out


def evaluate(model: DRCModel, images: np.ndarray, masks: np.ndarray, cfg: DRCConfig, *,
             steps: int | None = None, seed: int = 0, batch_size: int = 64,
             z_init: torch.Tensor | None = None) -> dict[str, float]:
    """IoU/Dice (%) of fresh-chain segmentation against ground-truth masks at the DRC protocol's
    π_f > ½ (`iou`, `dice`), the same π_f under the label-free threshold policies (`policies`),
    mask and true foreground area, reconstruction error and how π_f separates the true regions
    (`metrics.separation`). `z_init`: continue these chains (e.g. the persistent training chains of
    the same images) instead of starting from N(0, I)."""
    from drc_core.metrics import mean_iou_dice, separation
    seg = segment(model, images, cfg, steps=steps, seed=seed, batch_size=batch_size, z_init=z_init)
    target = torch.as_tensor(masks) > 0
    out = {**mean_iou_dice(seg.mask, target), **separation(seg.prob, target)}
    out["mask_area"] = float(seg.mask.float().mean())
    out["true_area"] = float(target.float().mean())
    out["recon_l1"] = float(seg.recon_l1.mean())
    out["policies"] = policy_scores(seg.prob, target)
    return out
