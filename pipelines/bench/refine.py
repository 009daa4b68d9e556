"""How to turn a model's π_f into a photo mask with GrabCut (`python -m pipelines.bench refine`): every
variant of the refinement, per photo, beside box-started GrabCut, on a `segment` output that already
holds each photo's π_f — no model runs here, so a variant costs one GrabCut per photo.

    python -m pipelines.bench refine --segmentation OUT/segmentation --photos DIR --masks DIR

Variants (each a bool mask at the photo's size; GrabCut on a copy of at most --max-side pixels):
  box        GrabCut from the box = photo − 5 % (the baseline every table shows)
  model      GrabCut from the model's partition: π_f > 0.9 definite foreground, the 1-px frame definite
             background, the rest probable as the mask (π_f > its Otsu threshold) says
  soft       `model` without definite foreground: the model's mask only as probable labels
  box+model  the box's constraint (outside it definite background) with the model's mask as probable
             labels inside it
  extent     GrabCut from a box around the model's mask (its extent + a margin of --extent-margin of
             the photo's side, clipped to the photo less 1 px): the model says where, GrabCut what
  default    what `segment --refine grabcut` writes (pipelines.lib.grabcut.refine_photo): `extent`,
             and `model` where `extent` collapses (under 1 % of the photo)
Also scored: `student` (π_f above its Otsu threshold, no GrabCut), `and` / `or` of box and model, and
each variant's mask area (a label-free signal: `default` switches on `extent`'s).

Printed: mean IoU per variant and per subject-size subset (the true subject's share of the photo:
small < 10 %, medium, large > 40 %), each variant's per-photo win rate against box GrabCut, and the
oracle (the better of box and model per photo, picked with the labels: an upper bound, not a method).
Per photo: <out>/per_photo.parquet.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipelines.lib.grabcut import (EXTENT_MARGIN, at_size, box_rect, cut, extent_rect, grabcut_masks, model_labels,
                                   refine_photo, working_copy)

from pipelines.lib.scoring import SUBJECT_SIZES

VARIANTS = ("box", "model", "soft", "box+model", "extent", "default")


def variants(image: np.ndarray, prob: np.ndarray, threshold: float, seed: int, extent_margin: float = EXTENT_MARGIN,
             sure: float = 0.9) -> dict[str, np.ndarray]:
    """Every variant's mask of one photo (uint8 (H, W, 3)) from its π_f ((H, W) on the photo)."""
    import cv2
    h, w = prob.shape
    mask = prob > threshold
    x, y, rw, rh = box = box_rect(h, w)
    boxed = np.full((h, w), cv2.GC_BGD, np.uint8)
    boxed[y:y + rh, x:x + rw] = np.where(mask, cv2.GC_PR_FGD, cv2.GC_PR_BGD)[y:y + rh, x:x + rw]
    out = {"model": cut(image, seed, labels=model_labels(prob, mask, sure)),
           "soft": cut(image, seed, labels=model_labels(prob, mask, sure=2.0)),
           "box+model": cut(image, seed, labels=boxed),
           "extent": cut(image, seed, rect=extent_rect(mask, extent_margin) or box)}
    for k, v in out.items():
        if v is None:                          # OpenCV could not split: the model's mask
            out[k] = mask
    out["box"] = grabcut_masks(image[None], start=seed)[0]
    out["default"] = refine_photo(image, prob, mask, seed=seed, margin=extent_margin)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 100.0 * np.count_nonzero(a & b) / union if union else 100.0


def one_photo(job: dict) -> dict:
    """Every variant's IoU and mask area for one photo of the segmentation, and the true subject's share."""
    from pipelines.lib.imaging import quantised, read_photo, to_original
    from pipelines.lib.scoring import png
    image = read_photo(job["photo"])
    truth = png(Path(job["mask"]).read_bytes())
    truth = (truth.max(-1) if truth.ndim == 3 else truth) > 127
    h, w = truth.shape
    prob = to_original(quantised(png(job["prob"]).astype(np.float32) / 255.0), tuple(job["region"]), h, w, fill=0.0)
    image, prob = working_copy(image, prob, job["max_side"])
    masks = variants(image, prob, job["threshold"], job["seed"], job["extent_margin"])
    masks["and"], masks["or"] = masks["box"] & masks["model"], masks["box"] | masks["model"]
    masks["student"] = prob > job["threshold"]
    row = {"key": job["key"], "subject": float(truth.mean())}
    for name, m in masks.items():
        m = at_size(m, (h, w))
        row[f"iou:{name}"], row[f"area:{name}"] = iou(m, truth), float(m.mean())
    return row


def jobs(args) -> list[dict]:
    import pyarrow.dataset as ds
    from pipelines.lib import listing
    t = ds.dataset(args.segmentation, format="parquet").to_table(
        columns=["sample_id", "key", "prob", "threshold", "region"]).to_pylist()
    def by_key(folder):                      # segment's key of each file (pipelines.lib.listing.stem)
        root = Path(folder)
        return {listing.stem(p.relative_to(root).as_posix()): p for p in root.rglob("*") if p.is_file()}
    photos, masks = by_key(args.photos), by_key(args.masks)
    out, missing = [], []
    for r in sorted(t, key=lambda r: r["sample_id"]):
        key = r["key"]
        if key in masks and key in photos and r["region"] is not None:
            out.append({"key": r["key"], "photo": str(photos[key]), "mask": str(masks[key]),
                        "prob": r["prob"], "threshold": r["threshold"], "region": r["region"],
                        "seed": int(r["sample_id"]), "max_side": args.max_side, "extent_margin": args.extent_margin})
        elif r["region"] is not None:
            missing.append(r["key"] if key in photos else f"{r['key']} (photo)")
    if missing:
        print(f"bench refine: {len(missing)} of {len(t)} segmented photos have no mask in {args.masks} (or no "
              f"photo in {args.photos}), not scored: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if args.limit:
        out = out[:args.limit]
    if not out:
        raise SystemExit(f"bench refine: no photo of {args.segmentation} has a mask in {args.masks}")
    return out


def report(rows) -> dict:
    rows = rows.copy()
    rows["iou:oracle"] = np.maximum(rows["iou:box"], rows["iou:model"])
    methods = [c[4:] for c in rows.columns if c.startswith("iou:")]
    result = {"photos": len(rows), "methods": {}}
    for m in methods:
        v = rows[f"iou:{m}"]
        entry = {"iou": float(v.mean()), "beats_box": float((v > rows["iou:box"] + 1e-9).mean()),
                 "ties_box": float((np.abs(v - rows["iou:box"]) <= 1e-9).mean()), "subsets": {}}
        for name, lo, hi in SUBJECT_SIZES:
            sel = (rows["subject"] >= lo) & (rows["subject"] < hi)
            entry["subsets"][name] = {"photos": int(sel.sum()), "iou": float(v[sel].mean()) if sel.any() else None}
        result["methods"][m] = entry
    return result


def format_report(r: dict) -> str:
    names = [n for n, _, _ in SUBJECT_SIZES]
    first = next(iter(r["methods"].values()))
    head = f"{'variant':<12}{'IoU':>7}{'beats box':>11}{'ties':>7}" + "".join(
        f"{n + ' (' + str(first['subsets'][n]['photos']) + ')':>22}" for n in names)
    lines = [f"{r['photos']} photos", head]
    for m, e in r["methods"].items():
        lines.append(f"{m:<12}{e['iou']:>7.1f}{100 * e['beats_box']:>10.0f}%{100 * e['ties_box']:>6.0f}%" + "".join(
            f"{e['subsets'][n]['iou']:>22.1f}" if e["subsets"][n]["iou"] is not None else f"{'—':>22}" for n in names))
    return "\n".join(lines)


def run(args) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    import pandas as pd
    from pipelines.bench.common import cpu_name
    work = jobs(args)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        rows = pd.DataFrame(list(pool.map(one_photo, work, chunksize=8)))
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(out / "per_photo.parquet")
    result = report(rows)
    result.update(seconds=seconds, cpu=cpu_name(), segmentation=args.segmentation)
    (out / "refine.json").write_text(json.dumps(result, indent=2))
    print(format_report(result))
    print(f"{len(work)} photos × {len(VARIANTS)} GrabCut variants in {seconds:.0f} s on {cpu_name()}, "
          f"{args.workers} processes; per photo: {out / 'per_photo.parquet'}")
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("refine", help="GrabCut refinement variants of a segment output, per photo, beside box GrabCut",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--segmentation", required=True, help="a `segment` output folder of photos (its Parquet parts)")
    p.add_argument("--photos", required=True, help="the photo folder it segmented")
    p.add_argument("--masks", required=True, help="their masks (same file stem), only to score")
    p.add_argument("--out", default="runs/bench/refine")
    p.add_argument("--max-side", type=int, default=400, help="GrabCut on a copy of at most PX pixels (segment's default)")
    p.add_argument("--extent-margin", type=float, default=EXTENT_MARGIN)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=0, help="only the first N photos")
    p.set_defaults(run=run)
