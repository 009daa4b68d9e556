"""The benchmark dataset layouts for preprocessing (CUB, Stanford Dogs and Cars, CLEVR-with-masks):
each turns its annotation files into a list of small records (one per input image: key, split,
paths, box, …) that Ray tasks then decode in parallel. A plain folder of any size is listed by
pipelines/lib/listing.py instead, one task per directory, never on the driver.

Parsing metadata happens on the driver and touches only small text/annotation files (these
layouts hold at most ~10⁵ images); images are never read here. Keys are stable strings (relative
path without extension); two inputs with the same key are both kept as records and the later one
is quarantined.
Every root is a location (pipelines.lib.locations): a local folder or a URI such as
`s3://bucket/photos/`; record paths are locations of the same kind.
"""
from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from pipelines.lib import locations
from pipelines.lib.errors import os_reason
from pipelines.lib.listing import split_of, stem

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
SOURCES = ("tm-dsprites", "folder", "cub", "stanford-dogs", "stanford-cars", "clevr-masks")
SPLITS = ("train", "val", "test")


class SourceError(ValueError):
    """The source as a whole cannot be read (missing folder or metadata file)."""


def _record(key: str, split: str, path: str | None = None, *, mask_path: str | None = None,
            box: tuple[float, float, float, float] | None = None, index: int = -1) -> dict:
    bx, by, bw, bh = box if box is not None else (float("nan"),) * 4
    return {"key": key, "split": split, "path": path or "", "mask_path": mask_path or "",
            "box_x": bx, "box_y": by, "box_w": bw, "box_h": bh, "index": index}


def _exists(location: str, what: str) -> bool:
    try:
        return locations.exists(location)
    except OSError as exc:                  # an object store out of reach, no such bucket, no access
        raise SourceError(f"{what}: cannot read {location} ({os_reason(exc)})") from None


def need(location: str | Path, what: str) -> str:
    """`location` if it exists, else SourceError naming `what`."""
    location = str(location)
    if not _exists(location, what):
        raise SourceError(f"{what} not found: {location}")
    return location


def _files(root: str) -> list[tuple[str, str]]:
    """(relative path, location) of every file under `root` (pipelines.lib.locations.list_files)."""
    try:
        return locations.list_files(root)
    except OSError as exc:
        raise SourceError(f"cannot list {root} ({os_reason(exc)})") from None


def _mask_index(mask_root: str | Path | None) -> dict[str, str]:
    """Mask files by relative path without extension."""
    if mask_root is None:
        return {}
    mask_root = need(mask_root, "mask folder")
    return {stem(rel): loc for rel, loc in _files(mask_root)}


def _listed(root: str) -> set[str]:
    """Relative paths of the files under `root` (empty when it does not exist): one listing
    instead of an existence check per file, which on an object store is a request each."""
    return {rel for rel, _ in _files(root)} if _exists(root, "folder") else set()


def cub(root: str | Path) -> list[dict]:
    """CUB-200-2011: images.txt, bounding_boxes.txt (x y w h), train_test_split.txt,
    images/<path>, segmentations/<path>.png."""
    root = str(root)
    paths = _read_table(need(locations.join(root, "images.txt"), "CUB images.txt"))
    boxes = _read_table(need(locations.join(root, "bounding_boxes.txt"), "CUB bounding_boxes.txt"))
    splits = _read_table(need(locations.join(root, "train_test_split.txt"), "CUB train_test_split.txt"))
    segmentations = locations.join(root, "segmentations")
    have_seg = _listed(segmentations)
    out = []
    for image_id, (rel,) in paths.items():
        seg = str(PurePosixPath(rel).with_suffix(".png"))
        box = tuple(float(v) for v in boxes[image_id]) if image_id in boxes else None
        split = "train" if splits.get(image_id, ["1"])[0] == "1" else "test"
        out.append(_record(stem(rel), split, locations.join(root, "images", rel),
                           mask_path=locations.join(segmentations, seg) if seg in have_seg else None, box=box))
    return out


def _read(location: str) -> str:
    try:
        return locations.read_text(location)
    except OSError as exc:
        raise SourceError(f"cannot read {location} ({os_reason(exc)})") from None


def _read_table(location: str) -> dict[str, list[str]]:
    rows = {}
    for n, line in enumerate(_read(location).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise SourceError(f"{location}:{n}: expected '<id> <value…>', got {line!r}")
        rows[parts[0]] = parts[1:]
    return rows


def _voc_box(xml_location: str) -> tuple[float, float, float, float] | None:
    """The first object's box from a PASCAL-VOC style annotation as (x, y, w, h)."""
    try:
        bb = ET.fromstring(locations.read_bytes(xml_location)).find(".//object/bndbox")
        x1, y1, x2, y2 = (float(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError):
        return None
    return x1, y1, x2 - x1, y2 - y1


def stanford_dogs(root: str | Path, masks: str | Path | None = None) -> list[dict]:
    """Images/<breed>/<name>.jpg, Annotation/<breed>/<name> (VOC XML), optional
    train_list.txt / test_list.txt (one relative image path per line) for the split."""
    root = str(root)
    images = need(locations.join(root, "Images"), "Stanford Dogs Images/")
    test_list = _list_file(locations.join(root, "test_list.txt"))
    annotations = locations.join(root, "Annotation")
    have_ann = _listed(annotations)
    mask_of = _mask_index(masks)
    files = _files(images)
    wanted = [locations.join(annotations, stem(rel)) if stem(rel) in have_ann else None for rel, _ in files]
    with ThreadPoolExecutor(16) as pool:       # one small read each: in parallel on object stores
        boxes = list(pool.map(lambda a: _voc_box(a) if a else None, wanted))
    out = []
    for (rel, loc), box in zip(files, boxes):
        key = stem(rel)
        out.append(_record(key, "test" if rel in test_list else "train", loc, mask_path=mask_of.get(key), box=box))
    return out


def _list_file(location: str) -> set[str]:
    if not _exists(location, "list file"):
        return set()
    return {line.strip() for line in _read(location).splitlines() if line.strip()}


def stanford_cars(root: str | Path, masks: str | Path | None = None) -> list[dict]:
    """cars_train/, cars_test/ and devkit/cars_{train,test}_annos.mat (bbox_x1, bbox_y1, bbox_x2,
    bbox_y2, …, fname), as in the original release; the .mat files are read with scipy."""
    from scipy.io import loadmat

    root = str(root)
    mask_of = _mask_index(masks)
    out = []
    for split in ("train", "test"):
        folder_ = locations.join(root, f"cars_{split}")
        annos = locations.join(root, "devkit", f"cars_{split}_annos.mat")
        if not _exists(folder_, "Stanford Cars"):
            continue
        boxes: dict[str, tuple[float, float, float, float]] = {}
        if _exists(annos, "Stanford Cars annotations"):
            try:
                table = loadmat(io.BytesIO(locations.read_bytes(annos)))["annotations"][0]
            except Exception as exc:  # a corrupt annotation file fails the whole source
                raise SourceError(f"cannot read {annos}: {exc}") from None
            for row in table:
                x1, y1, x2, y2 = (float(row[f"bbox_{c}"].squeeze()) for c in ("x1", "y1", "x2", "y2"))
                boxes[str(row["fname"].squeeze())] = (x1, y1, x2 - x1, y2 - y1)
        for rel, loc in _files(folder_):
            name = PurePosixPath(rel)
            key = f"{split}/{name.stem}"
            mp = mask_of.get(key) or mask_of.get(name.stem)
            out.append(_record(key, split, loc, mask_path=mp, box=boxes.get(name.name)))
    if not out:
        raise SourceError(f"no cars_train/ or cars_test/ folder under {root}")
    return out


def clevr_masks(root: str | Path) -> list[dict]:
    """CLEVR-with-masks exported as images/<name>.png + masks/<name>.png, where each mask is a
    label map (0 = background, one value per object); split folders train/val/test optional."""
    root = str(root)
    images = need(locations.join(root, "images"), "CLEVR images/")
    mask_of = _mask_index(need(locations.join(root, "masks"), "CLEVR masks/"))
    out = []
    for rel, loc in _files(images):
        key = stem(rel)
        out.append(_record(key, split_of(rel), loc, mask_path=mask_of.get(key)))
    return out
