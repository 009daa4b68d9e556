"""Input sources for preprocessing: each turns a dataset layout into a list of small records
(one per input image: key, split, paths, box, …) that Ray Data then decodes in parallel.

Parsing metadata happens on the driver and touches only small text/annotation files; images are
never read here. Keys are stable strings (relative path without extension, or a generator key);
two inputs with the same key are both kept as records and the later one is quarantined.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
SOURCES = ("tm-dsprites", "folder", "cub", "stanford-dogs", "stanford-cars", "clevr-masks")


class SourceError(ValueError):
    """The source as a whole cannot be read (missing folder or metadata file)."""


def _record(key: str, split: str, path: str | None = None, *, mask_path: str | None = None,
            box: tuple[float, float, float, float] | None = None, index: int = -1) -> dict:
    bx, by, bw, bh = box if box is not None else (float("nan"),) * 4
    return {"key": key, "split": split, "path": path or "", "mask_path": mask_path or "",
            "box_x": bx, "box_y": by, "box_w": bw, "box_h": bh, "index": index}


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(f"{what} not found: {path}")
    return path


def _files(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def tm_dsprites(train: int, test: int) -> list[dict]:
    return ([_record(f"train/{i:07d}", "train", index=i) for i in range(train)]
            + [_record(f"test/{i:07d}", "test", index=i) for i in range(test)])


def _mask_index(mask_root: Path | None) -> dict[str, Path]:
    """Mask files by relative path without extension."""
    if mask_root is None:
        return {}
    _need(mask_root, "mask folder")
    return {str(p.relative_to(mask_root).with_suffix("")): p for p in _files(mask_root)}


def folder(root: Path, masks: Path | None = None) -> list[dict]:
    """Every file under `root` is an input (a non-image is quarantined, not silently dropped).
    Top-level folders named train/val/test set the split; anything else is 'train'."""
    _need(root, "input folder")
    mask_of = _mask_index(masks)
    out = []
    for p in _files(root):
        rel = p.relative_to(root)
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in ("train", "val", "test") else "train"
        key = str(rel.with_suffix(""))
        mp = mask_of.get(key)
        out.append(_record(key, split, str(p), mask_path=str(mp) if mp else None))
    return out


def cub(root: Path) -> list[dict]:
    """CUB-200-2011: images.txt, bounding_boxes.txt (x y w h), train_test_split.txt,
    images/<path>, segmentations/<path>.png."""
    paths = _read_table(_need(root / "images.txt", "CUB images.txt"))
    boxes = _read_table(_need(root / "bounding_boxes.txt", "CUB bounding_boxes.txt"))
    splits = _read_table(_need(root / "train_test_split.txt", "CUB train_test_split.txt"))
    out = []
    for image_id, (rel,) in paths.items():
        rel_path = Path(rel)
        seg = root / "segmentations" / rel_path.with_suffix(".png")
        box = tuple(float(v) for v in boxes[image_id]) if image_id in boxes else None
        split = "train" if splits.get(image_id, ["1"])[0] == "1" else "test"
        out.append(_record(str(rel_path.with_suffix("")), split, str(root / "images" / rel_path),
                           mask_path=str(seg) if seg.exists() else None, box=box))
    return out


def _read_table(path: Path) -> dict[str, list[str]]:
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise SourceError(f"{path}:{n}: expected '<id> <value…>', got {line!r}")
        rows[parts[0]] = parts[1:]
    return rows


def _voc_box(xml_path: Path) -> tuple[float, float, float, float] | None:
    """The first object's box from a PASCAL-VOC style annotation as (x, y, w, h)."""
    try:
        bb = ET.parse(xml_path).getroot().find(".//object/bndbox")
        x1, y1, x2, y2 = (float(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
    except (ET.ParseError, AttributeError, TypeError, ValueError):
        return None
    return x1, y1, x2 - x1, y2 - y1


def stanford_dogs(root: Path, masks: Path | None = None) -> list[dict]:
    """Images/<breed>/<name>.jpg, Annotation/<breed>/<name> (VOC XML), optional
    train_list.txt / test_list.txt (one relative image path per line) for the split."""
    images = _need(root / "Images", "Stanford Dogs Images/")
    test_list = _list_file(root / "test_list.txt")
    mask_of = _mask_index(masks)
    out = []
    for p in _files(images):
        rel = p.relative_to(images)
        ann = root / "Annotation" / rel.with_suffix("")
        box = _voc_box(ann) if ann.exists() else None
        key = str(rel.with_suffix(""))
        mp = mask_of.get(key)
        out.append(_record(key, "test" if str(rel) in test_list else "train", str(p),
                           mask_path=str(mp) if mp else None, box=box))
    return out


def _list_file(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()} if path.exists() else set()


def stanford_cars(root: Path, masks: Path | None = None) -> list[dict]:
    """cars_train/, cars_test/ and devkit/cars_{train,test}_annos.mat (bbox_x1, bbox_y1, bbox_x2,
    bbox_y2, …, fname), as in the original release; the .mat files are read with scipy."""
    from scipy.io import loadmat

    mask_of = _mask_index(masks)
    out = []
    for split in ("train", "test"):
        folder_ = root / f"cars_{split}"
        annos = root / "devkit" / f"cars_{split}_annos.mat"
        if not folder_.exists():
            continue
        boxes: dict[str, tuple[float, float, float, float]] = {}
        if annos.exists():
            try:
                table = loadmat(str(annos))["annotations"][0]
            except Exception as exc:  # a corrupt annotation file fails the whole source
                raise SourceError(f"cannot read {annos}: {exc}") from None
            for row in table:
                x1, y1, x2, y2 = (float(row[f"bbox_{c}"].squeeze()) for c in ("x1", "y1", "x2", "y2"))
                boxes[str(row["fname"].squeeze())] = (x1, y1, x2 - x1, y2 - y1)
        for p in _files(folder_):
            key = f"{split}/{p.stem}"
            mp = mask_of.get(key) or mask_of.get(p.stem)
            out.append(_record(key, split, str(p), mask_path=str(mp) if mp else None, box=boxes.get(p.name)))
    if not out:
        raise SourceError(f"no cars_train/ or cars_test/ folder under {root}")
    return out


def clevr_masks(root: Path) -> list[dict]:
    """CLEVR-with-masks exported as images/<name>.png + masks/<name>.png, where each mask is a
    label map (0 = background, one value per object); split folders train/val/test optional."""
    images = _need(root / "images", "CLEVR images/")
    mask_of = _mask_index(_need(root / "masks", "CLEVR masks/"))
    out = []
    for p in _files(images):
        rel = p.relative_to(images)
        key = str(rel.with_suffix(""))
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in ("train", "val", "test") else "train"
        mp = mask_of.get(key)
        out.append(_record(key, split, str(p), mask_path=str(mp) if mp else None))
    return out
