"""Foreground-extraction metrics (paper appendix E): per-image IoU and Dice, averaged over images."""
from __future__ import annotations

import functools

import numpy as np
import torch


def _as_bool(masks) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"masks must be (H, W) or (N, H, W), got shape {tuple(t.shape)}")
    return t.bool()


def iou_dice(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image IoU and Dice of boolean masks (N, H, W). Empty prediction and empty target → 1."""
    p, t = _as_bool(pred), _as_bool(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    inter = (p & t).flatten(1).sum(1).double()
    union = (p | t).flatten(1).sum(1).double()
    total = p.flatten(1).sum(1).double() + t.flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return iou, dice


def mean_iou_dice(pred, target) -> dict[str, float]:
    """{"iou": %, "dice": %} averaged over images, as the DRC protocol reports them."""
    iou, dice = iou_dice(pred, target)
    return {"iou": 100.0 * float(iou.mean()), "dice": 100.0 * float(dice.mean())}


def all_foreground_masks(n: int, size: int) -> torch.Tensor:
    return torch.ones(n, size, size, dtype=torch.bool)


@functools.lru_cache(maxsize=64)
def centre_ellipse_array(height: int, width: int, fraction: float = 0.25) -> np.ndarray:
    """(height, width) bool, read-only and cached (a scorer asks for the same few per image): the
    centred ellipse with the image's aspect covering `fraction` of it."""
    s = (4.0 * fraction / np.pi) ** 0.5                       # semi-axes s·w/2, s·h/2: area π s² hw/4
    dy = (np.arange(height) - (height - 1) / 2.0) / (s * height / 2.0)
    dx = (np.arange(width) - (width - 1) / 2.0) / (s * width / 2.0)
    mask = dy[:, None] ** 2 + dx[None, :] ** 2 <= 1.0
    mask.flags.writeable = False
    return mask


def centre_ellipse(height: int, width: int, fraction: float = 0.25) -> torch.Tensor:
    """centre_ellipse_array as a tensor of its own."""
    return torch.from_numpy(centre_ellipse_array(height, width, fraction).copy())


def centre_ellipse_masks(n: int, size: int, fraction: float = 0.25) -> torch.Tensor:
    """A centred disc (the ellipse of a square image) covering `fraction` of the image area."""
    return centre_ellipse(size, size, fraction)[None].expand(n, size, size).clone()


def separation(prob, target) -> dict[str, float]:
    """How π_f separates foreground from background pixels, independent of the ½ threshold.

    `pi_fg`/`pi_bg`: mean π_f over true foreground/background pixels, averaged over images
    (images without foreground pixels skip `pi_fg`); `best_threshold_iou`: the IoU (%) the same
    π_f maps would reach at the best of a few thresholds. That last one looks at the ground truth
    to pick the threshold, so it is a diagnostic of learning, never a reported result.
    """
    p = torch.as_tensor(prob).float()
    t = _as_bool(target)
    if p.dim() == 2:
        p = p[None]
    fg_n = t.flatten(1).sum(1)
    bg_n = (~t).flatten(1).sum(1)
    pi_fg = (p * t).flatten(1).sum(1) / fg_n.clamp(min=1)
    pi_bg = (p * ~t).flatten(1).sum(1) / bg_n.clamp(min=1)
    best = max(mean_iou_dice(p > th, t)["iou"] for th in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8))
    return {"pi_fg": float(pi_fg[fg_n > 0].mean()), "pi_bg": float(pi_bg[bg_n > 0].mean()),
            "best_threshold_iou": best}


DISC_AREAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8)


def trivial_baselines(target) -> dict[str, dict[str, float]]:
    """IoU/Dice of the all-foreground mask and of the best centred disc (area 5 %…80 %)."""
    t = _as_bool(target)
    n, size = t.shape[0], t.shape[-1]
    discs = [mean_iou_dice(centre_ellipse_masks(n, size, f), t) for f in DISC_AREAS]
    return {"all_foreground": mean_iou_dice(all_foreground_masks(n, size), t),
            "centre_ellipse": max(discs, key=lambda d: d["iou"])}


def border_fraction(masks) -> torch.Tensor:
    """Per mask (N, H, W): the share of its frame — a band max(1, min(H, W) // 16) pixels wide along
    the four edges — that is foreground."""
    m = _as_bool(masks)
    h, w = m.shape[-2:]
    b = max(1, min(h, w) // 16)
    frame = torch.ones(h, w, dtype=torch.bool)
    frame[b:h - b, b:w - b] = False
    return (m & frame).flatten(1).sum(1).float() / frame.sum()


TRIVIAL_AREA = 0.01          # a mask covering < 1 % or > 99 % of the image separates nothing


def label_free_scores(prob, masks, recon_l1) -> dict[str, torch.Tensor]:
    """Per-image scores of a segmentation that look at no label (candidates for ranking models
    trained on an unlabelled corpus; issue 17 part 5). `prob` (N, H, W) π_f, `masks` the masks a
    threshold policy made of it, `recon_l1` (N,) the posterior reconstruction error. Every score:
    higher is better.

    - `recon`: −recon_l1, how well the model explains images it never trained on;
    - `nontrivial`: 0, or −1 where the mask is (almost) all foreground or all background — the
      degenerate partitions that can reconstruct well and segment nothing;
    - `separability`: Otsu's η = between-class / total variance of π_f at the mask's split
      (1: two clean levels; 0: nothing to split);
    - `confidence`: mean |2π_f − 1|, how far π_f stays from the undecided ½;
    - `frame`: −`border_fraction(masks)`, how little of the image's frame the mask calls
      foreground (the boundary prior: photographed objects seldom fill the picture's edges; on
      PASCAL-S it ranks training seeds as the IoU does, docs/quality.md §3)."""
    p = torch.as_tensor(prob).float().flatten(1)
    m = _as_bool(masks).flatten(1)
    area = m.float().mean(1)                                  # the foreground class's weight
    mu1 = (p * m).sum(1) / m.sum(1).clamp(min=1)
    mu0 = (p * ~m).sum(1) / (~m).sum(1).clamp(min=1)
    var = p.var(1, unbiased=False)
    return {"recon": -torch.as_tensor(recon_l1).float(),
            "nontrivial": -((area < TRIVIAL_AREA) | (area > 1 - TRIVIAL_AREA)).float(),
            "separability": torch.where(var > 1e-12, (1 - area) * area * (mu1 - mu0) ** 2 / var.clamp(min=1e-12),
                                        torch.zeros_like(var)),
            "confidence": (2 * p - 1).abs().mean(1),
            "frame": -border_fraction(masks)}
