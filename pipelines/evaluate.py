"""Honest evaluation of segmentations against ground-truth masks, with baselines side by side.

    python -m pipelines.evaluate --data data/tmds-32 --pred langevin=out/seg-l --pred amortized=out/seg-a --out out/eval
    python -m pipelines.evaluate --data photos/ --masks photo-masks/ --pred student=out/photos --out out/eval-photos

Per-image IoU and Dice averaged over images (the DRC protocol), per split, for every
segmentation output given (pipelines.segment) and for baselines computed on the same images:
GrabCut (OpenCV, initialised with the image minus a margin as the box), the all-foreground mask
and the best centred disc (its area chosen with the ground truth, so an optimistic baseline).
Methods are compared on the images every method covers; coverage is reported. A Parquet dataset
is scored at the model's resolution; a photo folder with `--masks` at each photo's own size (the
segmentation's π_f mapped back through the crop/resize it recorded, baselines on the full photo). An
output of `segment --refine grabcut` is scored by its refined masks, with π_f's own mask beside them
as "<name>, π_f's mask before GrabCut".

At any corpus size, on Ray: the ground truth is cut into units (a few hundred images of one part),
and one Ray Data task per unit (pipelines.lib.scoring) reads its images and masks, the rows of
every prediction that hold the same sample ids (only the parts whose id range meets the unit's) and
scores every method there;
only per-image scores travel to the driver, which streams them into `per_image.parquet` and keeps
running sums, histograms and the worst cases, so its memory does not grow with the corpus. GrabCut
runs on every image up to `--baseline-images` (default BASELINE_LIMIT) and on a fixed, seeded
sample of that many beyond; the predictions are then also reported on that sample, beside it, with
the share of images on which each beats it. Writes <out>/report.html (table, IoU histograms,
worst-case gallery with overlays), metrics.json, per_image.parquet (and per_image.csv up to
CSV_LIMIT images), and logs them to an MLflow run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.lib import listing, locations, report, tracking
from pipelines.lib.evaluation_output import format_subject_sizes, format_table, track
from pipelines.lib.parquet_store import DatasetError, Store, split_range
from pipelines.lib.ray_env import WINDOW_BLOCKS, end_window
from pipelines.lib.scoring import (PROTOCOL_LABEL, Totals, corpus_thresholds, load_prediction, masks_of, score_unit,
                                   table_methods, unit_rows)

BASELINE_LIMIT = 5000        # GrabCut on every image up to this many, on a seeded sample of this many beyond
ROW_GROUP = 16_384           # per_image.parquet's rows per row group (the driver buffers one)
CSV_LIMIT = 100_000          # per_image.csv next to per_image.parquet up to this many images
UNIT = 256                   # ground-truth images per scoring task
WINDOW_UNITS = WINDOW_BLOCKS       # units (one block each) per Ray Data execution: ray_env.WINDOW_BLOCKS


# ---- the driver: units, the stream of scores, the table ---------------------------------------------
def _scores(units: list[dict], job: dict):
    """The per-image score tables of `units`, as they come: WINDOW_UNITS units (one block each) per
    Ray Data execution, so that the driver holds the block stats of one window (ray_env.WINDOW_BLOCKS)."""
    import ray
    for lo in range(0, len(units), WINDOW_UNITS):
        window = units[lo:lo + WINDOW_UNITS]
        ds = ray.data.from_items([{"unit": i} for i in range(len(window))], override_num_blocks=len(window))
        ds = ds.map_batches(score_unit, batch_size=None, batch_format="pyarrow", fn_kwargs={"units": window, "job": job})
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
        del ds
        end_window()


def _units(data: str, split: str | None, masks_dir: str | None, job: dict,
           listing_dir: str | None = None) -> tuple[list[dict], int, str]:
    """(units, candidate images, what the ground truth is). `listing_dir`: where the folders'
    listings are written by the tasks that list them (None: kept in the object store)."""
    if masks_dir is None:
        manifest = Store(data).read_manifest()
        if manifest["counts"].get("with_mask", 0) < manifest["counts"]["ok"]:
            raise DatasetError(f"--data {data}: not every image has a ground-truth mask; nothing to evaluate against")
        lo, hi = split_range(manifest, split)
        job.update(kind="parquet", where=Store(data).location, resolution=manifest["resolution"], first=lo)
        units = [{"lo": a, "hi": min(hi, a + UNIT)} for a in range(lo, hi, UNIT)]
        return units, hi - lo, f"{hi - lo} ground-truth images"
    where = (lambda name: None) if listing_dir is None else (lambda name: locations.join(listing_dir, name))
    photos = listing.list_folder(data, rows=UNIT, folder=where("photos"))
    masks = listing.list_folder(masks_dir, rows=UNIT * 4, folder=where("masks"))
    if not masks.total:
        raise DatasetError(f"--masks {masks_dir}: no mask file")
    job.update(kind="photos", where=data)
    units = [{"lo": p.first, "hi": p.first + p.count, "source": p.source,
              "masks": [m.source for m in masks.overlapping(p.lo, p.hi)]} for p in photos.parts]
    units = [u for u in units if u["masks"]]
    if split:
        a, b = photos.splits.get(split, (0, 0))
        units = [u for u in units if u["lo"] < b and u["hi"] > a]
    return units, photos.total, f"photos with a mask under {masks_dir}, scored at their own size"


def _listing_dir(out: str, local: Path) -> str | None:
    """Where the photo folders' listings can be written for every task to read: under an object
    store `--out`, or under a local one when Ray runs on one node; None (the object store) when a
    local `--out` is not shared by the cluster's nodes."""
    import ray
    from pipelines.lib.ray_env import init_ray
    if locations.is_uri(out):
        return locations.join(out, "_listing")
    init_ray()
    return str(local / "_listing") if sum(1 for n in ray.nodes() if n["Alive"]) == 1 else None


def evaluate(data: str, preds: dict[str, str], out: Path, *, split: str | None = None, grabcut: bool = True,
             margin: float = 0.05, gallery: int = 12, title: str | None = None,
             sections: list[tuple[str, str]] = (), thresholds: tuple[str, ...] = ("0.5",),
             masks_dir: str | None = None, max_pixels: int | None = None, quiet: bool = False,
             baseline_images: int | None = BASELINE_LIMIT, seed: int = 0, listing_dir: str | None = None) -> dict:
    """Score each segmentation output's masks (row `name`, the policy it was segmented with) and,
    from its stored π_f, the same π_f under each policy of `thresholds` (row `name, <policy>`; the
    DRC protocol's ½ is always among them), beside GrabCut and trivial masks on the same images.

    `data` is a Parquet dataset with masks (scored at the model's resolution), or, with
    `masks_dir`, the folder of photos that segment read (scored at each photo's own size against
    the mask files there, keyed like the photos). `baseline_images`: GrabCut on every image up to
    this many, else on a seeded sample of this many (None: every image). `listing_dir`: a folder
    every Ray node can reach where the photo and mask folders' listings are written (the driver
    then holds nothing per file); None keeps them in the object store."""
    import pyarrow.parquet as pq
    import ray
    from pipelines.lib.imaging import MAX_PIXELS
    from pipelines.lib.ray_env import init_ray, set_progress_bars
    t0 = time.perf_counter()
    init_ray()
    set_progress_bars(ray.data.DataContext.get_current(), not quiet)
    loaded = [load_prediction(name, uri) for name, uri in preds.items()]
    if masks_dir is None and any(p["photos"] for p in loaded):
        bad = next(p for p in loaded if p["photos"])
        raise DatasetError(f"--pred {bad['name']}: a segmentation of image files; score it with --data <photos> "
                           f"--masks <masks>")
    if masks_dir is not None:
        bad = next((p for p in loaded if not p["photos"]), None)
        if bad:
            raise DatasetError(f"--pred {bad['name']}: not a segmentation of image files (segment --input <folder>); "
                               f"score it against a Parquet dataset with --data")
    extra = list(dict.fromkeys(["0.5", *thresholds]))
    methods = table_methods(loaded, extra)
    job = {"preds": [{k: p[k] for k in ("name", "where", "parts", "refined")} for p in loaded], "methods": methods,
           "split": split,
           "margin": margin, "grabcut": grabcut, "max_pixels": max_pixels or MAX_PIXELS,
           "corpus": corpus_thresholds(loaded, extra)}
    units, candidates, truth = _units(data, split, masks_dir, job, listing_dir)
    if not units:
        raise DatasetError("no image is covered by the ground truth (check --split and --masks)")
    limit = candidates if baseline_images is None else baseline_images
    job["sample"] = (None if limit >= candidates else
                     np.sort(np.random.default_rng(seed).choice(candidates, limit, replace=False)))
    names = [m["name"] for m in methods if m["kind"] != "grabcut" or grabcut]
    totals = Totals(names, methods[0]["name"] if loaded else names[0], gallery)
    out.mkdir(parents=True, exist_ok=True)
    writer, pending, pending_rows, last = None, [], 0, time.perf_counter()

    def flush() -> None:                 # row groups of ROW_GROUP rows: a writer keeps metadata per group
        nonlocal writer, pending, pending_rows
        if pending:
            t = pa.concat_tables(pending)
            writer = writer or pq.ParquetWriter(out / "per_image.parquet", t.schema)
            writer.write_table(t, row_group_size=ROW_GROUP)
            pending, pending_rows = [], 0
    for t in _scores(units, job):
        pending.append(t)
        pending_rows += t.num_rows
        if pending_rows >= ROW_GROUP:
            flush()
        totals.add(t)
        if not quiet and time.perf_counter() - last > 30:
            last = time.perf_counter()
            print(f"evaluate: {totals.seen} images scored, {totals.seen / (last - t0):.1f}/s", flush=True)
    flush()
    if writer:
        writer.close()
    if not totals.covered:
        raise DatasetError("no image is covered by every prediction and the ground truth (check --split)")
    from drc_core.metrics import DISC_AREAS
    discs = [f"centred disc {f:.0%}" for f in DISC_AREAS]
    best = max(discs, key=lambda m: totals.mean(m, None)[1])
    best_label = best.replace("centred disc ", "centred disc (best area ") + ")"
    shown = [m for m in names if m not in discs] + [best]
    present = sorted({k[1] for k in totals.sums})
    table = []
    for m in shown:
        label = best_label if m == best else m
        for s in present + (["all"] if len(present) > 1 else []):
            n, iou, dice = totals.mean(m, None if s == "all" else s)
            if n:
                table.append({"method": label, "split": s, "images": n, "iou": 100 * iou, "dice": 100 * dice})
    sampled = job["sample"] is not None and grabcut
    if sampled:                                 # the predictions beside GrabCut on the very images it ran on
        for m in [m["name"] for m in methods if "pred" in m]:
            n, iou, dice = totals.mean(m, None, "sample")
            table.append({"method": f"{m} (GrabCut's sample)", "split": "all", "images": n, "iou": 100 * iou,
                          "dice": 100 * dice})
    wins = {m: {"wins": w, "images": n, "share": w / n if n else None}
            for m, (w, n) in totals.wins.items() if m in {x["name"] for x in methods if "pred" in x} and n}
    coverage = {"ground truth": truth, "evaluated (covered by every method)": totals.covered,
                **{f"{p['name']}: predicted": p["predicted"] for p in loaded},
                "GrabCut": ("off" if not grabcut else "every evaluated image" if not sampled else
                            f"a seeded sample of {limit} of {candidates} images (seed {seed})")}
    plotted = [m for m in shown if m == "GrabCut" or any(x["name"] == m and "pred" in x for x in methods)] or shown[:1]
    report.histogram_counts({m: totals.hist[m] for m in plotted}, out / "iou_hist.png",
                            {m: 100 * totals.mean(m, None)[1] for m in plotted})
    tiles = _gallery(units, job, sorted(totals.worst, reverse=True), methods[0] if loaded else None)
    n_rows = totals.seen
    if n_rows <= CSV_LIMIT and (out / "per_image.parquet").exists():      # batch by batch: flat memory
        keep = ["sample_id", "key", "split"] + [f"iou[{m}]" for m in shown]
        with open(out / "per_image.csv", "w", newline="") as f:
            for i, batch in enumerate(pq.ParquetFile(out / "per_image.parquet").iter_batches(
                    batch_size=4096, columns=[*keep, "covered"])):
                frame = batch.to_pandas()
                frame = frame[frame["covered"]][keep].rename(columns={f"iou[{best}]": f"iou[{best} (best area)]"})
                frame[[c for c in frame.columns if c.startswith("iou[")]] *= 100
                frame.to_csv(f, index=False, header=i == 0)
    notes = [f"{p['name']}: {p['manifest'].get('mode', '?')} mode, {p['manifest'].get('steps', 0)} steps, model "
             f"{p['manifest'].get('model')}, masks by threshold policy {p['manifest'].get('threshold_policy', '0.5')}"
             for p in loaded]
    notes.append(f"'{PROTOCOL_LABEL}': the same π_f thresholded at ½ as in the DRC paper; no threshold policy "
                 f"looks at the ground truth")
    notes.append(f"GrabCut box: the image minus {margin:.0%} on each side, 5 iterations")
    for m, w in wins.items():
        notes.append(f"{m} beats GrabCut on {w['wins']} of {w['images']} images ({100 * w['share']:.0f} %)")
    sizes = totals.subject_sizes(shown if grabcut else [], {best: best_label})
    for r in sizes:
        if r["images"]:
            notes.append(f"subject {r['subset']} of the photo, {r['images']} images: " + ", ".join(
                f"{m} {v['iou']:.1f}" for m, v in r["methods"].items()))
    notes.append("scored at each photo's own size (π_f mapped back through segment's crop/resize)" if masks_dir
                 else "scored at the model's resolution")
    report.write_report(out / "report.html", title=title or f"Segmentation evaluation: {data}", table=table,
                        coverage=coverage, hist_png=out / "iou_hist.png", gallery=tiles, notes=notes, sections=sections)
    result = {"data": data, "preds": preds, "table": table, "coverage": coverage, "wins_vs_grabcut": wins,
              "by_subject_size": sizes,
              "baseline": {"grabcut": bool(grabcut), "images": int(totals.mean("GrabCut", None)[0]) if grabcut else 0,
                           "sampled": sampled, "seed": seed},
              "seconds": time.perf_counter() - t0, "images_per_s": totals.seen / (time.perf_counter() - t0),
              "nodes": dict(sorted(totals.nodes.items())),
              "scored_at": "original size" if masks_dir else "model resolution", "report": str(out / "report.html"),
              "per_image": str(out / "per_image.parquet")}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _gallery(units: list[dict], job: dict, worst: list[tuple[float, int, str]], method: dict | None) -> list[dict]:
    """Tiles (image | truth | prediction) of the worst images of the first method, read again by id."""
    if method is None or not worst:
        return []
    wanted = {sid for _, sid, _ in worst}
    found = {}
    for unit in units:
        if any(unit["lo"] <= sid < unit["hi"] for sid in wanted):
            for sid, pos, key, split, image, truth, rows in unit_rows(unit, job, wanted):
                found[sid] = (key, image, truth, masks_of(method, rows[method["pred"]], truth, job))
    tiles = []
    for neg, sid, key in worst:
        if sid in found:
            key, image, truth, pred = found[sid]
            tiles.append({"key": key, "iou": -100 * neg, "png": report.png_b64(report.tile(image, truth, pred))})
    return tiles


def _pred(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"--pred must be NAME=PATH, got {text!r}")
    return name, uri


def _baseline(text: str) -> int | None:
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"--baseline-images must be a count or 'all', got {text!r}")
    return n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="Parquet dataset with ground-truth masks, or with --masks the photo folder segment read")
    p.add_argument("--masks", default=None, metavar="DIR",
                   help="score at each photo's own size against the mask files in DIR (keyed like the photos "
                        "in --data, any image format; foreground > 127)")
    p.add_argument("--pred", type=_pred, action="append", default=[], metavar="NAME=PATH",
                   help="a pipelines.segment output (repeatable)")
    p.add_argument("--split", default=None, choices=("train", "val", "test"))
    p.add_argument("--out", "--output", dest="out", required=True,
                   help="folder (or URI) for report.html, metrics.json, per_image.parquet (and .csv)")
    p.add_argument("--threshold", action="append", default=[], metavar="POLICY",
                   help="also score the stored π_f under this policy (repeatable; 0.5, a number, otsu, "
                        "otsu-corpus, gmm, gmm-corpus); the ½ protocol is always scored")
    p.add_argument("--no-grabcut", action="store_true")
    p.add_argument("--baseline-images", type=_baseline, default=BASELINE_LIMIT, metavar="N|all",
                   help=f"GrabCut on every image up to N, on a seeded sample of N beyond (default {BASELINE_LIMIT}; "
                        f"'all': every image)")
    p.add_argument("--seed", type=int, default=0, help="seed of GrabCut's sample")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--grabcut-margin", type=float, default=0.05)
    p.add_argument("--gallery", type=int, default=12, help="worst cases shown")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=tracking.default_experiment(),
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or %(default)s)")
    p.add_argument("--address", default=None, help="Ray address (default: local, or the job's cluster)")
    args = p.parse_args(argv)
    from pipelines.lib.ray_env import ScratchPathError, check_job_outputs
    try:
        check_job_outputs("evaluate", {"--out": args.out, "--tracking-uri": tracking.configured_uri(args.tracking_uri)})
    except ScratchPathError as exc:
        sys.exit(str(exc))
    preds = dict(args.pred)
    if len(preds) != len(args.pred):
        sys.exit("evaluate: two --pred share a name")
    from drc_core.threshold import PolicyError, ThresholdPolicy
    try:
        thresholds = tuple(ThresholdPolicy.parse(t).name for t in args.threshold)
    except PolicyError as exc:
        sys.exit(f"evaluate: --threshold: {exc}")
    if args.address:
        from pipelines.lib.ray_env import init_ray
        init_ray(args.address)
    failed = None
    import tempfile
    remote = locations.is_uri(args.out)          # an object store: written locally, then copied there
    local = Path(tempfile.mkdtemp(prefix="drc-evaluate-")) if remote else Path(args.out)
    listing_dir = None
    try:
        listing_dir = _listing_dir(args.out, local) if args.masks else None
        try:
            result = evaluate(args.data, preds, local, split=args.split, grabcut=not args.no_grabcut,
                              margin=args.grabcut_margin, gallery=args.gallery, thresholds=thresholds,
                              masks_dir=args.masks, quiet=args.quiet, baseline_images=args.baseline_images,
                              seed=args.seed, listing_dir=listing_dir)
        finally:                                  # only the listing's files: the results stay, a failure too
            if listing_dir is not None:
                locations.delete(listing_dir)
        if remote:
            import pyarrow.fs as pafs
            fs, path = locations.resolve(args.out)
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            result.update(report=locations.join(args.out, "report.html"),
                          per_image=locations.join(args.out, "per_image.parquet"))
    except DatasetError as exc:
        failed = f"evaluate: {exc}"
    except Exception as exc:
        from pipelines.lib.errors import find_cause
        clear = find_cause(exc, (DatasetError, OSError))
        if clear is None:
            raise
        failed = f"evaluate: {clear}"
    if failed:
        if remote:
            import shutil
            shutil.rmtree(local, ignore_errors=True)
        sys.exit(failed)
    result["mlflow_run_id"] = track(result, local, tracking.tracking_uri(args.tracking_uri), args.experiment,
                                    {"data": args.data, "split": args.split})
    if remote:
        import shutil
        shutil.rmtree(local, ignore_errors=True)
    print(format_table(result["table"]))
    for m, w in result["wins_vs_grabcut"].items():
        print(f"{m} beats GrabCut on {100 * w['share']:.0f} % of {w['images']} images")
    sizes = format_subject_sizes(result["by_subject_size"])
    if sizes:
        print(sizes)
    print(f"report: {result['report']}  (MLflow run {result['mlflow_run_id']})")
    return result


if __name__ == "__main__":
    main()
