"""Decoding and validating images and masks, crops and resizing (PIL + numpy, no Ray).

Every failure raises `BadInput` with a short reason; callers quarantine the input and go on.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 64_000_000          # decompression-bomb limit (width × height)
CROPS = ("center", "box", "resize")


class BadInput(ValueError):
    """An input that cannot be used; the message is the quarantine reason."""


def open_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise BadInput(f"{what}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise BadInput(f"{what}: zero-sized image {w}×{h}")
            if w * h > max_pixels:
                raise BadInput(f"{what}: {w}×{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                               f"(possible decompression bomb)")
            img.load()                      # full decode: truncated files fail here
            img = ImageOps.exif_transpose(img)
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput(f"{what}: decompression bomb rejected ({exc})") from None
    except Exception as exc:                # PIL raises many types for corrupt data
        raise BadInput(f"{what}: cannot decode ({type(exc).__name__}: {exc})") from None
    return img


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, …) → (H, W, 3) uint8.
    Transparent pixels are composited on white; 16-bit/float data are rescaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, what: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    return to_rgb(open_image(data, what, max_pixels))


def read_photo(path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file (a local path or a URI: pipelines.lib.locations) as (H, W, 3) uint8; BadInput
    (with the reason) when it cannot be read or decoded."""
    from pipelines.lib.locations import read_bytes
    try:
        data = read_bytes(path)
    except OSError as exc:
        raise BadInput(f"cannot read: {exc}") from None
    return decode_image(data, what="image", max_pixels=max_pixels)


def decode_mask(data: bytes, what: str = "mask", max_pixels: int = MAX_PIXELS,
                background_value: int | None = None) -> np.ndarray:
    """(H, W) uint8 in {0, 1}. Grey/colour masks: foreground = any non-zero pixel (or, with
    `background_value`, any pixel of a different label value, e.g. CLEVR's background id)."""
    img = open_image(data, what, max_pixels)
    if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB")).max(axis=2)
    else:
        arr = np.asarray(img)
        if arr.ndim == 3:
            arr = arr.max(axis=2)
    if background_value is not None:
        return (arr != background_value).astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    # binarise at half of the range: CUB's soft segmentations and 0/255 masks alike
    top = 65535 if arr.dtype == np.uint16 else (255 if arr.max() > 1 else 1)
    return (arr.astype(np.float64) >= top / 2).astype(np.uint8)


def crop_box(h: int, w: int, crop: str, box: tuple[float, float, float, float] | None = None,
             margin: float = 0.1) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the region to keep.

    center: the largest centred square. box: a square around (x, y, w, h) with `margin` of its
    size on each side, clipped to the image. resize: the whole image (aspect ratio not kept).
    """
    if crop == "resize":
        return 0, 0, w, h
    if crop == "center":
        side = min(h, w)
        left, top = (w - side) // 2, (h - side) // 2
        return left, top, left + side, top + side
    if crop == "box":
        if box is None:
            raise BadInput("crop 'box' needs a bounding box for this image")
        bx, by, bw, bh = box
        if bw <= 0 or bh <= 0 or bx >= w or by >= h or bx + bw <= 0 or by + bh <= 0:
            raise BadInput(f"bounding box {box} is empty or outside the {w}×{h} image")
        side = max(bw, bh) * (1 + 2 * margin)
        cx, cy = bx + bw / 2, by + bh / 2
        side = min(side, max(h, w))
        left = int(round(min(max(cx - side / 2, 0), max(w - side, 0))))
        top = int(round(min(max(cy - side / 2, 0), max(h - side, 0))))
        return left, top, min(w, left + int(round(side))), min(h, top + int(round(side)))
    raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")


def crop_and_resize(image: np.ndarray, region: tuple[int, int, int, int], size: int,
                    mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop (H, W, 3) image (and (H, W) mask) to `region`, resize to size×size.
    Images use Lanczos, masks nearest-neighbour so they stay binary."""
    left, top, right, bottom = region
    img = Image.fromarray(image).crop(region).resize((size, size), Image.Resampling.LANCZOS)
    out_mask = None
    if mask is not None:
        m = Image.fromarray(mask * 255).crop(region).resize((size, size), Image.Resampling.NEAREST)
        out_mask = (np.asarray(m) >= 128).astype(np.uint8)
    return np.asarray(img, dtype=np.uint8), out_mask


# ---- one model input per photo, and its mask back at the photo's size ------------------------
# `segment` on image files and the MLflow pyfunc both go through `model_input`, so one photo
# always gets one mask; `to_original` inverts its geometry.
NOT_SEGMENTED = 128                       # full-size mask value outside the region the model saw


def model_input(image: np.ndarray, size: int, crop: str = "resize") -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(H, W, 3) uint8 photo → (the size×size model input, the (left, top, right, bottom) region
    of the photo it shows). `resize` stretches the whole photo (every pixel gets a mask);
    `center` takes the largest centred square (pixels outside it are not segmented)."""
    if crop not in ("resize", "center"):
        raise ValueError(f"crop must be 'resize' or 'center' for photos, got {crop!r}")
    region = crop_box(*image.shape[:2], crop)
    return crop_and_resize(image, region, size)[0], region


def to_original(prob: np.ndarray, region: tuple[int, int, int, int], height: int, width: int,
                fill: float = np.nan) -> np.ndarray:
    """π_f (S, S) at model resolution → (height, width) float32 on the photo: bilinear through the
    inverse of `model_input`'s crop/resize; `fill` (NaN: not segmented) outside the region."""
    left, top, right, bottom = region
    up = Image.fromarray(np.asarray(prob, np.float32), mode="F").resize((right - left, bottom - top),
                                                                         Image.Resampling.BILINEAR)
    full = np.full((height, width), fill, np.float32)
    full[top:bottom, left:right] = np.clip(np.asarray(up), 0.0, 1.0)
    return full


def quantised(prob: np.ndarray) -> np.ndarray:
    """π_f as segment stores it: 8 bits, round(255·π_f) (returned as float32 in [0, 1])."""
    return np.rint(np.clip(np.asarray(prob, np.float32), 0, 1) * 255) / 255


def full_size_mask(prob: np.ndarray, threshold: float, region, height: int, width: int) -> np.ndarray:
    """(height, width) uint8: 255 where the upsampled π_f is above `threshold`, 0 below, and
    NOT_SEGMENTED outside the region the model saw. π_f is taken as stored (8 bits), so a mask
    recomputed later from a segmentation output is the same to the pixel."""
    full = to_original(quantised(prob), region, height, width)
    out = np.where(full > threshold, 255, 0).astype(np.uint8)
    out[np.isnan(full)] = NOT_SEGMENTED
    return out



def product_mask(image: np.ndarray, prob: np.ndarray, threshold: float, mask: np.ndarray, region, *, refine: bool,
                 seed: int, max_side: int) -> np.ndarray:
    """The mask `segment` writes and the pyfunc returns, uint8 (255 foreground, 0 background). With
    `region` None, at model resolution: `image` is the model input and `mask` its π_f > threshold.
    Otherwise at the photo's own size: `image` is the photo, π_f is mapped back through the
    crop/resize (full_size_mask; NOT_SEGMENTED outside the region the model saw). With `refine`, the
    partition is re-drawn by GrabCut on the image (pipelines.lib.grabcut.refine_at_size, seeded with
    `seed`; photos whose long side exceeds `max_side` are refined on a smaller copy)."""
    from pipelines.lib.grabcut import refine_at_size
    if region is None:
        if refine:
            mask = refine_at_size(image, prob, threshold, seed=seed, max_side=max_side)
        return np.where(mask, 255, 0).astype(np.uint8)
    height, width = image.shape[:2]
    if not refine:
        return full_size_mask(prob, threshold, region, height, width)
    left, top, right, bottom = region
    up = to_original(quantised(prob), region, height, width)[top:bottom, left:right]
    refined = refine_at_size(image[top:bottom, left:right], up, threshold, seed=seed, max_side=max_side)
    full = np.full((height, width), NOT_SEGMENTED, np.uint8)
    full[top:bottom, left:right] = np.where(refined, 255, 0)
    return full
