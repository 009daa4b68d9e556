"""GrabCut (OpenCV), the classical baseline every quality figure stands beside: per image, and for a
whole set in a process pool; and `grabcut_refine`, GrabCut started from a model's π_f instead of a
box (what `distill --refine grabcut` does to a photo teacher's masks), and `refine_at_size`, the same
on one photo at its own size (what `segment --refine grabcut` writes). A light module (numpy +
OpenCV): pool workers import only this."""
from __future__ import annotations

import time

import numpy as np


def grabcut_masks(images: np.ndarray, margin: float = 0.05, iterations: int = 5, start: int = 0) -> np.ndarray:
    """GrabCut (OpenCV) per image, initialised with the box = image minus `margin` on each side;
    deterministic (OpenCV's RNG is seeded with the image's index, `start` + its place in `images`)."""
    import cv2
    n, h, w = images.shape[:3]
    m = max(1, int(round(margin * min(h, w))))
    rect = (m, m, w - 2 * m, h - 2 * m)
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        cv2.setRNGSeed(start + i)          # GrabCut's k-means draws from OpenCV's global RNG: seed per
        mask = np.zeros((h, w), np.uint8)  # image, so an image's mask is the same in any run or batch
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(np.ascontiguousarray(images[i][..., ::-1]), mask, rect, bgd, fgd, iterations,
                        cv2.GC_INIT_WITH_RECT)
        except cv2.error:                  # degenerate image (e.g. one colour): keep the box
            mask[m:h - m, m:w - m] = cv2.GC_PR_FGD
        out[i] = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    return out


def grabcut_refine(images: np.ndarray, prob: np.ndarray, masks: np.ndarray, *, sure: float = 0.9,
                   frame: int = 1, iterations: int = 5, start: int = 0) -> np.ndarray:
    """GrabCut per image started from a model's partition instead of a box: pixels with π_f > `sure`
    are definite foreground, the `frame` outermost pixels definite background (the boundary prior),
    the rest probable foreground where `masks` (the model's mask, e.g. Otsu of π_f) says so and
    probable background elsewhere. uint8 images (N, H, W, 3), π_f (N, H, W), bool masks (N, H, W) →
    bool (N, H, W); deterministic as `grabcut_masks`. An image GrabCut cannot split keeps its mask."""
    import cv2
    n, h, w = images.shape[:3]
    out = np.asarray(masks, bool).copy()
    for i in range(n):
        cv2.setRNGSeed(start + i)
        g = np.where(out[i], cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
        g[prob[i] > sure] = cv2.GC_FGD
        if frame:
            g[:frame], g[-frame:], g[:, :frame], g[:, -frame:] = (cv2.GC_BGD,) * 4
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(np.ascontiguousarray(images[i][..., ::-1]), g, None, bgd, fgd, iterations,
                        cv2.GC_INIT_WITH_MASK)
        except cv2.error:                  # one colour, or no probable pixel of a class: keep the mask
            continue
        out[i] = (g == cv2.GC_FGD) | (g == cv2.GC_PR_FGD)
    return out


REFINE_MAX_SIDE = 400     # segment --refine-max-side: GrabCut's cost grows with the pixels (~90 ms at 160 px)


def refine_at_size(image: np.ndarray, prob: np.ndarray, threshold: float, *, seed: int,
                   max_side: int = REFINE_MAX_SIDE) -> np.ndarray:
    """`grabcut_refine` of one photo (uint8 (H, W, 3)) from π_f mapped onto it ((H, W) float), its
    mask π_f > `threshold`: bool (H, W). A photo whose long side exceeds `max_side` is refined on a
    copy scaled down to it (area-averaged; π_f bilinear) and the mask scaled back (nearest).
    Deterministic: OpenCV's RNG is seeded with `seed` (segment: the sample id)."""
    import cv2
    h, w = prob.shape
    small = max_side and max(h, w) > max_side
    if small:
        s = max_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        prob = cv2.resize(np.asarray(prob, np.float32), size, interpolation=cv2.INTER_LINEAR)
    mask = grabcut_refine(image[None], prob[None], (prob > threshold)[None], start=seed)[0]
    if small:
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


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
