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
as "<name>, π_f's mask before GrabCut". Writes
<out>/report.html (table, IoU histograms, worst-case gallery with overlays), metrics.json and
per_image.csv, and logs them to an MLflow run.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.lib import report, tracking
from pipelines.lib.grabcut import grabcut_all
from pipelines.lib.parquet_store import DatasetError, Store, load_arrays, read_part


def read_predictions(uri: str) -> dict:
    """A segmentation output → {"manifest", "sample_id" (N,), "masks" (N, H, W) bool, "prob" (N, H, W)
    float32 π_f, "key", "geometry" (per row: the photo's (height, width, region, threshold) for image
    files, None for Parquet rows), "refined" (segment --refine grabcut: per row the uint8 mask GrabCut
    re-drew, at the photo's size; None without); prob/key/geometry None for outputs written before π_f
    was stored}."""
    from PIL import Image
    store = Store(uri)
    manifest = store.read_manifest()
    if manifest.get("kind") != "segmentation":
        raise DatasetError(f"{uri} is not a pipelines.segment output (manifest kind {manifest.get('kind')!r})")
    has_prob = "prob_encoding" in manifest
    refined = bool(manifest.get("refine"))
    cols = ["sample_id", "mask"] + (["prob", "key", "threshold", "height", "width", "region"] if has_prob else []) \
        + (["refined"] if refined else [])
    tables = [read_part(store, name, cols) for name in manifest["file_names"]]
    ids = np.concatenate([t["sample_id"].to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    size = manifest["resolution"]
    order = np.argsort(ids, kind="stable")

    def stack(column, convert, dtype):
        arrs = [convert(np.asarray(Image.open(io.BytesIO(b)))) for t in tables for b in t[column].to_pylist()]
        return (np.stack(arrs) if arrs else np.zeros((0, size, size), dtype))[order]
    def column(name):                      # in sample_id order
        values = [v for t in tables for v in t[name].to_pylist()]
        return [values[i] for i in order]
    out = {"manifest": manifest, "sample_id": ids[order], "masks": stack("mask", lambda a: a > 127, bool),
           "prob": None, "key": None, "geometry": None, "refined": None}
    if refined:                            # uint8 0/255 (NOT_SEGMENTED outside a centre crop), each at its size
        out["refined"] = [np.asarray(Image.open(io.BytesIO(b))) for b in column("refined")]
    if has_prob:
        out.update(prob=stack("prob", lambda a: a.astype(np.float32) / 255.0, np.float32), key=column("key"),
                   # image-file rows: (height, width, region, threshold) of the photo; None for Parquet rows
                   geometry=[None if r is None else (h, w, tuple(r), t) for h, w, r, t in
                             zip(column("height"), column("width"), column("region"), column("threshold"))])
    return out


PROTOCOL_LABEL = "π_f > ½, DRC protocol"
BEFORE_REFINE = "π_f's mask before GrabCut"         # the row of a refined output's unrefined mask


def policy_label(name: str) -> str:
    from drc_core.threshold import ThresholdPolicy
    return PROTOCOL_LABEL if ThresholdPolicy.parse(name).is_protocol else f"threshold {name}"


def _policy_masks(p: dict, extra: list[str], masks_of) -> dict[str, object]:
    """`masks_of(policy)` for each policy of `extra` other than the one the output was written
    with (none for outputs without stored π_f): {"<policy label>": masks}."""
    from drc_core.threshold import ThresholdPolicy
    if p["prob"] is None:
        return {}
    written = p["manifest"].get("threshold_policy")
    return {policy_label(policy.name): masks_of(policy)
            for policy in map(ThresholdPolicy.parse, extra) if policy.name != written}


def _methods_of(name: str, p: dict, sel: np.ndarray, own, extra: list[str], masks_of) -> dict[str, object]:
    """Output `name`'s masks on its rows `sel`: the product's (GrabCut's re-drawn mask where segment
    refined, with π_f's own mask `own` beside it; else `own`), then one per extra policy."""
    if p["refined"] is None:
        methods = {name: own}
    else:
        refined = [p["refined"][i] == 255 for i in sel]
        methods = {name: np.stack(refined) if isinstance(own, np.ndarray) else refined,
                   f"{name}, {BEFORE_REFINE}": own}
    methods.update({f"{name}, {label}": m for label, m in _policy_masks(p, extra, masks_of).items()})
    return methods


def _model_size_inputs(data: str, split: str | None, loaded: dict, extra: list[str]) -> dict:
    """Ground truth from a Parquet dataset; every method's masks at the model's resolution."""
    gt = load_arrays(data, split)
    if "masks" not in gt:
        raise DatasetError(f"--data {data}: not every image has a ground-truth mask; nothing to evaluate against")
    common = gt["sample_id"]
    for name, p in loaded.items():
        if p["masks"].shape[1:] != gt["images"].shape[1:3]:
            raise DatasetError(f"--pred {name}: masks are {p['masks'].shape[1:]}, the data {gt['images'].shape[1:3]}")
        common = np.intersect1d(common, p["sample_id"])
    if common.size == 0:
        raise DatasetError("no image is covered by every prediction and the ground truth (check --split)")
    rows = np.searchsorted(gt["sample_id"], common)
    methods = {}
    for name, p in loaded.items():
        sel = np.searchsorted(p["sample_id"], common)
        methods.update(_methods_of(name, p, sel, p["masks"][sel], extra,
                                   lambda policy: policy.masks(p["prob"][sel]).numpy()))
    return {"ids": common, "images": gt["images"][rows], "masks": gt["masks"][rows] > 0, "splits": gt["split"][rows],
            "keys": gt["key"][rows], "methods": methods, "truth": f"{int(gt['sample_id'].size)} ground-truth images"}


def _full_size_inputs(photos: str, masks_dir: str, loaded: dict, extra: list[str], max_pixels: int) -> dict:
    """Ground truth from the original mask files; π_f mapped back onto each photo (the crop/resize
    segment recorded), thresholded per image as at model resolution. Pixels a centre crop left
    unsegmented count as background."""
    from pipelines.lib import sources
    from pipelines.lib.imaging import BadInput, decode_image, full_size_mask, read_photo
    from pipelines.lib.locations import read_bytes
    records = {r["key"]: r for r in sources.folder(photos, masks_dir) if r.get("mask_path")}
    if not records:
        raise DatasetError(f"--masks {masks_dir}: no mask file matches an image under --photos {photos}")
    common = sorted(records)
    for name, p in loaded.items():
        if p["geometry"] is None or not any(g is not None for g in p["geometry"]):
            raise DatasetError(f"--pred {name}: not a segmentation of image files (segment --input <folder>); "
                               f"score it against a Parquet dataset with --data")
        have = set(p["key"])
        common = [k for k in common if k in have]
    if not common:
        raise DatasetError(f"no photo under {photos} with a mask under {masks_dir} is covered by every prediction")
    images, masks = [], []
    for k in common:
        try:
            images.append(read_photo(records[k]["path"], max_pixels))
            masks.append(decode_image(read_bytes(records[k]["mask_path"]), "mask", max_pixels).max(-1) > 127)
        except (BadInput, OSError) as exc:
            raise DatasetError(f"--photos/--masks: {k}: {exc}") from None
        if masks[-1].shape != images[-1].shape[:2]:
            raise DatasetError(f"--masks {masks_dir}: {k}: mask {masks[-1].shape} is not the photo's size "
                               f"{images[-1].shape[:2]}")
    methods = {}
    for name, p in loaded.items():
        row_of = {k: i for i, k in enumerate(p["key"])}
        sel = np.array([row_of[k] for k in common])
        geo = [p["geometry"][i] for i in sel]
        if any(g is None for g in geo):
            raise DatasetError(f"--pred {name}: some rows have no photo geometry")

        def at_size(thresholds, sel=sel, geo=geo, prob=p["prob"]):  # as segment writes it; unsegmented = bg
            return [full_size_mask(prob[i], t, g[2], g[0], g[1]) == 255 for i, g, t in zip(sel, geo, thresholds)]
        methods.update(_methods_of(name, p, sel, at_size([g[3] for g in geo]), extra,
                                   lambda policy: at_size(policy.thresholds(p["prob"][sel]).numpy())))
    return {"ids": np.arange(len(common)), "images": images, "masks": masks,
            "splits": np.array([records[k]["split"] for k in common]), "keys": np.array(common),
            "methods": methods, "truth": f"{len(records)} photos with a mask, scored at their own size"}


def _score(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    """Per-image IoU and Dice of stacked (N, H, W) masks, or of lists of masks of any sizes."""
    from drc_core.metrics import iou_dice
    if isinstance(pred, list) or isinstance(truth, list):
        pairs = [iou_dice(p, t) for p, t in zip(pred, truth)]
        return np.array([float(i) for i, _ in pairs]), np.array([float(d) for _, d in pairs])
    return tuple(t.numpy() for t in iou_dice(pred, truth))


def evaluate(data: str, preds: dict[str, str], out: Path, *, split: str | None = None, grabcut: bool = True,
             margin: float = 0.05, gallery: int = 12, title: str | None = None,
             sections: list[tuple[str, str]] = (), thresholds: tuple[str, ...] = ("0.5",),
             masks_dir: str | None = None, max_pixels: int | None = None, quiet: bool = False) -> dict:
    """Score each segmentation output's masks (row `name`, the policy it was segmented with) and,
    from its stored π_f, the same π_f under each policy of `thresholds` (row `name, <policy>`; the
    DRC protocol's ½ is always among them), beside GrabCut and trivial masks on the same images.

    `data` is a Parquet dataset with masks (scored at the model's resolution), or, with
    `masks_dir`, the folder of photos that segment read (scored at each photo's own size against
    the mask files there, keyed like the photos)."""
    from drc_core.metrics import DISC_AREAS, centre_ellipse
    from pipelines.lib.imaging import MAX_PIXELS
    loaded = {name: read_predictions(uri) for name, uri in preds.items()}
    extra = list(dict.fromkeys(["0.5", *thresholds]))
    got = (_model_size_inputs(data, split, loaded, extra) if masks_dir is None
           else _full_size_inputs(data, masks_dir, loaded, extra, max_pixels or MAX_PIXELS))
    images, masks, splits, keys, methods = got["images"], got["masks"], got["splits"], got["keys"], got["methods"]
    coverage = {"ground truth": got["truth"], "evaluated (covered by every method)": len(keys)}
    coverage.update({f"{name}: predicted": int(p["sample_id"].size) for name, p in loaded.items()})
    shapes = [m.shape for m in masks]
    seconds = {}
    if grabcut:
        t0 = time.perf_counter()
        methods["GrabCut"] = grabcut_all(images, margin, quiet=quiet)
        seconds["grabcut_images_per_s"] = len(images) / (time.perf_counter() - t0)
    methods["all foreground"] = [np.ones(s, bool) for s in shapes]

    def discs(f):
        return [centre_ellipse(*s, f).numpy() for s in shapes]
    disc = max(DISC_AREAS, key=lambda f: _score(discs(f), masks)[0].mean())
    methods[f"centred disc (best area {disc:.0%})"] = discs(disc)
    per_image, table = {}, []
    for name, pred in methods.items():
        iou, dice = _score(pred, masks)
        per_image[name] = iou
        present = sorted(set(splits.tolist()))
        for s in present + (["all"] if len(present) > 1 else []):
            sel = np.ones(len(iou), bool) if s == "all" else splits == s
            table.append({"method": name, "split": s, "images": int(sel.sum()),
                          "iou": 100 * float(iou[sel].mean()), "dice": 100 * float(dice[sel].mean())})
    out.mkdir(parents=True, exist_ok=True)
    report.histogram({k: v for k, v in per_image.items() if k in loaded or k == "GrabCut"} or per_image,
                     out / "iou_hist.png")
    first = next(iter(loaded), next(iter(methods)))
    worst = np.argsort(per_image[first], kind="stable")[:gallery]
    tiles = [{"key": keys[i], "iou": 100 * float(per_image[first][i]),
              "png": report.png_b64(report.tile(images[i], masks[i], methods[first][i],
                                                max(1, 96 // images[i].shape[0])))}
             for i in worst]
    import pandas as pd
    frame = pd.DataFrame({"sample_id": got["ids"], "key": keys, "split": splits,
                          **{f"iou[{k}]": 100 * v for k, v in per_image.items()}})
    frame.to_csv(out / "per_image.csv", index=False)
    notes = [f"{k}: {v.get('mode', '?')} mode, {v.get('steps', 0)} steps, model {v.get('model')}, masks by "
             f"threshold policy {v.get('threshold_policy', '0.5')}"
             for k, v in ((n, p["manifest"]) for n, p in loaded.items())]
    notes.append(f"'{PROTOCOL_LABEL}': the same π_f thresholded at ½ as in the DRC paper; no threshold policy "
                 f"looks at the ground truth")
    notes.append(f"GrabCut box: the image minus {margin:.0%} on each side, 5 iterations")
    notes.append("scored at each photo's own size (π_f mapped back through segment's crop/resize)" if masks_dir
                 else "scored at the model's resolution")
    report.write_report(out / "report.html", title=title or f"Segmentation evaluation: {data}", table=table,
                        coverage=coverage, hist_png=out / "iou_hist.png", gallery=tiles, notes=notes, sections=sections)
    result = {"data": data, "preds": preds, "table": table, "coverage": coverage, **seconds,
              "scored_at": "original size" if masks_dir else "model resolution", "report": str(out / "report.html")}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def metric_name(method: str, split: str, metric: str) -> str:
    """An MLflow metric name for a table cell (MLflow allows letters, digits, _ - . / : and spaces):
    `GrabCut.test.iou`, `langevin_threshold_0.5_DRC_protocol.test.iou`, `centred_disc_best_area_40pct…`."""
    m = method.replace(PROTOCOL_LABEL, "threshold 0.5 DRC protocol").replace("%", "pct").replace("−", "-")
    m = re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_.\-]", "_", m)).strip("_")
    return f"{m}.{split}.{metric}"


def track(result: dict, out: Path, uri: str, experiment: str, params: dict) -> str:
    """One MLflow run: <method>.<split>.iou/dice metrics and the report folder as artifacts."""
    run_id = tracking.start_run(uri, f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}",
                                {**params, **{f"pred.{k}": v for k, v in result["preds"].items()}},
                                experiment=experiment, tags={"drc.stage": "evaluate"})
    tracking.log_metrics(uri, run_id, {metric_name(r["method"], r["split"], m): r[m]
                                       for r in result["table"] for m in ("iou", "dice")}, 0)
    tracking.client(uri).log_artifacts(run_id, str(out), "evaluation")
    tracking.end_run(uri, run_id)
    return run_id


def format_table(table: list[dict]) -> str:
    w = max([34, *(len(r["method"]) + 2 for r in table)])     # "<name>, π_f's mask before GrabCut" is longer
    lines = [f"{'method':<{w}}{'split':<8}{'images':>8}{'IoU':>8}{'Dice':>8}"]
    lines += [f"{r['method']:<{w}}{r['split']:<8}{r['images']:>8}{r['iou']:>8.1f}{r['dice']:>8.1f}" for r in table]
    return "\n".join(lines)


def _pred(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"--pred must be NAME=PATH, got {text!r}")
    return name, uri


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
    p.add_argument("--out", "--output", dest="out", required=True, help="folder for report.html, metrics.json, per_image.csv")
    p.add_argument("--threshold", action="append", default=[], metavar="POLICY",
                   help="also score the stored π_f under this policy (repeatable; 0.5, a number, otsu, "
                        "otsu-corpus, gmm, gmm-corpus); the ½ protocol is always scored")
    p.add_argument("--no-grabcut", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--grabcut-margin", type=float, default=0.05)
    p.add_argument("--gallery", type=int, default=12, help="worst cases shown")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=tracking.default_experiment(),
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or %(default)s)")
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
    try:
        result = evaluate(args.data, preds, Path(args.out), split=args.split, grabcut=not args.no_grabcut,
                          margin=args.grabcut_margin, gallery=args.gallery, thresholds=thresholds,
                          masks_dir=args.masks, quiet=args.quiet)
    except DatasetError as exc:
        sys.exit(f"evaluate: {exc}")
    result["mlflow_run_id"] = track(result, Path(args.out), tracking.tracking_uri(args.tracking_uri), args.experiment,
                                    {"data": args.data, "split": args.split})
    print(format_table(result["table"]))
    print(f"report: {result['report']}  (MLflow run {result['mlflow_run_id']})")
    return result


if __name__ == "__main__":
    main()
