"""GrabCut (OpenCV), the classical baseline every quality figure stands beside: per image, and for a
whole set in a process pool. A light module (numpy + OpenCV): pool workers import only this."""
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
