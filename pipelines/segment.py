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
on photos, off for the synthetic benchmarks) re-draws each mask with GrabCut at the photo's own
size, the model saying where and GrabCut what: GrabCut from a box around the model's mask (+10 % of
the photo's long side), or from the model's partition where that cut comes back empty
(pipelines.lib.grabcut.refine_photo). That mask is the `refined` column (PNG at the photo's size;
model resolution for Parquet rows) and what `--png` writes (docs/quality.md: what it gives on
PASCAL-S beside GrabCut, per subject size). Each image's
chain depends only on (seed, sample_id): the same input, model and seed give the same masks however
the work is batched.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

from drc_core.threshold import DEFAULT, PolicyError, ThresholdPolicy
from pipelines.lib import devices, listing, locations
from pipelines.lib.checkpoints import CheckpointError
from pipelines.lib.errors import find_cause, os_reason
from pipelines.lib.grabcut import COLLAPSED, EXTENT_MARGIN, REFINE_MAX_SIDE
from pipelines.lib.imaging import MAX_PIXELS, NOT_SEGMENTED
from pipelines.lib.models import AMORTIZED, LANGEVIN, REFINE, SYNTHETIC, ModelError, load, resolve_refine
from pipelines.lib.parquet_store import DatasetError, DatasetExists, Output
from pipelines.lib.ray_env import WINDOW_BLOCKS, ScratchPathError, end_window
from pipelines.lib.segment_batch import SegmentBatch
from pipelines.lib.segment_inputs import Units, dataset_units, folder_units, is_dataset, read_unit
from pipelines.lib.segment_output import (EXAMPLES, PartNames, count_nodes, read_output,  # noqa: F401 (read_output: segment's reader)
                                          scan_output, write_failure)

WINDOW_UNITS = WINDOW_BLOCKS       # units (one block each) per Ray Data execution: ray_env.WINDOW_BLOCKS


def _segment_window(args, window: np.ndarray, units: Units, output: Output, *, steps, png, cpus, gpu, policy,
                    refine) -> None:
    """Segment the units `window` (indices into `units`) into `output`'s staging folder, as one Ray
    Data execution."""
    import ray
    from ray.data import SaveMode
    from pipelines.lib.ray_env import actor_restarts
    # one block per unit, made on the driver (no read task: a read task waiting for a CPU the
    # actors hold would wait forever); the read tasks reserve no CPU for the same reason
    ds = ray.data.from_items([{"id": i} for i in range(window.size)], override_num_blocks=int(window.size))
    # no more actors than units (a window of one unit: the quickstart's test split, a small folder):
    # an actor with nothing to do still starts a process and loads the model
    actors = min(args.actors, int(window.size))
    # at most two reads per actor at once: a 0-CPU task is otherwise started as often as Ray Data
    # likes, each in a new worker process (a second of CPU each)
    ds = ds.map_batches(read_unit, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"units": units, "pending": window}, num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=min(2 * actors, int(window.size))))
    with warnings.catch_warnings():
        # max_restarts goes through **ray_remote_args, the way Ray Data 2.60 documents to change
        # its actors' restarts (actor_pool_map_operator.py); the same release marks that deprecated
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        ds = ds.map_batches(
            SegmentBatch, batch_size=None, batch_format="pyarrow",
            fn_constructor_kwargs=dict(model=args.model, steps=steps, seed=args.seed,
                                       from_chains=args.from_chains, png=png, threads=max(1, int(cpus)),
                                       batch_size=args.batch_size, tracking_uri=args.tracking_uri,
                                       max_pixels=args.max_pixels, threshold=policy.name, device=args.device,
                                       crop=args.crop, refine=refine, max_side=args.refine_max_side),
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=1 if gpu else 0,
            max_restarts=actor_restarts(args.address))
    failure = None
    try:
        ds.write_parquet(output.folder, filesystem=output.staging.fs, filename_provider=PartNames(),
                         mode=SaveMode.APPEND, min_rows_per_file=args.rows_per_file,
                         ray_remote_args={"num_cpus": 0}, concurrency=min(2, int(window.size)), write_page_checksum=True,
                         row_group_size=256)
    except Exception as exc:
        failure = write_failure(exc, args.output, output.folder)
        if failure is None:
            raise
    if failure is not None:
        del ds
        raise failure


def run(args) -> dict:
    import ray
    from pipelines.lib.ray_env import check_job_outputs, init_ray, joins_cluster, set_progress_bars, wait_for_free_cpus

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
    dataset_input = is_dataset(args.input)
    if args.from_chains and not dataset_input:
        raise ModelError("--from-chains needs a Parquet dataset as --input (the one the model was trained on)")
    png = locations.absolute(args.png) if args.png else None
    settings = {"model": args.model, "mode": mode, "from_chains": bool(args.from_chains), "steps": steps,
                "seed": args.seed, "input": locations.absolute(args.input), "split": args.split, "limit": args.limit,
                "threshold": policy.name, "crop": args.crop, "refine": refine, "refine_max_side": args.refine_max_side,
                "max_pixels": args.max_pixels, "batch_size": args.batch_size, "png": png}
    output = Output(args.output)
    output.check(resume=args.resume, overwrite=args.overwrite)     # before Ray starts

    init_ray(args.address, num_cpus=args.num_cpus)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    set_progress_bars(ctx, not args.quiet)
    verdict = output.begin({"kind": "segmentation", **settings}, resume=args.resume, overwrite=args.overwrite)
    if verdict == "complete":
        manifest = output.target.read_manifest()
        manifest["run"] = {"inputs_processed": 0, "units_reused": None, "seconds": 0.0}
        return manifest
    gpu = devices.reserves_gpu(args.device, "segment", joined=joins_cluster(args.address))
    duplicates, n_dup = [], 0
    if dataset_input:
        units, source = dataset_units(args.input, args.split, args.batch_size, segmenter.resolution, args.limit)
    else:
        saved = listing.load(output.file("_listing")) if verdict == "resume" else None
        if saved is None:
            try:
                fresh = listing.list_folder(args.input, rows=args.rows_per_file, folder=output.file("_listing"))
            except Exception as exc:
                clear = find_cause(exc, OSError)
                raise ModelError(f"--input {args.input}: cannot list it ({os_reason(clear or exc)})") from None
            saved = listing.save(fresh, output.file("_listing"))
        units = folder_units(args.input, saved, args.split, args.batch_size, args.limit)
        duplicates, n_dup = saved.duplicates, saved.n_duplicates
        source = {"kind": "folder", "input": args.input}
    done = np.zeros(units.count, np.int64)
    if verdict == "resume":
        for s in scan_output(output, units):
            u, n = s["units"]
            np.add.at(done, u[u >= 0], n[u >= 0])
    sizes = units.sizes()
    partial = np.flatnonzero((done > 0) & (done != sizes))
    if partial.size:
        raise DatasetError(f"{args.output}: --resume found unit {int(partial[0])} written in part only; "
                           f"use --overwrite to start over")
    pending = np.flatnonzero(done == 0)
    cpus = args.cpus_per_actor
    wait_for_free_cpus(cpus)          # no false "will hang" warning from Ray Data on a just-started cluster
    for lo in range(0, pending.size, WINDOW_UNITS):
        if lo:
            wait_for_free_cpus(cpus)      # the last window's actors are giving their CPUs back
        _segment_window(args, pending[lo:lo + WINDOW_UNITS], units, output, steps=steps, png=png, cpus=cpus,
                        gpu=gpu, policy=policy, refine=refine)
        end_window()
    files = scan_output(output, None)
    examples = [e for d in duplicates for e in listing.duplicates_table(d).to_pylist()][:EXAMPLES]
    for f in files:
        examples += f["examples"][:max(0, EXAMPLES - len(examples))]
    per_split = {}
    for f in files:
        for k, v in f["per_split"].items():
            per_split[k] = per_split.get(k, 0) + v
    ok = sum(f["ok"] for f in files)
    seconds = time.perf_counter() - t0
    files.sort(key=lambda f: (f["id_min"] is None, f["id_min"] or 0, f["name"]))
    manifest = {
        "kind": "segmentation", "created_unix": time.time(),
        "mode": mode, "from_chains": bool(args.from_chains), "steps": steps if mode == LANGEVIN else 0,
        "seed": args.seed, "model": args.model, "device": args.device, "gpus_per_actor": int(gpu),
        "resolution": segmenter.resolution, "source": source,
        "preset": segmenter.cfg.preset, "crop": args.crop if source["kind"] == "folder" else None,
        "threshold_policy": policy.name,
        "refine": {"method": "grabcut", "start": "box around the mask", "margin": EXTENT_MARGIN,
                   "fallback": {"below": COLLAPSED, "start": "the model's partition", "sure_foreground": 0.9,
                                "frame_px": 1}, "iterations": 5, "max_side": args.refine_max_side} if refine else None,
        "mask_encoding": f"PNG, 8-bit grey, 255 = foreground (π_f > the image's threshold under policy {policy.name})",
        "prob_encoding": "PNG, 8-bit grey, round(255·π_f)",
        "status": "rows with status 'quarantined' (and their reason) are inputs that could not be segmented",
        "counts": {"inputs": units.inputs + n_dup, "ok": ok, "quarantined": units.inputs - ok + n_dup,
                   "per_split": dict(sorted(per_split.items()))},
        "rows": sum(f["rows"] for f in files), "files": len(files), "file_names": [f["name"] for f in files],
        "parts": [{k: f[k] for k in ("name", "rows", "ok", "id_min", "id_max")} for f in files],
        "nodes": count_nodes(files),
        "seconds": seconds, "images_per_s": int(sizes[pending].sum()) / seconds if seconds > 0 else 0.0,
        "quarantine": examples,
    }
    if manifest["rows"] != units.inputs:
        raise DatasetError(f"{args.output}: the output holds {manifest['rows']} rows for {units.inputs} inputs")
    # the run that finished the output: what it did itself (the rest an interrupted run had written)
    manifest["run"] = {"inputs_processed": int(sizes[pending].sum()), "units_reused": int(units.count - pending.size),
                       "seconds": seconds}
    locations.delete(output.file("_listing"))
    return output.finish(manifest)

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder, model.pt / student.pt, or MLflow model URI")
    p.add_argument("--input", required=True, help="Parquet dataset or image folder (a folder or URI)")
    p.add_argument("--output", "--out", dest="output", default=None,
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
                   help="'grabcut': re-draw each mask with GrabCut at the photo's own size, started from a box "
                        "around the model's mask (from the model's partition where that cut comes back empty), "
                        "stored as `refined` and written by --png; 'auto' (default): grabcut for "
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
                   help="also write DIR/masks/*.png and DIR/overlays/*.png (image files: at each photo's own size); "
                        "a folder or a URI")
    p.add_argument("--crop", default="resize", choices=("resize", "center"),
                   help="image files: what the model sees of a photo. resize (default): the whole photo stretched "
                        "to the model's square, every pixel gets a mask; center: the largest centred square, "
                        f"pixels outside it are {NOT_SEGMENTED} (not segmented) in the full-size masks")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="decompression-bomb limit (image folders)")
    p.add_argument("--limit", type=int, default=None, help="segment only the first N inputs (of --split)")
    p.add_argument("--rows-per-file", type=int, default=5000,
                   help="rows per output file (at least: whole batches are never split)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (or an interrupted run's)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into --output: finished batches are kept, the rest is done "
                        "(same settings required)")
    p.add_argument("--tracking-uri", default=None, help="MLflow, for runs:/ and models:/ model URIs")
    p.add_argument("--address", default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars, no Ray Data INFO lines")
    args = p.parse_args(argv)
    if args.output is None:
        if args.png is None:
            p.error("give --output (the Parquet dataset of masks and π_f) or --png DIR (then --output is DIR/segmentation)")
        args.output = locations.join(args.png, "segmentation")
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
        clear = None
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
