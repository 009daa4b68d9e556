"""Turning π_f maps into masks: threshold policies that never look at ground truth.

The DRC protocol thresholds π_f at ½. A model that ranks foreground above background but leaves
an ambiguous region near ½ (the TM-dSprites texture on CPU presets) gains a lot from a threshold
calibrated on π_f itself. Policies (`ThresholdPolicy.parse`):

- `0.5` / `half`: the DRC protocol; any other number in (0, 1): that fixed threshold.
- `otsu`: Otsu's threshold of each image's own π_f histogram (between-class variance).
- `otsu-corpus`: one Otsu threshold over the histogram of every image segmented together.
- `gmm`: per image, where the posteriors of a two-component 1-D Gaussian mixture fitted to π_f
  are equal (`gmm-corpus`: one mixture over all images).

Per-image policies fall back to ½ when an image's π_f is not bimodal enough to split (the two
classes' means closer than `MIN_SEPARATION`): an image that is all background or all foreground
is then left to the model instead of being split in two by force.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PROTOCOL = 0.5            # the DRC paper's threshold
BINS = 256
MIN_SEPARATION = 0.2      # class means of a split closer than this: keep ½ for that image


class PolicyError(ValueError):
    """A threshold policy string that cannot be used; the message names it."""


def histogram(prob) -> torch.Tensor:
    """(N, H, W) π_f in [0, 1] → (N, BINS) counts (float64): summed over a corpus, what
    `ThresholdPolicy.corpus_threshold` calibrates on, so a corpus can be counted in pieces."""
    return _histograms(torch.as_tensor(prob))


def _histograms(prob: torch.Tensor) -> torch.Tensor:
    """(N, H, W) π_f in [0, 1] → (N, BINS) counts (float64)."""
    p = prob.reshape(prob.shape[0], -1).float().clamp(0, 1)
    idx = (p * BINS).long().clamp_(max=BINS - 1)
    hist = torch.zeros(p.shape[0], BINS, dtype=torch.float64)
    return hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def otsu(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Otsu's threshold per histogram row (N, BINS) → (thresholds (N,), class-mean gaps (N,))."""
    centres = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS
    w0 = hist.cumsum(1)
    m0 = (hist * centres).cumsum(1)
    total, mtotal = w0[:, -1:], m0[:, -1:]
    w1, m1 = total - w0, mtotal - m0
    mean0 = m0 / w0.clamp(min=1e-12)
    mean1 = m1 / w1.clamp(min=1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    between[:, -1] = -1                                     # a split must leave both classes non-empty
    k = between.argmax(1)
    th = (k.double() + 1) / BINS                            # upper edge of the last class-0 bin
    gap = (mean1 - mean0).gather(1, k[:, None])[:, 0]
    return th, gap


def gmm(hist: torch.Tensor, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-component Gaussian mixture per histogram row, fitted by EM from Otsu's split; the
    threshold is where the weighted component densities cross between the two means."""
    centres = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS
    th0, _ = otsu(hist)
    r = (centres[None] >= th0[:, None]).double()           # responsibility of the high component
    n = hist.sum(1, keepdim=True).clamp(min=1)
    for _ in range(iters):
        w1 = (hist * r).sum(1, keepdim=True)
        w0 = (hist * (1 - r)).sum(1, keepdim=True)
        mu1 = (hist * r * centres).sum(1, keepdim=True) / w1.clamp(min=1e-12)
        mu0 = (hist * (1 - r) * centres).sum(1, keepdim=True) / w0.clamp(min=1e-12)
        v1 = (hist * r * (centres - mu1) ** 2).sum(1, keepdim=True) / w1.clamp(min=1e-12)
        v0 = (hist * (1 - r) * (centres - mu0) ** 2).sum(1, keepdim=True) / w0.clamp(min=1e-12)
        v0, v1 = v0.clamp(min=1e-4), v1.clamp(min=1e-4)
        l1 = torch.log((w1 / n).clamp(min=1e-12)) - 0.5 * torch.log(v1) - (centres - mu1) ** 2 / (2 * v1)
        l0 = torch.log((w0 / n).clamp(min=1e-12)) - 0.5 * torch.log(v0) - (centres - mu0) ** 2 / (2 * v0)
        r = torch.sigmoid(l1 - l0)
    # first bin between the means where the high component wins
    between = (centres[None] > mu0) & (centres[None] < mu1) & (r > 0.5)
    first = torch.where(between.any(1), between.double().argmax(1), (th0 * BINS - 1).long().clamp(min=0))
    th = first.double() / BINS
    return th, (mu1 - mu0)[:, 0]


@dataclass(frozen=True)
class ThresholdPolicy:
    """How π_f becomes a mask: a fixed threshold, or one calibrated on π_f per image or per corpus."""
    kind: str = "fixed"        # fixed | otsu | gmm
    value: float = PROTOCOL    # the threshold of `fixed`
    corpus: bool = False       # calibrated once over every image given together

    @classmethod
    def parse(cls, text: "str | float | ThresholdPolicy") -> "ThresholdPolicy":
        if isinstance(text, ThresholdPolicy):
            return text
        s = str(text).strip().lower()
        if s in ("half", "protocol"):
            return cls()
        base, _, scope = s.partition("-")
        if base in ("otsu", "gmm") and scope in ("", "image", "corpus"):
            return cls(kind=base, corpus=scope == "corpus")
        try:
            value = float(s)
        except ValueError:
            raise PolicyError(f"threshold policy {text!r}: use 0.5 (the DRC protocol), a number in (0, 1), "
                              f"otsu, otsu-corpus, gmm or gmm-corpus") from None
        if not 0.0 < value < 1.0:
            raise PolicyError(f"threshold policy {text!r}: a fixed threshold must lie in (0, 1)")
        return cls(value=value)

    @property
    def name(self) -> str:
        if self.kind == "fixed":
            return f"{self.value:g}"
        return f"{self.kind}-corpus" if self.corpus else self.kind

    @property
    def is_protocol(self) -> bool:
        return self.kind == "fixed" and self.value == PROTOCOL

    def thresholds(self, prob) -> torch.Tensor:
        """(N, H, W) π_f → (N,) float64 thresholds (a mask is π_f > threshold)."""
        p = torch.as_tensor(prob)
        if p.dim() == 2:
            p = p[None]
        n = p.shape[0]
        if self.kind == "fixed" or n == 0:
            return torch.full((n,), self.value, dtype=torch.float64)
        hist = _histograms(p)
        if self.corpus:
            hist = hist.sum(0, keepdim=True)
        th, gap = (otsu if self.kind == "otsu" else gmm)(hist)
        th = torch.where(gap >= MIN_SEPARATION, th, torch.full_like(th, PROTOCOL))
        return th.expand(n).clone() if self.corpus else th

    def corpus_threshold(self, hist) -> float:
        """A corpus policy's one threshold from the corpus's summed `histogram` (BINS,)."""
        if self.kind == "fixed":
            return self.value
        h = torch.as_tensor(np.asarray(hist), dtype=torch.float64).reshape(1, -1)
        th, gap = (otsu if self.kind == "otsu" else gmm)(h)
        return float(th[0]) if float(gap[0]) >= MIN_SEPARATION else PROTOCOL

    def apply(self, prob) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H, W) π_f → (bool masks (N, H, W), float64 thresholds (N,)); a single (H, W) map
        gives an (H, W) mask."""
        p = torch.as_tensor(prob)
        squeeze = p.dim() == 2
        if squeeze:
            p = p[None]
        th = self.thresholds(p)
        m = p > th.to(p.dtype if p.is_floating_point() else torch.float64).view(-1, *([1] * (p.dim() - 1)))
        return (m[0] if squeeze else m), th

    def masks(self, prob) -> torch.Tensor:
        """(N, H, W) π_f → (N, H, W) bool masks."""
        return self.apply(prob)[0]


DEFAULT = ThresholdPolicy(kind="otsu")     # chosen by measurement: docs/quality.md
