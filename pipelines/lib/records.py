"""One preprocess input → one fixed-shape row: the TM-dSprites scene of an index, or an image file
(and its mask) decoded, cropped and resized; a bad input becomes a quarantined row with its reason,
a CLEVR frame outside the object-count range a filtered one (pipelines.preprocess runs this per
input inside its Ray tasks)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.lib.imaging import MAX_PIXELS, BadInput, crop_and_resize, crop_box, decode_image, decode_mask, open_image
from pipelines.lib.locations import read_bytes

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
