"""TM-dSprites renderer (spec/tm-dsprites.md): image k of a split is a pure function of
(bank_seed, split, k, size, sprite_size), so any worker renders any sample and gets the same bytes.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SPLITS = {"train": 0, "test": 1}
PERIOD = 38          # texture grid period
WINDOW = 28          # the image shows a 28×28 window of the periodic texture
SUPERSAMPLE = 4
MAX_TRIES = 100      # placements per sprite before the whole image is redrawn
GAP = 2              # minimum distance in pixels between sprites (no occlusion)


def _alias(k: int) -> int:
    return k - PERIOD if k > PERIOD // 2 else k


@lru_cache(maxsize=16)
def texture_bank(bank_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 20 gratings: (kx, ky, phase) arrays of length 20 (Tagger's Freq20 bank)."""
    kx, ky = [], []
    for i, k in enumerate((4, 10, 21, 32, 37)):
        for base in (0, 4, 8, 12):
            kx.append(_alias(k))
            ky.append(_alias(base + i))
    phase = np.random.default_rng(np.random.SeedSequence([bank_seed, 2**31 - 1])).uniform(0, 2 * np.pi, 20)
    return np.array(kx, float), np.array(ky, float), phase


def _grating(j: int, u0: float, v0: float, xs: np.ndarray, ys: np.ndarray, size: int,
             bank_seed: int) -> np.ndarray:
    """Texture j shifted by (u0, v0), sampled at pixel coordinates (xs, ys) of an S×S image."""
    kx, ky, phase = texture_bank(bank_seed)
    u = u0 + WINDOW * xs / size
    v = v0 + WINDOW * ys / size
    return 0.5 + 0.5 * np.cos(2 * np.pi * (kx[j] * u + ky[j] * v) / PERIOD + phase[j])


def textures(n: int, *, size: int = 128, seed: int = 0, bank_seed: int = 0) -> np.ndarray:
    """n sprite-free backgrounds (n, S, S) in [0, 1], rendered like an image's background (random
    texture and shift, 4× supersampled): what the background expert has to reproduce."""
    rng = np.random.default_rng(seed)
    sub = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    ys, xs = np.meshgrid(sub, sub, indexing="ij")
    out = np.empty((n, size, size))
    for i in range(n):
        j = int(rng.integers(20))
        u0, v0 = rng.uniform(0, PERIOD, 2)
        out[i] = _grating(j, u0, v0, xs, ys, size, bank_seed).reshape(
            size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return out


@dataclass
class Sample:
    image: np.ndarray        # (S, S, 3) uint8
    fg: np.ndarray           # (S, S) uint8 in {0, 1}
    instances: np.ndarray    # (S, S) uint8, 0 = background, 1..n in drawing order
    texture: int
    num_sprites: int


def _coverage(shape: str, size: float, angle: float, cy: float, cx: float,
              ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean inside-test of a sprite at sub-pixel sample points (ys, xs in pixel units)."""
    dy, dx = ys - cy, xs - cx
    if shape == "circle":
        return dy * dy + dx * dx <= (size / 2) ** 2
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy            # sprite frame
    if shape == "square":                               # side = size
        return (np.abs(u) <= size / 2) & (np.abs(v) <= size / 2)
    # equilateral triangle with side = size, centroid at the centre
    r = size / np.sqrt(3)                               # circumradius
    inside = np.ones_like(u, dtype=bool)
    for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        # each edge is opposite a vertex; the inward normal points at that vertex
        nx, ny = np.cos(a), np.sin(a)
        inside &= (u * nx + v * ny) >= -r / 2
    return inside


def _half_extent(shape: str, size: float, angle: float) -> tuple[float, float]:
    """Half height and half width of the rotated sprite's bounding box."""
    if shape == "circle":
        return size / 2, size / 2
    if shape == "square":
        h = size / 2
        verts = [(h, h), (h, -h), (-h, h), (-h, -h)]
    else:
        r = size / np.sqrt(3)
        verts = [(r * np.cos(a), r * np.sin(a)) for a in (-np.pi / 2, -np.pi / 2 + 2 * np.pi / 3,
                                                          -np.pi / 2 + 4 * np.pi / 3)]
    c, s = np.cos(angle), np.sin(angle)
    xs = [c * u - s * v for u, v in verts]
    ys = [s * u + c * v for u, v in verts]
    return max(abs(y) for y in ys), max(abs(x) for x in xs)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    h, w = mask.shape
    for oy in range(-radius, radius + 1):
        for ox in range(-radius, radius + 1):
            if oy * oy + ox * ox > radius * radius or (oy == 0 and ox == 0):
                continue
            src = mask[max(0, -oy):h - max(0, oy), max(0, -ox):w - max(0, ox)]
            out[max(0, oy):h - max(0, -oy), max(0, ox):w - max(0, -ox)] |= src
    return out


def render(split: str, index: int, *, size: int = 128, bank_seed: int = 0,
           sprite_size: tuple[float, float] = (0.15, 0.30)) -> Sample:
    """Render image `index` of `split` ('train' or 'test')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence([bank_seed, SPLITS[split], index]))
    ss = size * SUPERSAMPLE
    sub = (np.arange(ss) + 0.5) / SUPERSAMPLE                 # sub-pixel centres in pixel units
    ys, xs = np.meshgrid(sub, sub, indexing="ij")
    while True:
        j = int(rng.integers(20))
        u0, v0 = rng.uniform(0, PERIOD, 2)
        grey = _grating(j, u0, v0, xs, ys, size, bank_seed)
        canvas = np.repeat(grey[..., None], 3, axis=2)
        instances = np.zeros((size, size), np.uint8)
        n = int(rng.integers(2, 4))
        placed = 0
        for sprite in range(n):
            for _ in range(MAX_TRIES):
                shape = ("square", "circle", "triangle")[int(rng.integers(3))]
                side = rng.uniform(sprite_size[0] * size, sprite_size[1] * size)
                angle = rng.uniform(0, 2 * np.pi) if shape != "circle" else 0.0
                hy, hx = _half_extent(shape, side, angle)
                if 2 * hy >= size or 2 * hx >= size:
                    continue
                cy, cx = rng.uniform(hy, size - hy), rng.uniform(hx, size - hx)
                hue = rng.uniform(0, 1)
                cover = _coverage(shape, side, angle, cy, cx, ys, xs)
                frac = cover.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
                mask = frac >= 0.5
                if not mask.any() or (_dilate(instances > 0, GAP) & mask).any():
                    continue
                canvas[cover] = colorsys.hsv_to_rgb(hue, 1.0, 1.0)
                instances[mask] = sprite + 1
                placed += 1
                break
            else:
                break
        if placed == n:
            break
    image = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return Sample(image=image, fg=(instances > 0).astype(np.uint8), instances=instances,
                  texture=j, num_sprites=n)


def render_many(split: str, indices, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Stack images (N, S, S, 3) uint8 and foreground masks (N, S, S) uint8."""
    samples = [render(split, int(i), **kwargs) for i in indices]
    return np.stack([s.image for s in samples]), np.stack([s.fg for s in samples])
