"""The DRC model: generators composed into a mixture of experts (paper §3.2, Listing 1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from drc_core.config import AblationConfig, ModelConfig
from drc_core.nets import (AuxClassifier, LatentEBM, ReassignGenerator, RegionGenerator,
                           orthogonal_init)


@dataclass
class Composition:
    """What the generators produce for a batch of latents z (all (B, ·, H, W))."""
    fg: torch.Tensor             # (B, 3, H, W) foreground image in [-1, 1]
    fg_logit: torch.Tensor       # (B, 1, H, W) foreground mask logit
    bg: torch.Tensor             # (B, 3, H, W) background image before re-assignment
    bg_logit: torch.Tensor       # (B, 1, H, W) background mask logit before re-assignment
    bg_warped: torch.Tensor      # (B, 3, H, W) background after pixel re-assignment
    log_pi: torch.Tensor         # (B, 2, H, W) log mixing weights [fg, bg], log-softmax over dim 1

    @property
    def pi_f(self) -> torch.Tensor:
        """(B, 1, H, W) foreground probability π_f; the mask is π_f > 0.5."""
        return self.log_pi[:, :1].exp()

    @property
    def recon(self) -> torch.Tensor:
        """Composite x̂ = π_f·fg + π_b·warped_bg."""
        pi = self.log_pi.exp()
        return pi[:, :1] * self.fg + pi[:, 1:] * self.bg_warped


# The generators' conv weights are NHWC (channels-last), and images meet them in the same layout:
# on this CPU oneDNN's bf16 convolutions are fastest that way, and NCHW costs a reorder of every
# activation (paper-tmds at batch 8, with nn.InstanceNorm2d: 1.30× per EM iteration; our
# InstanceNorm2d keeps activations NHWC between the convs, 1.52× more; `python -m pipelines.bench
# core` times the variants side by side).
IMAGE_LAYOUT = torch.channels_last


def to_image_layout(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in the generators' layout; no copy when they already are."""
    return x.contiguous(memory_format=IMAGE_LAYOUT)


def center_prior_logit(cfg: ModelConfig) -> torch.Tensor:
    """(1, 1, H, W) s·max(1 − (r/ρ)², −1): a centre-bias prior in logit space (beyond the paper). Photographs
    put their subject near the middle; this tilts the competition towards the foreground there and
    towards the background at the border, and the generators' own logits can overrule it. Zero when
    `center_prior` is 0."""
    n = cfg.resolution
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1          # pixel centres in (−1, 1)
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    return (cfg.center_prior * (1 - r2 / cfg.center_radius ** 2).clamp(min=-1.0))[None, None]


class DRCModel(nn.Module):
    """Foreground/background generators, pixel re-assignment, LEBM and auxiliary classifiers."""

    def __init__(self, cfg: ModelConfig, ablation: AblationConfig | None = None):
        super().__init__()
        ablation = ablation or AblationConfig()
        self.cfg = cfg
        trunk = dict(trunk_channels=cfg.trunk_channels, up_widths=tuple(cfg.up_widths))
        self.fg_gen = RegionGenerator(latent_dim=cfg.fg_dim, **trunk)
        self.bg_gen = RegionGenerator(latent_dim=cfg.bg_dim, **trunk)
        self.reassign_gen = (ReassignGenerator(latent_dim=cfg.reassign_dim, bg_channels=cfg.trunk_channels,
                                               **trunk) if ablation.pixel_reassign else None)
        self.ebm = LatentEBM(fg_dim=cfg.fg_dim, bg_dim=cfg.bg_dim, reassign_dim=cfg.reassign_dim,
                             fg_classes=cfg.fg_classes, bg_classes=cfg.bg_classes, hidden=cfg.ebm_hidden,
                             reassign_hidden=cfg.ebm_reassign_hidden, use_reassign=ablation.pixel_reassign)
        if ablation.pseudo_label:
            cls = dict(resolution=cfg.resolution, widths=tuple(cfg.classifier_widths))
            self.fg_classifier = AuxClassifier(num_classes=cfg.fg_classes, **cls)
            self.bg_classifier = AuxClassifier(num_classes=cfg.bg_classes, **cls)
        else:
            self.fg_classifier = self.bg_classifier = None
        orthogonal_init(self)
        self.to(memory_format=IMAGE_LAYOUT)
        # a fixed prior on the mask, not a parameter: saved with the model only through its config
        self.register_buffer("center_logit", center_prior_logit(cfg), persistent=False)

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D) → z_f, z_b, z_s."""
        return z.split((self.cfg.fg_dim, self.cfg.bg_dim, self.cfg.reassign_dim), dim=1)

    def compose(self, z: torch.Tensor) -> Composition:
        zf, zb, zs = self.split(z)
        fg, fg_logit, _ = self.fg_gen(zf)
        bg, bg_logit, bg_feat = self.bg_gen(zb)
        if self.reassign_gen is not None:
            grid = self.reassign_gen(zs, bg_feat)                    # (B, H, W, 2) in [-1, 1]
            # a NaN coordinate (diverged weights) makes CPU grid_sample read out of bounds and
            # crash the process; zeroing it lets the divergence surface as a NaN loss instead
            grid = torch.nan_to_num(grid, nan=0.0)
            # one grid_sample for image and mask logit: the mask moves with the pixels
            warped = F.grid_sample(torch.cat([bg, bg_logit], 1), grid.to(bg.dtype),
                                   mode="bilinear", padding_mode="border", align_corners=False)
            bg_warped, bg_logit_warped = warped[:, :3], warped[:, 3:]
        else:
            bg_warped, bg_logit_warped = bg, bg_logit
        if self.cfg.center_prior:
            fg_logit = fg_logit + self.center_logit.to(fg_logit.dtype)
        log_pi = F.log_softmax(torch.cat([fg_logit, bg_logit_warped], 1).float(), dim=1)
        return Composition(fg=fg.float(), fg_logit=fg_logit.float(), bg=bg.float(),
                           bg_logit=bg_logit.float(), bg_warped=bg_warped.float(), log_pi=log_pi)

    def generator_modules(self) -> list[nn.Module]:
        """Everything trained by the generator loss (Adam lr 1e-4): generators + classifiers."""
        mods = [self.fg_gen, self.bg_gen, self.reassign_gen, self.fg_classifier, self.bg_classifier]
        return [m for m in mods if m is not None]

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.generator_modules() for p in m.parameters()]
