"""Image grids for inspection and tracking: observed / reconstruction / fg / bg / mask rows."""
from __future__ import annotations

import numpy as np
import torch

from drc_core.model import Composition


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] (C = 1 or 3) → (N, H, W, 3) uint8."""
    t = t.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte()
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.permute(0, 2, 3, 1).cpu().numpy()


def composition_grid(x: torch.Tensor, comp: Composition, gt_mask: torch.Tensor | None = None,
                     max_images: int = 8, pad: int = 2) -> np.ndarray:
    """Rows: observed, reconstruction, π_f·fg, warped bg, π_f (mask) [, ground truth];
    columns: images. Returns (rows·(H+pad), cols·(W+pad), 3) uint8."""
    n = min(max_images, x.shape[0])
    pi_f = comp.pi_f[:n]
    rows = [x[:n], comp.recon[:n], comp.fg[:n] * pi_f + (pi_f - 1), comp.bg_warped[:n], pi_f * 2 - 1]
    if gt_mask is not None:
        rows.append(gt_mask[:n, None].float() * 2 - 1)
    tiles = [_to_uint8(r) for r in rows]
    h, w = tiles[0].shape[1:3]
    grid = np.full((len(tiles) * (h + pad), n * (w + pad), 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c in range(n):
            grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = row[c]
    return grid
