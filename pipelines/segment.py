"""Offline batch segmentation of a corpus with Ray Data: images in, masks out.

    python -m pipelines.segment --model runs/ray/<name>/checkpoint_000300 --input data/tmds-32 --split test --output out/seg
    python -m pipelines.segment --model student.pt --input photos/ --png out/photos        # Parquet in out/photos/segmentation
    python -m pipelines.segment --model runs:/<run_id>/model --input data/tmds-32 --output out/seg-mlflow
    python -m pipelines.segment --model <checkpoint> --input data/tmds-32 --split train --from-chains --output out/seg-train

Modes (`--mode`, or taken from the model): `langevin` runs the paper's posterior Langevin from
N(0, I) for `--steps` (default: the preset's test steps) on a DRC model; `amortized` runs the
distilled feed-forward segmenter (pipelines.distill) in one pass. `--from-chains` (a training
checkpoint, training split) starts from each image's persistent chain instead of noise and runs
only a few refinement steps. The input is a Parquet dataset (pipelines.preprocess) or any image
folder, local or a URI (s3://bucket/photos/; pipelines/lib/locations.py); an actor pool loads the
model once per actor, on `--device` (auto: one GPU per actor when the cluster has GPUs;
pipelines/lib/devices.py).

Output (spec/architecture.md): `part-XXXXX.parquet` with sample_id, key, split, mask (PNG bytes,
0/255: π_f above the image's threshold under `--threshold`, default Otsu per image; `0.5` is the
DRC protocol), threshold, prob (π_f as an 8-bit PNG, so another policy can be applied later
without running the model: `pipelines.evaluate --threshold`), fg_fraction, confidence (mean
|2π_f − 1|), recon_l1 (NaN for amortized), height / width / region (image files: the photo's
size and the region the model saw; null for Parquet rows), refined (below) and
`_manifest.json` with counts, settings and the quarantined inputs with reasons; `--png DIR`
also writes DIR/masks/ and DIR/overlays/ (file names derived from sample id + a sanitised key,
so no key can escape DIR). For image files those are at each photo's own size: π_f is mapped
back through the exact crop/resize the model input went through (`--crop resize`, the default:
the whole photo; `--crop center`: pixels outside the centred square are 128, "not segmented").
The Parquet `mask` stays at model resolution. `--refine grabcut` (the default for a model trained
on photos, off for the synthetic benchmarks) re-draws each mask with GrabCut started from the
model's partition at the photo's own size (π_f > 0.9 definite foreground, the frame definite
background, the rest probable as the mask says): that mask is the `refined` column (PNG at the
photo's size; model resolution for Parquet rows) and what `--png` writes; on PASCAL-S it lifts the
distilled student from 39.4 / 41.2 to 45.4 / 47.9 IoU (docs/quality.md §3, stop 31). Each image's
chain depends only on (seed, sample_id): the same input, model and seed give the same masks however
the work is batched.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.lib import devices, locations
from pipelines.lib.checkpoints import CheckpointError
from pipelines.lib.errors import find_cause
from drc_core.threshold import DEFAULT, PolicyError, ThresholdPolicy
from pipelines.lib.grabcut import REFINE_MAX_SIDE
from pipelines.lib.imaging import MAX_PIXELS, NOT_SEGMENTED, BadInput, model_input, product_mask, read_photo
from pipelines.lib.mask_files import overlay, safe_name, write_pair
from pipelines.lib.models import AMORTIZED, LANGEVIN, REFINE, SYNTHETIC, ModelError, load, resolve_refine
from pipelines.lib.ray_env import ScratchPathError
from pipelines.lib.parquet_store import SCHEMA_VERSION, DatasetError, DatasetExists, Store
from pipelines.lib.segment_inputs import input_dataset

OUTPUT_SCHEMA = pa.schema([("sample_id", pa.int64()), ("key", pa.string()), ("split", pa.string()),
                           ("status", pa.string()), ("reason", pa.string()), ("mask", pa.binary()),
                           ("fg_fraction", pa.float64()), ("confidence", pa.float64()),
                           ("recon_l1", pa.float64()), ("prob", pa.binary()), ("threshold", pa.float64()),
                           # image files: the photo's size and the (left, top, right, bottom) region
                           # the model saw (null for Parquet rows, which are at model resolution)
                           ("height", pa.int32()), ("width", pa.int32()), ("region", pa.list_(pa.int32())),
                           # --refine grabcut: the mask GrabCut re-drew from π_f's partition (PNG 0/255, at
                           # the photo's own size for image files, model resolution for Parquet rows)
                           ("refined", pa.binary())])


class SegmentBatch:
    """Ray Data actor: loads the model once, then segments batches of rows. A row that cannot
    be decoded is returned as quarantined with its reason; the batch goes on."""

    def __init__(self, model: str, *, steps: int | None, seed: int, from_chains: bool, png: str | None,
                 threads: int, batch_size: int, tracking_uri: str | None = None, max_pixels: int = MAX_PIXELS,
                 threshold: str = DEFAULT.name, device: str = "auto", crop: str = "resize",
                 refine: bool = False, max_side: int = REFINE_MAX_SIDE):
        import torch
        torch.set_num_threads(max(1, threads))
        if tracking_uri:
            import mlflow
            mlflow.set_tracking_uri(tracking_uri)
        self.seg = load(model, devices.resolve(device, "segment"))
        self.steps, self.seed, self.batch_size = steps, seed, batch_size
        self.chains = None
        if from_chains:
            from pipelines.lib.checkpoints import ChainReader
            self.chains = ChainReader(self.seg.checkpoint)
        self.png = Path(png) if png else None
        self.max_pixels = max_pixels
        self.policy = ThresholdPolicy.parse(threshold)
        self.crop = crop
        self.refine, self.max_side = refine, max_side

    def _read_photo(self, path: str) -> np.ndarray:
        return read_photo(path, self.max_pixels)

    def _decode(self, row: dict) -> tuple[np.ndarray, dict | None]:
        """(the model input, the photo's geometry {height, width, region} or None for a Parquet row)."""
        size = self.seg.resolution
        if row.get("image") is not None:                      # a Parquet dataset row: raw uint8
            raw = row["image"]
            if len(raw) != size * size * 3:
                raise BadInput(f"image has {len(raw)} bytes, expected {size}×{size}×3")
            return np.frombuffer(raw, np.uint8).reshape(size, size, 3), None
        photo = self._read_photo(row["path"])
        image, region = model_input(photo, size, self.crop)
        return image, {"height": photo.shape[0], "width": photo.shape[1], "region": list(region)}

    def __call__(self, batch) -> pa.Table:
        from pipelines.lib.mlflow_model import result_frame
        rows = batch.to_dict("records")
        out = [{"sample_id": int(r["sample_id"]), "key": r["key"], "split": r["split"], "status": "ok",
                "reason": "", "mask": None, "fg_fraction": None, "confidence": None, "recon_l1": None,
                "prob": None, "threshold": None, "height": None, "width": None, "region": None,
                "refined": None}
               for r in rows]
        images, good = [], []
        for i, r in enumerate(rows):
            try:
                image, geometry = self._decode(r)
                images.append(image)
                out[i].update(geometry or {})
                good.append(i)
            except BadInput as exc:
                out[i]["status"], out[i]["reason"] = "quarantined", str(exc)
        if good:
            ids = np.array([out[i]["sample_id"] for i in good], np.int64)
            z_init = self.chains.get(ids) if self.chains is not None else None
            res = self.seg.segment(np.stack(images), ids, steps=self.steps, seed=self.seed, z_init=z_init,
                                   batch_size=self.batch_size)
            frame, masks = result_frame(res["prob"], res["recon_l1"], self.policy)
            for j, i in enumerate(good):
                out[i].update(mask=frame["mask_png"][j], fg_fraction=float(frame["fg_fraction"][j]),
                              confidence=float(frame["confidence"][j]), recon_l1=float(frame["recon_l1"][j]),
                              prob=frame["prob_png"][j], threshold=float(frame["threshold"][j]))
                if self.refine or self.png is not None:
                    self._finish(out[i], rows[i], images[j], res["prob"][j], masks[j])
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _final_mask(self, row: dict, image: np.ndarray, prob: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """pipelines.lib.imaging.product_mask of the row: at the photo's own size for image files, at
        model resolution for Parquet rows; re-drawn by GrabCut when refining."""
        return product_mask(image, prob, row["threshold"], mask, row["region"], refine=self.refine,
                            seed=row["sample_id"], max_side=self.max_side)

    def _finish(self, row: dict, source: dict, image: np.ndarray, prob: np.ndarray, mask: np.ndarray) -> None:
        """The row's `refined` mask when refining, and DIR/masks/<name>.png + DIR/overlays/<name>.png
        (the product's mask: the refined one when refining) with --png."""
        import io

        from PIL import Image
        if row["region"] is not None:
            image = self._read_photo(source["path"])          # decoded again: batches hold no full-size photos
        final = self._final_mask(row, image, prob, mask)
        buf = io.BytesIO()
        Image.fromarray(final).save(buf, format="PNG")
        if self.refine:
            row["refined"] = buf.getvalue()
        if self.png is not None:                            # model-resolution rows: overlays upscaled to be seen
            write_pair(self.png, safe_name(row["sample_id"], row["key"]), buf.getvalue(),
                       overlay(image, final, 128 if row["region"] is None else 1))


def _ok_rows(table: pa.Table) -> pa.Table:
    import pyarrow.compute as pc
    return table.filter(pc.equal(table["status"], "ok")).drop_columns(["status", "reason"])


def run(args) -> dict:
    import ray
    from pipelines.lib.ray_env import (actor_restarts, check_job_outputs, init_ray, joins_cluster, set_progress_bars,
                                       wait_for_free_cpus)

    if args.tracking_uri:
        import mlflow
        mlflow.set_tracking_uri(args.tracking_uri)
    t0 = time.perf_counter()
    segmenter = load(args.model)                         # fail fast on a bad reference, on the driver
    mode = segmenter.kind if args.mode == "auto" else args.mode
    if mode != segmenter.kind:
        raise ModelError(f"--mode {args.mode}: {args.model} is a {segmenter.kind} model "
                         f"({'a distilled student' if segmenter.kind == AMORTIZED else 'a DRC model'})")
    if args.from_chains and segmenter.checkpoint is None:
        raise ModelError(f"--from-chains needs a training checkpoint folder as --model, got {args.model}")
    try:
        policy = ThresholdPolicy.parse(args.threshold)
    except PolicyError as exc:
        raise ModelError(f"--threshold: {exc}") from None
    if policy.corpus:
        raise ModelError(f"--threshold {args.threshold}: segment thresholds each image as it streams; a corpus "
                         f"policy is applied afterwards from the stored π_f (pipelines.evaluate --threshold "
                         f"{policy.name})")
    devices.check(args.device, "segment")
    refine = resolve_refine(args.refine, segmenter)
    if args.refine_max_side < 16:
        raise ModelError(f"--refine-max-side {args.refine_max_side}: expected at least 16 pixels")
    steps = args.steps
    if mode == LANGEVIN and steps is None:
        steps = args.refine_steps if args.from_chains else segmenter.cfg.langevin.test_steps
    check_job_outputs("segment", {"--output": args.output, "--png": args.png})
    if args.png and locations.is_uri(args.png):
        raise ModelError(f"--png {args.png}: PNG masks and overlays are written to a local folder; the masks "
                         f"themselves are in --output, which may be a URI")
    store = Store(args.output)
    store.check_writable(args.overwrite)

    init_ray(args.address, num_cpus=args.num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    set_progress_bars(ctx, not args.quiet)
    gpu = devices.reserves_gpu(args.device, "segment", joined=joins_cluster(args.address))
    ds, n_inputs, quarantine, source, paths = input_dataset(args, segmenter.resolution)
    if args.limit:
        ds = ds.limit(args.limit)
    cpus = args.cpus_per_actor
    wait_for_free_cpus(cpus)          # no false "will hang" warning from Ray Data on a just-started cluster
    with warnings.catch_warnings():
        # max_restarts goes through **ray_remote_args, the way Ray Data 2.60 documents to change
        # its actors' restarts (actor_pool_map_operator.py); the same release marks that deprecated
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        processed = ds.map_batches(
            SegmentBatch, batch_size=args.batch_size, batch_format="pandas",
            fn_constructor_kwargs=dict(model=args.model, steps=steps, seed=args.seed, from_chains=args.from_chains,
                                       png=str(Path(args.png).resolve()) if args.png else None,
                                       threads=max(1, int(cpus)), batch_size=args.batch_size,
                                       tracking_uri=args.tracking_uri, max_pixels=args.max_pixels,
                                       threshold=policy.name, device=args.device, crop=args.crop,
                                       refine=refine, max_side=args.refine_max_side),
            compute=ray.data.ActorPoolStrategy(size=args.actors), num_cpus=cpus, num_gpus=1 if gpu else 0,
            max_restarts=actor_restarts(args.address),
        ).materialize()
    status = processed.select_columns(["sample_id", "key", "split", "status", "reason"]).to_pandas()
    for r in status[status["status"] != "ok"].itertuples():
        quarantine.append({"input": paths.get(r.key, r.key), "key": r.key, "sample_id": int(r.sample_id),
                           "reason": r.reason})
    ok = status[status["status"] == "ok"]
    if args.limit:
        n_inputs = len(status) + sum(1 for q in quarantine if "sample_id" not in q)
    seconds = time.perf_counter() - t0
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "segmentation", "created_unix": time.time(),
        "mode": mode, "from_chains": bool(args.from_chains), "steps": steps if mode == LANGEVIN else 0,
        "seed": args.seed, "model": args.model, "device": args.device, "gpus_per_actor": int(gpu), "resolution": segmenter.resolution, "source": source,
        "preset": segmenter.cfg.preset, "crop": args.crop if source["kind"] == "folder" else None,
        "threshold_policy": policy.name,
        "refine": {"method": "grabcut", "sure_foreground": 0.9, "frame_px": 1, "iterations": 5,
                   "max_side": args.refine_max_side} if refine else None,
        "mask_encoding": f"PNG, 8-bit grey, 255 = foreground (π_f > the image's threshold under policy {policy.name})",
        "prob_encoding": "PNG, 8-bit grey, round(255·π_f)",
        "counts": {"inputs": n_inputs, "ok": len(ok), "quarantined": len(quarantine),
                   "per_split": {k: int(v) for k, v in ok["split"].value_counts().sort_index().items()}},
        "seconds": seconds, "images_per_s": len(ok) / seconds if seconds > 0 else 0.0,
        "quarantine": sorted(quarantine, key=lambda q: q["key"]),
    }
    final = processed.map_batches(_ok_rows, batch_format="pyarrow")
    if len(ok) > 0:
        final = final.repartition(max(1, -(-len(ok) // args.rows_per_file)), shuffle=False)
    store.publish(final, manifest, overwrite=args.overwrite)
    return store.read_manifest()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, model.pt / student.pt, or MLflow model URI")
    p.add_argument("--input", required=True, help="Parquet dataset or image folder (a folder or URI)")
    p.add_argument("--output", default=None,
                   help="output dataset folder or URI (default with --png: DIR/segmentation)")
    p.add_argument("--mode", default="auto", choices=("auto", LANGEVIN, AMORTIZED))
    p.add_argument("--split", default=None, choices=("train", "val", "test"), help="only this split")
    p.add_argument("--steps", type=int, default=None, help="posterior Langevin steps (default: the preset's test steps)")
    p.add_argument("--from-chains", action="store_true", help="start from the checkpoint's persistent chains")
    p.add_argument("--refine-steps", type=int, default=10, help="Langevin steps after --from-chains")
    p.add_argument("--threshold", default=DEFAULT.name, metavar="POLICY",
                   help=f"how π_f becomes a mask: 0.5 (the DRC protocol), a number, otsu, gmm (per image) "
                        f"(default: {DEFAULT.name}; drc_core/threshold.py)")
    p.add_argument("--refine", default="auto", choices=REFINE,
                   help="'grabcut': re-draw each mask with GrabCut started from the model's partition (π_f > 0.9 "
                        "definite foreground, the frame definite background, the rest as the mask says) at the "
                        "photo's own size, stored as `refined` and written by --png; 'auto' (default): grabcut for "
                        f"a model trained on photos, off for {', '.join(SYNTHETIC)}")
    p.add_argument("--refine-max-side", type=int, default=REFINE_MAX_SIDE, metavar="PX",
                   help="photos whose long side exceeds PX are refined on a copy scaled down to it "
                        f"(default {REFINE_MAX_SIDE}: GrabCut's time grows with the pixels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--actors", type=int, default=1, help="model replicas (each loads the model once)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    devices.add_argument(p)
    p.add_argument("--png", default=None, metavar="DIR",
                   help="also write DIR/masks/*.png and DIR/overlays/*.png (image files: at each photo's own size)")
    p.add_argument("--crop", default="resize", choices=("resize", "center"),
                   help="image files: what the model sees of a photo. resize (default): the whole photo stretched "
                        "to the model's square, every pixel gets a mask; center: the largest centred square, "
                        f"pixels outside it are {NOT_SEGMENTED} (not segmented) in the full-size masks")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="decompression-bomb limit (image folders)")
    p.add_argument("--limit", type=int, default=None, help="segment only the first N rows")
    p.add_argument("--rows-per-file", type=int, default=5000)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--tracking-uri", default=None, help="MLflow, for runs:/ and models:/ model URIs")
    p.add_argument("--address", default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars, no Ray Data INFO lines")
    args = p.parse_args(argv)
    if args.output is None:
        if args.png is None:
            p.error("give --output (the Parquet dataset of masks and π_f) or --png DIR (then --output is DIR/segmentation)")
        args.output = str(Path(args.png) / "segmentation")
    return args


# errors whose message says everything: printed in one line, also when an actor raised them
CLEAR_ERRORS = (ModelError, DatasetExists, DatasetError, CheckpointError, devices.DeviceError, ScratchPathError)


def main(argv=None) -> dict:
    args = parse_args(argv)
    failed = None
    try:
        manifest = run(args)
    except Exception as exc:
        clear = find_cause(exc, CLEAR_ERRORS)
        if clear is None:
            raise
        failed = str(clear) if isinstance(clear, (devices.DeviceError, ScratchPathError)) else f"segment: {clear}"
    if failed is not None:
        # exit outside the handler and collect: the failed pipeline's traceback holds Ray Data's
        # actor pool (and its CPUs) until the reference cycle is broken
        import gc
        gc.collect()
        sys.exit(failed)
    c = manifest["counts"]
    print(f"segmented {c['ok']} of {c['inputs']} inputs ({c['quarantined']} quarantined) in "
          f"{manifest['seconds']:.1f} s ({manifest['images_per_s']:.2f} images/s), mode {manifest['mode']}, "
          f"→ {args.output}")
    for q in manifest["quarantine"][:20]:
        print(f"  quarantined {q['input']}: {q['reason']}")
    return manifest


if __name__ == "__main__":
    main()
