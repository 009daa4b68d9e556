"""What a scoring task does and what the driver keeps of it (pipelines.evaluate runs them on Ray).

The table's methods (each prediction's product and π_f under other threshold policies, GrabCut,
all-foreground, centred discs); one unit of ground truth read where it lies with the rows of every
prediction that hold its sample ids, every method scored per image (score_unit); and Totals, the
fixed-size sums, histograms, worst cases and wins against GrabCut that the driver keeps of the stream.
"""
from __future__ import annotations

import heapq
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.lib import listing, locations
from pipelines.lib.parquet_store import DatasetError, Store, read_part, read_range

PROTOCOL_LABEL = "π_f > ½, DRC protocol"
BEFORE_REFINE = "π_f's mask before GrabCut"         # the row of a refined output's unrefined mask
HIST_BINS = 20
# subsets by the true subject's share of the photo (metrics.json "by_subject_size"; the bounds of
# the photo-quality acceptance: small < 10 %, large > 40 %)
SUBJECT_SIZES = (("small (< 10 %)", 0.0, 0.10), ("medium (10–40 %)", 0.10, 0.40), ("large (> 40 %)", 0.40, 1.01))


def policy_label(name: str) -> str:
    from drc_core.threshold import ThresholdPolicy
    return PROTOCOL_LABEL if ThresholdPolicy.parse(name).is_protocol else f"threshold {name}"


# ---- what is scored ---------------------------------------------------------------------------------
def load_prediction(name: str, uri: str) -> dict:
    """A segmentation output's manifest facts: where it is, its parts with id ranges, whether it
    was refined and stored π_f, the policy its masks were made with."""
    store = Store(uri)
    manifest = store.read_manifest()
    if manifest.get("kind") != "segmentation":
        raise DatasetError(f"{uri} is not a pipelines.segment output (manifest kind {manifest.get('kind')!r})")
    return {"name": name, "where": store.location, "manifest": manifest,
            "parts": [p for p in manifest["parts"] if p["ok"]], "refined": bool(manifest.get("refine")),
            "written": manifest.get("threshold_policy"), "photos": manifest["source"]["kind"] == "folder",
            "predicted": manifest["counts"]["ok"]}


def table_methods(preds: list[dict], extra: list[str]) -> list[dict]:
    """The rows of the table, in order: per prediction its product (GrabCut's re-drawn mask where
    segment refined), π_f's own mask beside a refined product, and π_f under each extra policy;
    then the baselines."""
    from drc_core.metrics import DISC_AREAS
    out = []
    for i, p in enumerate(preds):
        out.append({"name": p["name"], "pred": i, "kind": "refined" if p["refined"] else "own"})
        if p["refined"]:
            out.append({"name": f"{p['name']}, {BEFORE_REFINE}", "pred": i, "kind": "own"})
        for policy in extra:
            if policy != p["written"]:
                out.append({"name": f"{p['name']}, {policy_label(policy)}", "pred": i, "kind": "policy",
                            "policy": policy})
    out.append({"name": "GrabCut", "kind": "grabcut"})
    out.append({"name": "all foreground", "kind": "all"})
    out += [{"name": f"centred disc {f:.0%}", "kind": "disc", "area": f} for f in DISC_AREAS]
    return out


def corpus_thresholds(preds: list[dict], extra: list[str]) -> dict:
    """{(prediction, policy): threshold} for the corpus-wide policies among `extra`: one histogram of
    π_f over every image a prediction segmented, summed by one task per output part."""
    import ray
    from drc_core.threshold import ThresholdPolicy
    corpus = [ThresholdPolicy.parse(e) for e in extra if ThresholdPolicy.parse(e).corpus]
    if not corpus:
        return {}
    hist = ray.remote(num_cpus=0.5)(_prob_histogram)
    out = {}
    for i, p in enumerate(preds):
        total = sum(ray.get([hist.remote(p["where"], part["name"]) for part in p["parts"]]))
        for policy in corpus:
            out[(i, policy.name)] = float(policy.corpus_threshold(total))
    return out


def _prob_histogram(where: str, name: str) -> np.ndarray:
    """The summed π_f histogram of one output part's segmented rows."""
    from drc_core.threshold import BINS, histogram
    t = read_part(Store(where), name, ["status", "prob"])
    total = np.zeros(BINS)
    for b in t.filter(pc.equal(t["status"], "ok"))["prob"].to_pylist():
        total += histogram(png(b)[None].astype(np.float32) / 255.0).numpy()[0]
    return total


def png(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


# ---- one unit: read where the data is, score every method ------------------------------------------
PRED_COLUMNS = ["sample_id", "key", "status", "mask", "prob", "threshold", "height", "width", "region", "refined"]


def _pred_rows(pred: dict, lo: int, hi: int) -> dict[int, dict]:
    """A prediction's segmented rows with sample ids in [lo, hi), by id: only the parts whose id range
    meets it are read."""
    store = Store(pred["where"])
    cols = [c for c in PRED_COLUMNS if c != "refined" or pred["refined"]]
    rows = {}
    for part in pred["parts"]:
        if part["id_max"] < lo or part["id_min"] >= hi:
            continue
        t = read_part(store, part["name"], cols, [("sample_id", ">=", lo), ("sample_id", "<", hi)])
        for r in t.filter(pc.equal(t["status"], "ok")).to_pylist():
            rows[r["sample_id"]] = r
    return rows


def _ground_truth(unit: dict, job: dict, ids: set | None = None):
    """The unit's images with masks: (sample_id, position, key, split, image, truth) per image, in id
    order; `position` is the image's place among the evaluated ones (GrabCut's seed)."""
    if job["kind"] == "parquet":
        t = read_range(job["where"], unit["lo"], unit["hi"], ["sample_id", "key", "split", "image", "mask"])
        size = job["resolution"]
        for r in t.to_pylist():
            if ids is not None and r["sample_id"] not in ids:
                continue
            if r["mask"] is None:
                raise DatasetError(f"--data {job['where']}: sample {r['sample_id']} ({r['key']}) has no mask")
            image = np.frombuffer(r["image"], np.uint8).reshape(size, size, 3)
            truth = np.frombuffer(r["mask"], np.uint8).reshape(size, size) > 0
            yield r["sample_id"], r["sample_id"] - job["first"], r["key"], r["split"], image, truth
        return
    from pipelines.lib.imaging import BadInput, decode_image, read_photo
    masks = {}
    for m in map(listing.table, unit["masks"]):
        masks.update(zip(m["key"].to_pylist(), m["path"].to_pylist()))
    for r in listing.table(unit["source"]).to_pylist():
        if r["key"] not in masks or (ids is not None and r["index"] not in ids) or \
                (job["split"] is not None and r["split"] != job["split"]):
            continue
        try:
            image = read_photo(r["path"], job["max_pixels"])
            truth = decode_image(locations.read_bytes(masks[r["key"]]), "mask", job["max_pixels"]).max(-1) > 127
        except (BadInput, OSError) as exc:
            raise DatasetError(f"--data/--masks: {r['key']}: {exc}") from None
        if truth.shape != image.shape[:2]:
            raise DatasetError(f"--masks: {r['key']}: mask {truth.shape} is not the photo's size {image.shape[:2]}")
        yield r["index"], r["index"], r["key"], r["split"], image, truth


def masks_of(method: dict, row: dict | None, truth: np.ndarray, job: dict) -> np.ndarray | None:
    """One method's bool mask of one image at the ground truth's size (None: not scored here)."""
    from drc_core.metrics import centre_ellipse_array
    from drc_core.threshold import ThresholdPolicy
    from pipelines.lib.imaging import full_size_mask
    kind = method["kind"]
    if kind == "all":
        return np.ones_like(truth)
    if kind == "disc":
        return centre_ellipse_array(*truth.shape, method["area"])
    if kind == "refined":
        return png(row["refined"]) == 255
    at_size = job["kind"] == "photos"
    if kind == "own":
        if not at_size:
            return png(row["mask"]) > 127
        th = row["threshold"]
    else:                                        # another threshold policy, applied to the stored π_f
        prob = png(row["prob"]).astype(np.float32) / 255.0
        corpus = job["corpus"].get((method["pred"], method["policy"]))
        th = corpus if corpus is not None else float(ThresholdPolicy.parse(method["policy"]).thresholds(prob[None])[0])
        if not at_size:
            return prob > th
    h, w = truth.shape
    return full_size_mask(png(row["prob"]).astype(np.float32) / 255.0, th, tuple(row["region"]), h, w) == 255


def iou_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter, union = np.count_nonzero(pred & truth), np.count_nonzero(pred | truth)
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    return (inter / union if union else 1.0), (2 * inter / total if total else 1.0)


def unit_rows(unit: dict, job: dict, ids: set | None = None):
    """Per image of the unit: (ground truth facts, the predictions' rows or None where one has none)."""
    lo, hi = unit["lo"], unit["hi"]
    preds = [_pred_rows(p, lo, hi) for p in job["preds"]]
    for sid, pos, key, split, image, truth in _ground_truth(unit, job, ids):
        rows = [p.get(sid) for p in preds]
        for p, row in zip(job["preds"], rows):
            if row is not None and job["kind"] == "photos" and row["key"] != key:
                raise DatasetError(f"--pred {p['name']}: sample {sid} is {row['key']!r} there but {key!r} in "
                                   f"--data: it was segmented from another listing of the folder")
        yield sid, pos, key, split, image, truth, rows


def score_unit(batch: pa.Table, units: list[dict], job: dict) -> pa.Table:
    """Ray Data map: the per-image scores of the unit in `batch` (one row: its index)."""
    import ray
    from pipelines.lib.grabcut import grabcut_masks
    node = ray.get_runtime_context().get_node_id()
    out = {"sample_id": [], "key": [], "split": [], "covered": [], "baseline": [], "node": [], "truth_area": []}
    scores = {m["name"]: ([], []) for m in job["methods"]}
    sample = job["sample"]
    for u in batch["unit"].to_pylist():
        for sid, pos, key, split, image, truth, rows in unit_rows(units[u], job):
            covered = all(r is not None for r in rows)
            in_sample = covered and job["grabcut"] and (sample is None or member(sample, pos))
            out["sample_id"].append(sid)
            out["key"].append(key)
            out["split"].append(split)
            out["covered"].append(covered)
            out["baseline"].append(in_sample)
            out["node"].append(node)
            out["truth_area"].append(float(np.count_nonzero(truth)) / truth.size)
            for m in job["methods"]:
                mask = None
                if covered and m["kind"] == "grabcut":
                    mask = grabcut_masks(image[None], job["margin"], start=pos)[0] if in_sample else None
                elif covered:
                    mask = masks_of(m, rows[m["pred"]] if "pred" in m else None, truth, job)
                iou, dice = iou_dice(mask, truth) if mask is not None else (np.nan, np.nan)
                scores[m["name"]][0].append(iou)
                scores[m["name"]][1].append(dice)
    cols = {**out, "truth_area": pa.array(out["truth_area"], pa.float32()),
            **{f"iou[{k}]": pa.array(v[0], pa.float32()) for k, v in scores.items()},
            **{f"dice[{k}]": pa.array(v[1], pa.float32()) for k, v in scores.items()}}
    return pa.table(cols)


def member(sample: np.ndarray, pos: int) -> bool:
    i = np.searchsorted(sample, pos)
    return bool(i < len(sample) and sample[i] == pos)


class Totals:
    """What the driver keeps of the stream: sums per method and split, IoU histograms, the worst
    images of the first method, wins against GrabCut on its sample; all of fixed size."""

    def __init__(self, methods: list[str], first: str, gallery: int):
        self.methods, self.first, self.k = methods, first, gallery
        self.sums: dict[tuple[str, str, str], list[float]] = {}     # (method, split, scope) → [n, iou, dice]
        self.hist = {m: np.zeros(HIST_BINS, np.int64) for m in methods}
        self.worst: list[tuple[float, int, str]] = []
        self.wins = {m: [0, 0] for m in methods}
        self.by_size = {(m, s[0]): [0, 0.0, 0] for m in methods for s in SUBJECT_SIZES}   # → [n, iou, wins]
        self.covered = self.seen = 0
        self.nodes: dict[str, int] = {}

    def add(self, t: pa.Table) -> None:
        self.seen += t.num_rows
        for n, c in zip(*np.unique(np.asarray(t["node"].to_pylist()), return_counts=True)):
            self.nodes[str(n)] = self.nodes.get(str(n), 0) + int(c)
        covered = t["covered"].to_numpy(zero_copy_only=False)
        self.covered += int(covered.sum())
        baseline = t["baseline"].to_numpy(zero_copy_only=False)
        splits = np.asarray(t["split"].to_pylist())
        grab = t["iou[GrabCut]"].to_numpy(zero_copy_only=False)
        area = t["truth_area"].to_numpy(zero_copy_only=False)
        for m in self.methods:
            iou = t[f"iou[{m}]"].to_numpy(zero_copy_only=False).astype(np.float64)
            dice = t[f"dice[{m}]"].to_numpy(zero_copy_only=False).astype(np.float64)
            ok = covered & ~np.isnan(iou)
            for s in np.unique(splits[ok]):
                for scope, sel in (("all", ok & (splits == s)), ("sample", ok & baseline & (splits == s))):
                    acc = self.sums.setdefault((m, str(s), scope), [0, 0.0, 0.0])
                    acc[0] += int(sel.sum())
                    acc[1] += float(iou[sel].sum())
                    acc[2] += float(dice[sel].sum())
            self.hist[m] += np.histogram(iou[ok], bins=HIST_BINS, range=(0, 1))[0]
            both = ok & baseline & ~np.isnan(grab)
            self.wins[m][0] += int((iou[both] > grab[both]).sum())
            self.wins[m][1] += int(both.sum())
            for name, lo, hi in SUBJECT_SIZES:             # on GrabCut's images: every method beside it
                sel = both & (area >= lo) & (area < hi)
                acc = self.by_size[(m, name)]
                acc[0] += int(sel.sum())
                acc[1] += float(iou[sel].sum())
                acc[2] += int((iou[sel] > grab[sel]).sum())
            if m == self.first:
                keys, ids = t["key"].to_pylist(), t["sample_id"].to_pylist()
                for i in np.flatnonzero(ok):
                    item = (-float(iou[i]), ids[i], keys[i])
                    if len(self.worst) < self.k:
                        heapq.heappush(self.worst, item)
                    elif item > self.worst[0]:
                        heapq.heapreplace(self.worst, item)

    def subject_sizes(self, methods: list[str], labels: dict[str, str]) -> list[dict]:
        """Per subset of SUBJECT_SIZES: its images (of GrabCut's) and per method the mean IoU (%)
        and the share of those images where the method beats GrabCut."""
        rows = []
        for name, lo, hi in SUBJECT_SIZES:
            acc = {m: self.by_size[(m, name)] for m in methods}
            per = {labels.get(m, m): {"iou": 100 * s / n, "beats_grabcut": w / n} for m, (n, s, w) in acc.items() if n}
            rows.append({"subset": name, "true_area": [lo, min(hi, 1.0)],
                         "images": max((n for n, _, _ in acc.values()), default=0), "methods": per})
        return rows

    def mean(self, m: str, split: str | None, scope: str = "all") -> tuple[int, float, float]:
        keys = [k for k in self.sums if k[0] == m and k[2] == scope and (split is None or k[1] == split)]
        n = sum(self.sums[k][0] for k in keys)
        return n, (sum(self.sums[k][1] for k in keys) / n if n else float("nan")), \
            (sum(self.sums[k][2] for k in keys) / n if n else float("nan"))


