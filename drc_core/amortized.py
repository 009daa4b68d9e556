"""Amortised segmentation: a small U-Net distilled from a trained DRC model.

DRC's own inference runs hundreds to thousands of posterior Langevin steps per image. The
student maps an image to the foreground probability π_f in one forward pass. It is trained on
(image, π_f) pairs the teacher provides in two ways:

- `chain`: the real training images with π_f decoded from their persistent posterior chains
  (the chains already hold posterior samples, so these targets cost one generator pass each);
- `prior`: images the teacher synthesises from its prior — z from prior Langevin, then the
  composite x̂ and its π_f — as ILSGAN trains its segmenter on generated (image, mask) pairs.

The targets are soft (π_f ∈ [0, 1]) and the loss is binary cross-entropy; the mask is
`sigmoid(logit) > 0.5`, as DRC's is `π_f > 0.5`.

`keep_off_border` drops pairs whose mask covers much of the image's frame (beyond the paper: the
boundary prior of salient-object detection, that a photographed object seldom fills the edges of
the picture). A weak teacher paints much of the frame foreground (on PASCAL-S the weakest of five
training seeds 37 % of it, the true masks 7 %); trained only on the pairs that stay off it, the
student learns what the teacher got right (docs/quality.md §3).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from drc_core.config import DRCConfig
from drc_core.inference import decode, images_to_tensor, segment
from drc_core.langevin import sample_prior
from drc_core.metrics import border_fraction
from drc_core.model import DRCModel
from drc_core.threshold import DEFAULT, ThresholdPolicy


@dataclass
class StudentConfig:
    resolution: int
    width: int = 8            # channels of the first level; doubled at each level down
    levels: int = 2           # resolution halvings (each a 2× max-pool)

    def validate(self) -> "StudentConfig":
        if self.resolution >> self.levels < 2 or self.width <= 0:
            raise ValueError(f"student: {self.levels} levels need resolution ≥ {2 << self.levels} "
                             f"and width > 0, got resolution {self.resolution}, width {self.width}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Image in [-1, 1] (B, 3, H, W) → foreground logit (B, 1, H, W)."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg.validate()
        widths = [cfg.width << i for i in range(cfg.levels + 1)]
        self.down = nn.ModuleList([_block(3, widths[0])] +
                                  [_block(widths[i], widths[i + 1]) for i in range(cfg.levels)])
        self.up = nn.ModuleList([_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(cfg.levels))])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skips.pop()], 1))
        return self.head(x)


@torch.no_grad()
def predict(student: UNet, images: np.ndarray | torch.Tensor, *, batch_size: int = 256,
            device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 images (N, H, W, 3) → foreground probability (N, H, W) on the CPU, computed on
    `device` (default: the student's)."""
    device = next(student.parameters()).device if device is None else device
    x_all = images_to_tensor(images)
    student.eval()
    out = [torch.sigmoid(student(x_all[lo:lo + batch_size].to(device)))[:, 0].float().cpu()
           for lo in range(0, x_all.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, *x_all.shape[2:])


@torch.no_grad()
def chain_pairs(model: DRCModel, images: np.ndarray, z: torch.Tensor, *, batch_size: int = 256,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images (as [-1, 1] tensors) and the π_f their persistent chains decode to (on the
    CPU; decoded on the model's device)."""
    x_all = images_to_tensor(images)
    model.eval()
    dev = next(model.parameters()).device
    probs = [decode(model, x_all[lo:lo + batch_size].to(dev), z[lo:lo + batch_size].float().to(dev)).prob.cpu()
             for lo in range(0, x_all.shape[0], batch_size)]
    return x_all, torch.cat(probs)


def posterior_pairs(model: DRCModel, images: np.ndarray, cfg: DRCConfig, *, seed: int = 0,
                    sample_ids: np.ndarray | None = None, on_batch: Callable[[int, int], None] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images and the π_f of fresh posterior chains (the preset's test-time Langevin; a
    teacher without persistent chains, e.g. a `model.pt`)."""
    seg = segment(model, images, cfg, seed=seed, sample_ids=sample_ids, on_batch=on_batch)
    return images_to_tensor(images), seg.prob


def prior_pairs(model: DRCModel, cfg: DRCConfig, n: int, *, generator: torch.Generator,
                batch_size: int = 256, on_batch: Callable[[int, int], None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """n images synthesised from the teacher's prior (z from prior Langevin, started at N(0, I))
    and their π_f, on the CPU. The chains run on the model's device, which `generator` must be on.
    `on_batch(done, n)`: called after each batch (progress)."""
    model.eval()
    dev = next(model.parameters()).device
    xs, probs = [], []
    for lo in range(0, n, batch_size):
        z = torch.randn(min(batch_size, n - lo), model.latent_dim, generator=generator, device=dev)
        z = sample_prior(model, z, cfg, generator=generator)
        with torch.no_grad():
            comp = model.compose(z)
        xs.append(comp.recon.clamp(-1, 1).float().cpu())
        probs.append(comp.pi_f[:, 0].float().cpu())
        if on_batch is not None:
            on_batch(lo + z.shape[0], n)
    return torch.cat(xs), torch.cat(probs)


def keep_off_border(pairs: list[tuple[torch.Tensor, torch.Tensor]], masks: list[torch.Tensor],
                    max_border: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs whose mask (`masks`: one (N, H, W) set per pair set) covers at most `max_border` of
    the frame (`border_fraction`). Raises ValueError when none is left."""
    if not 0.0 <= max_border <= 1.0:
        raise ValueError(f"max_border must lie in [0, 1], got {max_border}")
    kept = []
    for (x, y), m in zip(pairs, masks, strict=True):
        keep = border_fraction(m) <= max_border
        kept.append((x[keep], y[keep]))
    if sum(x.shape[0] for x, _ in kept) == 0:
        raise ValueError(f"no pair's mask covers at most {max_border:g} of the image frame "
                         f"({sum(x.shape[0] for x, _ in pairs)} pairs): raise the limit or keep all pairs")
    return kept


def training_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], targets: ThresholdPolicy | None,
                   max_border: float | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What a student learns from the teacher's (image, π_f) pair sets: the masks `targets` makes of
    π_f (None: π_f itself) and, with `max_border`, only the pairs whose mask stays off the frame
    (`keep_off_border`; a soft target's mask is the default policy's)."""
    if targets is not None:
        pairs = [(x, targets.masks(y).float()) for x, y in pairs]
    if max_border is None:
        return pairs
    masks = [y > 0.5 if targets is not None else DEFAULT.masks(y) for _, y in pairs]
    return keep_off_border(pairs, masks, max_border)


def distill(pairs: list[tuple[torch.Tensor, torch.Tensor]], student_cfg: StudentConfig, *, steps: int,
            batch_size: int = 64, lr: float = 2e-3, seed: int = 0, device: str | torch.device = "cpu",
            on_step: Callable[[int, float], None] | None = None) -> UNet:
    """Train a student on the union of (image, π_f) pair sets with BCE against the soft π_f,
    random horizontal flips, Adam with a cosine schedule. The pairs stay where they are (the CPU);
    each batch is drawn there and moved to `device`, where the student trains and is returned."""
    x = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])[:, None]
    if x.shape[0] == 0:
        raise ValueError("distill: no training pairs")
    torch.manual_seed(seed)
    student = UNet(student_cfg).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    student.train()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)
        xb, yb = x[idx].to(device), y[idx].to(device)
        flip = (torch.rand(idx.shape[0], generator=gen) < 0.5).to(device)
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        yb = torch.where(flip[:, None, None, None], yb.flip(-1), yb)
        loss = F.binary_cross_entropy_with_logits(student(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss.item())
    return student.eval()
