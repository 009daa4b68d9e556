"""Ray Data: image corpora (or the TM-dSprites generator) → sharded, validated Parquet.

    python -m pipelines.preprocess --source tm-dsprites --preset cpu-32 --out data/tmds-32
    python -m pipelines.preprocess --source folder --input photos/ [--masks masks/] --resolution 64 --out data/photos
    python -m pipelines.preprocess --source cub --input CUB_200_2011/ --crop box --resolution 128 --out data/cub
    python -m pipelines.preprocess --source folder --input s3://bucket/photos/ --resolution 64 --out s3://bucket/data/photos

Inputs and outputs are folders or URIs (pipelines/lib/locations.py: credentials and endpoint from
the environment, e.g. AWS_* and AWS_ENDPOINT_URL for an S3-compatible store).

Read, decode, crop/resize, validate and write all run as Ray Data tasks; the driver only lists
inputs and assigns the dense `sample_id`s (sorted by split, then key) once validation is known.
Output: `part-XXXXX.parquet` files + `_manifest.json`, written to a temporary folder and
published by one rename (local) or by writing the manifest last (object stores). Bad inputs are
quarantined with a reason and listed in the manifest; the job completes.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from pipelines.lib import sources
from pipelines.lib.locations import read_bytes
from pipelines.lib.imaging import (CROPS, MAX_PIXELS, BadInput, crop_and_resize, crop_box, decode_image,
                               decode_mask, open_image)
from pipelines.lib.parquet_store import SCHEMA_VERSION, DatasetError, DatasetExists, Store

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
CLEVR_CROP = (64, 29, 256, 221)       # (left, top, right, bottom) on 320×240 CLEVR frames


@dataclass
class Options:
    source: str
    size: int
    crop: str = "center"
    margin: float = 0.1
    max_pixels: int = MAX_PIXELS
    bank_seed: int = 0
    sprite_size: tuple[float, float] = (0.15, 0.30)
    clevr_objects: tuple[int, int] = (3, 6)


def process_record(rec: dict, opt: Options) -> dict:
    """One input → one output row: image/mask bytes (fixed-shape uint8), or ok=False + reason."""
    row = {"key": rec["key"], "split": rec["split"], "image": None, "mask": None,
           "height": opt.size, "width": opt.size, "status": "ok", "reason": ""}
    try:
        if opt.source == "tm-dsprites":
            from drc_core.tmds import render
            s = render(rec["split"], int(rec["index"]), size=opt.size, bank_seed=opt.bank_seed,
                       sprite_size=opt.sprite_size)
            image, mask = s.image, s.fg
        else:
            image, mask = _decode_and_crop(rec, opt)
        if image is None:
            row["status"], row["reason"] = "filtered", mask
            return row
        row["image"] = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
        row["mask"] = None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
    except BadInput as exc:
        row["status"], row["reason"] = "quarantined", str(exc)
    except OSError as exc:
        row["status"], row["reason"] = "quarantined", f"cannot read: {exc}"
    return row


def _decode_and_crop(rec: dict, opt: Options):
    image = decode_image(read_bytes(rec["path"]), "image", opt.max_pixels)
    h, w = image.shape[:2]
    mask = None
    if rec["mask_path"]:
        try:
            raw = read_bytes(rec["mask_path"])
        except OSError as exc:
            raise BadInput(f"mask: cannot read {rec['mask_path']}: {exc}") from None
        if opt.source == "clevr-masks":
            labels = _label_map(raw, opt.max_pixels)
            n_objects = len(np.unique(labels[labels != 0]))
            lo, hi = opt.clevr_objects
            if not lo <= n_objects <= hi:
                return None, f"{n_objects} objects, outside {lo}–{hi}"
            mask = (labels != 0).astype(np.uint8)
        else:
            mask = decode_mask(raw, "mask", opt.max_pixels)
        if mask.shape != (h, w):
            raise BadInput(f"mask size {mask.shape[1]}×{mask.shape[0]} differs from image size {w}×{h}")
    elif opt.source == "clevr-masks":
        raise BadInput("mask: missing (CLEVR-with-masks needs one per image)")
    if opt.source == "clevr-masks" and (w, h) == (320, 240):
        region = CLEVR_CROP
    else:
        box = tuple(float(rec[k]) for k in ("box_x", "box_y", "box_w", "box_h"))
        box = None if any(np.isnan(box)) else box
        region = crop_box(h, w, opt.crop, box, opt.margin)
    return crop_and_resize(image, region, opt.size, mask)


def _label_map(raw: bytes, max_pixels: int) -> np.ndarray:
    img = open_image(raw, "mask", max_pixels)
    arr = np.asarray(img)
    if arr.ndim == 3:                           # colour-coded labels → one id per colour
        arr = arr[..., 0].astype(np.int64) * 65536 + arr[..., 1].astype(np.int64) * 256 + arr[..., 2]
    return arr


def _process_batch(batch, opt: Options):
    import pandas as pd
    rows = [process_record(rec, opt) for rec in batch.to_dict("records")]
    df = pd.DataFrame(rows, columns=["key", "split", "image", "mask", "height", "width", "status", "reason"])
    df["has_mask"] = df["mask"].notna()
    return df


def _assign_ids(batch, id_of):
    import pandas as pd
    import ray
    ids = id_of if isinstance(id_of, dict) else ray.get(id_of)   # a broadcast dict key → sample_id
    out = batch[batch["status"] == "ok"].drop(columns=["status", "reason", "has_mask"]).copy()
    out.insert(0, "sample_id", pd.array([ids[k] for k in out["key"]], dtype="int64"))
    return out


def list_records(args) -> list[dict]:
    root = args.input or None                                  # a folder or a URI (s3://bucket/photos/)
    masks = getattr(args, "masks", None) or None
    if args.source == "tm-dsprites":
        return sources.tm_dsprites(args.train, args.test)
    if root is None:
        raise sources.SourceError(f"--input is required for source {args.source!r}")
    if args.source == "folder":
        return sources.folder(root, masks)
    if args.source == "cub":
        return sources.cub(root)
    if args.source == "stanford-dogs":
        return sources.stanford_dogs(root, masks)
    if args.source == "stanford-cars":
        return sources.stanford_cars(root, masks)
    if args.source == "clevr-masks":
        return sources.clevr_masks(root)
    raise sources.SourceError(f"unknown source {args.source!r}; choose one of {', '.join(sources.SOURCES)}")


def run(records: list[dict], opt: Options, out: str, *, rows_per_file: int = 2000,
        overwrite: bool = False, num_blocks: int | None = None, description: dict | None = None,
        progress: bool = True) -> dict:
    """Process `records` with Ray Data and publish the dataset at `out`; returns the manifest."""
    import ray
    import pandas as pd

    store = Store(out)
    store.check_writable(overwrite)
    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    from pipelines.lib.ray_env import set_progress_bars
    set_progress_bars(ctx, progress)
    # rows stay in (split, key) order end to end, so ids are contiguous per file without a shuffle
    ctx.execution_options.preserve_order = True

    # duplicate keys: the first (in listing order) wins, the others are quarantined up front
    seen: set[str] = set()
    quarantine: list[dict] = []
    unique = []
    for rec in records:
        if rec["key"] in seen:
            quarantine.append({"input": rec["path"] or rec["key"], "key": rec["key"],
                               "reason": f"duplicate key {rec['key']!r}"})
        else:
            seen.add(rec["key"])
            unique.append(rec)
    n_inputs = len(records)
    if not unique:
        raise sources.SourceError("no inputs found")
    unique.sort(key=lambda r: (SPLIT_ORDER.get(r["split"], 9), r["key"]))

    blocks = num_blocks or max(1, min(len(unique) // 200, 1000))
    frame = pd.DataFrame(unique)
    bounds = np.linspace(0, len(frame), blocks + 1).astype(int)
    # our own split: from_pandas(override_num_blocks=…) breaks on pandas 3 (np.array_split)
    chunks = [frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    processed = (ray.data.from_pandas(chunks)
                 .map_batches(_process_batch, fn_kwargs={"opt": opt}, batch_format="pandas", batch_size=32)
                 .materialize())
    status = processed.select_columns(["key", "split", "status", "reason", "has_mask"]).to_pandas()
    path_of = {r["key"]: r["path"] for r in unique}
    filtered = []
    for r in status.itertuples():
        if r.status == "quarantined":
            quarantine.append({"input": path_of[r.key] or r.key, "key": r.key, "reason": r.reason})
        elif r.status == "filtered":
            filtered.append({"input": path_of[r.key] or r.key, "key": r.key, "reason": r.reason})
    ok = status[status["status"] == "ok"]
    ok = ok.assign(_order=ok["split"].map(lambda s: SPLIT_ORDER.get(s, 9))).sort_values(["_order", "key"])
    id_of = dict(zip(ok["key"], range(len(ok))))
    n_files = max(1, math.ceil(len(ok) / rows_per_file))
    final = (processed.map_batches(_assign_ids, fn_kwargs={"id_of": ray.put(id_of)}, batch_format="pandas")
             .repartition(n_files, shuffle=False))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_unix": time.time(),
        "source": {"kind": opt.source, **(description or {})},
        "resolution": opt.size,
        "crop": opt.crop,
        "image_encoding": "raw uint8, row-major (height, width, 3)",
        "mask_encoding": "raw uint8 {0,1}, row-major (height, width); null when the input has none",
        "counts": {"inputs": n_inputs, "ok": len(ok), "quarantined": len(quarantine), "filtered": len(filtered),
                   "per_split": {k: int(v) for k, v in ok["split"].value_counts().sort_index().items()},
                   "with_mask": int(ok["has_mask"].sum())},
        "files": n_files,
        "rows_per_file_target": rows_per_file,
        "sample_id_checksum": id_checksum(ok["key"].tolist()),
        "quarantine": sorted(quarantine, key=lambda q: q["key"]),
        "filtered": sorted(filtered, key=lambda q: q["key"]),
    }
    store.publish(final, manifest, overwrite=overwrite)
    manifest = store.read_manifest()
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def id_checksum(keys_in_id_order: list[str]) -> str:
    """sha256 over 'sample_id\\tkey' lines: changes if any id ↔ key assignment changes."""
    h = hashlib.sha256()
    for i, k in enumerate(keys_in_id_order):
        h.update(f"{i}\t{k}\n".encode())
    return h.hexdigest()


def summary_table(manifest: dict) -> str:
    c = manifest["counts"]
    lines = [f"{'split':<10}{'images':>10}", *(f"{s:<10}{n:>10}" for s, n in c["per_split"].items()),
             f"{'ok':<10}{c['ok']:>10}", f"{'quarant.':<10}{c['quarantined']:>10}",
             f"{'filtered':<10}{c['filtered']:>10}", f"{'inputs':<10}{c['inputs']:>10}"]
    for q in manifest["quarantine"][:20]:
        lines.append(f"  quarantined {q['input']}: {q['reason']}")
    if len(manifest["quarantine"]) > 20:
        lines.append(f"  … {len(manifest['quarantine']) - 20} more in _manifest.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from drc_core.presets import get_config, preset_names
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=sources.SOURCES)
    p.add_argument("--input", help="dataset root, a folder or URI (s3://bucket/photos/, gs://…); not for tm-dsprites")
    p.add_argument("--masks", help="mask folder or URI matched by relative path/stem (folder, dogs, cars)")
    p.add_argument("--out", "--output", dest="out", required=True, help="output folder or URI (file://, s3://, gs://, …)")
    p.add_argument("--preset", default="cpu-32", choices=preset_names(), help="resolution and TM-dSprites settings")
    p.add_argument("--resolution", type=int, default=None, help="override the preset's resolution")
    p.add_argument("--crop", default=None, choices=CROPS, help="default: box where boxes exist, else center")
    p.add_argument("--margin", type=float, default=0.1, help="box crop margin, fraction of the box side")
    p.add_argument("--train", type=int, default=None, help="TM-dSprites train images (default: preset)")
    p.add_argument("--test", type=int, default=None, help="TM-dSprites test images (default: preset)")
    p.add_argument("--rows-per-file", type=int, default=2000)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="decompression-bomb limit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--address", default=None, help="Ray address (default: local, or the job's cluster)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the summary table is still printed)")
    args = p.parse_args(argv)
    from pipelines.lib.ray_env import ScratchPathError, check_job_outputs
    try:
        check_job_outputs("preprocess", {"--out": args.out})
    except ScratchPathError as exc:
        sys.exit(str(exc))

    cfg = get_config(args.preset)
    size = args.resolution or cfg.model.resolution
    args.train = cfg.data.train_size if args.train is None else args.train
    args.test = cfg.data.test_size if args.test is None else args.test
    crop = args.crop or ("box" if args.source in ("cub", "stanford-dogs", "stanford-cars") else "center")
    opt = Options(source=args.source, size=size, crop=crop, margin=args.margin, max_pixels=args.max_pixels,
                  bank_seed=cfg.data.bank_seed, sprite_size=tuple(cfg.data.sprite_size))
    try:
        records = list_records(args)
    except sources.SourceError as exc:
        sys.exit(f"preprocess: {exc}")
    from pipelines.lib.ray_env import init_ray
    init_ray(address=args.address, num_cpus=args.num_cpus)
    desc = {"input": args.input, "preset": args.preset}
    if args.source == "tm-dsprites":
        desc.update(bank_seed=cfg.data.bank_seed, sprite_size=list(cfg.data.sprite_size))
    try:
        manifest = run(records, opt, args.out, rows_per_file=args.rows_per_file, overwrite=args.overwrite,
                       description=desc, progress=not args.quiet)
    except (DatasetExists, DatasetError) as exc:        # an existing dataset, a failed write (disk full)
        sys.exit(f"preprocess: {exc}")
    print(summary_table(manifest))
    print(f"wrote {manifest['counts']['ok']} rows in {manifest['files']} files to {args.out} "
          f"in {manifest['seconds']:.1f} s")
    return manifest


if __name__ == "__main__":
    main()
