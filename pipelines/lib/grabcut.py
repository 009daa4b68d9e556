"""GrabCut (OpenCV), the classical baseline every quality figure stands beside: per image, and for a
whole set in a process pool; `grabcut_refine`, GrabCut started from a model's partition instead of a
box (what `distill --refine grabcut` does to a photo teacher's masks); and `refine_photo` /
`refine_at_size`, the product's mask of one photo at its own size (what `segment --refine grabcut`
writes): GrabCut from a box around the model's mask, from its partition where that collapses.
A light module (numpy + OpenCV): pool workers import only this."""
from __future__ import annotations

import time

import numpy as np


def cut(image: np.ndarray, seed: int, *, labels: np.ndarray | None = None, rect=None,
        iterations: int = 5) -> np.ndarray | None:
    """One GrabCut (OpenCV) of an RGB uint8 image from a GC_* label map or a rect
    (x, y, w, h); OpenCV's RNG (its k-means) seeded with `seed`, so a mask is the same in any run or
    batch. None where OpenCV cannot split the image (one colour, or no probable pixel of a class)."""
    import cv2
    h, w = image.shape[:2]
    cv2.setRNGSeed(seed)
    g = np.zeros((h, w), np.uint8) if labels is None else labels.copy()
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), g, rect, bgd, fgd, iterations,
                    cv2.GC_INIT_WITH_MASK if rect is None else cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return None
    return (g == cv2.GC_FGD) | (g == cv2.GC_PR_FGD)


def box_rect(h: int, w: int, margin: float = 0.05) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the box = image less `margin` of its short side on each side."""
    m = max(1, int(round(margin * min(h, w))))
    return m, m, w - 2 * m, h - 2 * m


def extent_rect(mask: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of a box around `mask`'s foreground plus `margin` of the image's long side, kept
    at least 1 px inside the image (GrabCut needs background outside it); None for an empty mask."""
    if not mask.any():
        return None
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    pad = int(round(margin * max(h, w)))
    x0, y0 = max(1, int(xs.min()) - pad), max(1, int(ys.min()) - pad)
    x1, y1 = min(w - 1, int(xs.max()) + 1 + pad), min(h - 1, int(ys.max()) + 1 + pad)
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)


def model_labels(prob: np.ndarray, mask: np.ndarray, sure: float = 0.9, frame: int = 1) -> np.ndarray:
    """GrabCut's start from a model's partition: π_f > `sure` definite foreground, the `frame`
    outermost pixels definite background (the boundary prior), the rest probable foreground where
    `mask` says so and probable background elsewhere."""
    import cv2
    g = np.where(mask, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    g[prob > sure] = cv2.GC_FGD
    if frame:
        g[:frame], g[-frame:], g[:, :frame], g[:, -frame:] = (cv2.GC_BGD,) * 4
    return g


def grabcut_masks(images: np.ndarray, margin: float = 0.05, iterations: int = 5, start: int = 0) -> np.ndarray:
    """GrabCut (OpenCV) per image, initialised with the box = image minus `margin` on each side;
    deterministic (OpenCV's RNG is seeded with the image's index, `start` + its place in `images`).
    An image GrabCut cannot split keeps the box."""
    n, h, w = images.shape[:3]
    x, y, bw, bh = rect = box_rect(h, w, margin)
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        mask = cut(images[i], start + i, rect=rect, iterations=iterations)
        if mask is None:                   # degenerate image (e.g. one colour): keep the box
            out[i, y:y + bh, x:x + bw] = True
        else:
            out[i] = mask
    return out


def grabcut_refine(images: np.ndarray, prob: np.ndarray, masks: np.ndarray, *, sure: float = 0.9,
                   frame: int = 1, iterations: int = 5, start: int = 0) -> np.ndarray:
    """GrabCut per image started from a model's partition instead of a box (`model_labels`): what
    `distill --refine grabcut` does to a photo teacher's masks. uint8 images (N, H, W, 3), π_f
    (N, H, W), bool masks (N, H, W) → bool (N, H, W); deterministic as `grabcut_masks`. An image
    GrabCut cannot split keeps its mask."""
    out = np.asarray(masks, bool).copy()
    for i in range(len(images)):
        mask = cut(images[i], start + i, labels=model_labels(prob[i], out[i], sure, frame), iterations=iterations)
        if mask is not None:
            out[i] = mask
    return out


REFINE_MAX_SIDE = 400     # segment --refine-max-side: GrabCut's cost grows with the pixels (~90 ms at 160 px)
EXTENT_MARGIN = 0.1       # the box around the model's mask: + 10 % of the photo's long side on each side
COLLAPSED = 0.01          # a GrabCut mask under 1 % of the photo has lost the subject


def refine_photo(image: np.ndarray, prob: np.ndarray, mask: np.ndarray, *, seed: int,
                 margin: float = EXTENT_MARGIN) -> np.ndarray:
    """The product's mask of one photo (uint8 (H, W, 3)) from π_f on it ((H, W) float) and the model's
    mask (bool (H, W): π_f above its threshold): the model says where, GrabCut what. GrabCut starts
    from a box around the mask plus `margin` of the long side (the photo less 5 % when the mask is
    empty); where that cut collapses (under 1 % of the photo, or no split), GrabCut starts from the
    model's partition instead (`model_labels`). On PASCAL-S this beats both the box-started GrabCut
    and the partition-started one on every subject size (docs/quality.md)."""
    h, w = mask.shape
    out = cut(image, seed, rect=extent_rect(mask, margin) or box_rect(h, w))
    if out is None or out.mean() < COLLAPSED:
        out = grabcut_refine(image[None], prob[None], mask[None], start=seed)[0]
    return out


def refine_at_size(image: np.ndarray, prob: np.ndarray, threshold: float, *, seed: int,
                   max_side: int = REFINE_MAX_SIDE) -> np.ndarray:
    """`refine_photo` of one photo (uint8 (H, W, 3)) from π_f mapped onto it ((H, W) float): bool
    (H, W). A photo whose long side exceeds `max_side` is refined on a copy scaled down to it
    (area-averaged; π_f bilinear) and the mask scaled back (nearest). Deterministic: OpenCV's RNG is
    seeded with `seed` (segment: the sample id)."""
    small_image, small_prob = working_copy(image, prob, max_side)
    return at_size(refine_photo(small_image, small_prob, small_prob > threshold, seed=seed), prob.shape)


def working_copy(image: np.ndarray, prob: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The photo and its π_f as GrabCut sees them: unchanged up to `max_side` pixels on the long side
    (0: no limit), else scaled down to it (the photo area-averaged, π_f bilinear)."""
    import cv2
    h, w = prob.shape
    if not max_side or max(h, w) <= max_side:
        return image, prob
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return (cv2.resize(image, size, interpolation=cv2.INTER_AREA),
            cv2.resize(np.asarray(prob, np.float32), size, interpolation=cv2.INTER_LINEAR))


def at_size(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask drawn on a `working_copy` back at the photo's (H, W) (nearest neighbour)."""
    import cv2
    if mask.shape == tuple(shape):
        return mask
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def _refine_chunk(args):
    images, prob, masks, start = args
    return grabcut_refine(images, prob, masks, start=start)


def grabcut_refine_all(images: np.ndarray, prob: np.ndarray, masks: np.ndarray, workers: int | None = None,
                       chunk: int = 64) -> np.ndarray:
    """`grabcut_refine` of a stack in a pool of `workers` processes (default: every CPU), chunks of
    `chunk` images; the same masks as one process."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    n = len(images)
    jobs = [(images[lo:lo + chunk], prob[lo:lo + chunk], masks[lo:lo + chunk], lo) for lo in range(0, n, chunk)]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        parts = list(map(_refine_chunk, jobs))
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_refine_chunk, jobs))
    return np.concatenate(parts) if parts else np.zeros(np.shape(masks), bool)


def _grabcut_one(args):
    image, margin, index = args
    return grabcut_masks(image[None], margin, start=index)[0]


def grabcut_all(images, margin: float = 0.05, workers: int | None = None, quiet: bool = False) -> list[np.ndarray]:
    """GrabCut of every image (a stack or a list of any sizes), in a pool of `workers` processes
    (default: every CPU) with progress and an ETA; the same masks as one process (each image's
    RNG seed is its index)."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    n = len(images)
    workers = min(workers or os.cpu_count() or 1, max(1, n // 16))
    jobs = [(images[i], margin, i) for i in range(n)]
    t0, out = time.perf_counter(), []
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else None
    results = pool.map(_grabcut_one, jobs, chunksize=8) if pool else map(_grabcut_one, jobs)
    try:
        for i, mask in enumerate(results, 1):
            out.append(mask)
            if not quiet and (i % 200 == 0 or i == n) and n >= 200:
                rate = i / (time.perf_counter() - t0)
                print(f"GrabCut {i}/{n} images, {rate:.1f}/s, eta {(n - i) / rate:.0f} s", flush=True)
    finally:
        if pool:
            pool.shutdown()
    return out
