"""Mask and overlay PNG files: safe names, the red-tint overlay, and writes that are atomic per file."""
from __future__ import annotations

import io
import re

import numpy as np

from pipelines.lib import locations
from pipelines.lib.errors import os_reason
from pipelines.lib.imaging import NOT_SEGMENTED
from pipelines.lib.parquet_store import DatasetError


def safe_name(sample_id: int, key: str) -> str:
    """A file name for a mask/overlay: only [A-Za-z0-9._-], no leading dot, no separator."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(key)).strip("._")[:80] or "image"
    return f"{int(sample_id):08d}-{stem}.png"


def overlay(image: np.ndarray, mask: np.ndarray, min_size: int = 128) -> np.ndarray:
    """The image with the foreground tinted red (a bool mask, or a uint8 one: 255 foreground,
    NOT_SEGMENTED darkened), upscaled (nearest) to at least `min_size`."""
    out = image.astype(np.float32)
    if mask.dtype == np.uint8:
        out[mask == NOT_SEGMENTED] *= 0.35
        mask = mask == 255
    out[mask] = 0.5 * out[mask] + 0.5 * np.array([255, 0, 0], np.float32)
    scale = max(1, -(-min_size // image.shape[0]))
    return out.astype(np.uint8).repeat(scale, 0).repeat(scale, 1)


def write_pair(folder: str, name: str, mask_png: bytes, overlay_image: np.ndarray) -> None:
    """folder/masks/<name> (PNG bytes as given) and folder/overlays/<name> (the overlay encoded), in
    a local folder or under a URI; each file is either complete or absent (a full disk leaves no
    truncated PNG). `name` must be a `safe_name` (no separator, no leading dot)."""
    from PIL import Image
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"output name {name!r} could escape {folder}: not a safe_name")
    buf = io.BytesIO()
    Image.fromarray(overlay_image).save(buf, format="PNG")
    for sub, data in (("masks", mask_png), ("overlays", buf.getvalue())):
        try:
            locations.write_bytes(locations.join(folder, sub, name), data)
        except OSError as exc:
            raise DatasetError(f"--png {folder}: cannot write {sub}/{name} ({os_reason(exc)})") from None
