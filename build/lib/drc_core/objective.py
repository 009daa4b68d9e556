"""Region competition (paper Eqs. 7, 12) and the regularisers of appendix C.2.

Convention: everything here is per image, summed over its pixels, so a Langevin gradient does not
depend on the batch size; the generator loss divides by the number of pixel values D = 3·H·W,
which makes it the per-element mean used by the public implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from drc_core.model import Composition


@dataclass
class RegionCompetition:
    q: torch.Tensor              # (B,) Q(z) = Σ_i Σ_k γ_ik (log π_ik + log p_k(x_i | z_k))
    gamma_f: torch.Tensor        # (B, 1 or 3, H, W) foreground responsibility (no gradient)


def laplace_log_likelihood(x: torch.Tensor, mean: torch.Tensor, sigma: float, per_pixel: bool) -> torch.Tensor:
    """log p(x | g) = -|g - x| / (2σ²) per value; summed over colour channels when per_pixel."""
    ll = -(mean - x).abs() / (2.0 * sigma ** 2)
    return ll.sum(1, keepdim=True) if per_pixel else ll


def region_competition(x: torch.Tensor, comp: Composition, *, sigma: float, responsibility: str = "pixel",
                       window: int = 1) -> RegionCompetition:
    """Q(z) and the foreground responsibility γ_f, computed in log space.

    γ_f = π_f p_f / (π_f p_f + π_b p_b) = sigmoid(log π_f + log p_f − log π_b − log p_b): exact for
    any reconstruction error, where exp(log p) of the naive form underflows to 0/0.

    `window` k > 1 (beyond the paper): the likelihood ratio log p_f − log p_b in γ is averaged over
    each pixel's k×k neighbourhood, so a pixel goes to the expert that explains its surroundings
    better. Two experts that split a fine texture by shade then gain nothing over one that paints
    it whole, and the mask has no reason to sit at ½ there.
    """
    per_pixel = responsibility == "pixel"
    ll_f = laplace_log_likelihood(x, comp.fg, sigma, per_pixel)
    ll_b = laplace_log_likelihood(x, comp.bg_warped, sigma, per_pixel)
    joint_f = comp.log_pi[:, :1] + ll_f
    joint_b = comp.log_pi[:, 1:] + ll_b
    with torch.no_grad():
        if window > 1:
            ratio = F.avg_pool2d(ll_f - ll_b, window, stride=1, padding=window // 2, count_include_pad=False)
            gamma_f = torch.sigmoid(comp.log_pi[:, :1] - comp.log_pi[:, 1:] + ratio)
        else:
            gamma_f = torch.sigmoid(joint_f - joint_b)
    q = gamma_f * joint_f + (1.0 - gamma_f) * joint_b
    return RegionCompetition(q=q.flatten(1).sum(1), gamma_f=gamma_f)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B,) anisotropic TV: Σ |∂x| + |∂y| (Eq. 23)."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().flatten(1).sum(1)
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().flatten(1).sum(1)
    return dx + dy


def orthogonal_penalty(modules: list[nn.Module]) -> torch.Tensor:
    """Σ over conv kernels W (C_out, ·) of ‖W Wᵀ ⊙ (1 − I)‖_F (Eq. 24)."""
    total = None
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight.flatten(1)
                gram = w @ w.t()
                off = gram - torch.diag_embed(torch.diagonal(gram))
                term = off.pow(2).sum().sqrt()
                total = term if total is None else total + term
    if total is None:
        raise ValueError("orthogonal_penalty: no Conv2d layer in the given modules")
    return total


def pseudo_label_loss(target_logits: torch.Tensor, classifier_logits: torch.Tensor) -> torch.Tensor:
    """H(P, Q) = −⟨softmax(LEBM logits), log softmax(classifier logits)⟩, mean over the batch."""
    p = F.softmax(target_logits.detach(), dim=1)
    return -(p * F.log_softmax(classifier_logits, dim=1)).sum(1).mean()
