"""Miniature corpora in the real dataset layouts, written by the tests themselves (nothing is
downloaded): a plain folder with every colour mode, CUB-200-2011, Stanford Dogs, Stanford Cars,
CLEVR-with-masks, and a corpus of broken files mixed with good ones."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _rgb(seed: int, w: int = 40, h: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _mask(w: int, h: int, seed: int) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[y:y + h // 2, x:x + w // 2] = 255
    return Image.fromarray(m)


def folder_corpus(root: Path, masks: Path | None = None) -> dict[str, Path]:
    """Good images in many formats and modes; returns key → file."""
    files = {
        "a_rgb": _save(Image.fromarray(_rgb(1)), root / "a_rgb.png"),
        "b_jpeg": _save(Image.fromarray(_rgb(2)), root / "b_jpeg.jpg", quality=95),
        "c_webp": _save(Image.fromarray(_rgb(3)), root / "c_webp.webp", lossless=True),
        "d_bmp": _save(Image.fromarray(_rgb(4)), root / "d_bmp.bmp"),
        "e_tiff": _save(Image.fromarray(_rgb(5)), root / "e_tiff.tiff"),
        "f_grey": _save(Image.fromarray(_rgb(6)[..., 0]), root / "f_grey.png"),
        "g_palette": _save(Image.fromarray(_rgb(7)).convert("P"), root / "g_palette.png"),
        "h_rgba": _save(Image.fromarray(np.dstack([_rgb(8), np.full((30, 40), 128, np.uint8)]), "RGBA"),
                        root / "h_rgba.png"),
        "i_cmyk": _save(Image.fromarray(_rgb(9)).convert("CMYK"), root / "i_cmyk.jpg"),
        "j_16bit": _save(Image.fromarray((_rgb(10)[..., 0].astype(np.uint16) * 257)), root / "j_16bit.png"),
        "sub/k_nested": _save(Image.fromarray(_rgb(11, 64, 64)), root / "sub" / "k_nested.png"),
    }
    if masks is not None:
        for key in ("a_rgb", "b_jpeg", "sub/k_nested"):
            w, h = Image.open(files[key]).size
            _save(_mask(w, h, 1), masks / f"{key}.png")
    return files


def broken_corpus(root: Path, masks: Path) -> dict[str, str]:
    """At least 10 kinds of broken input mixed with good ones; returns key → expected reason
    fragment for the broken ones."""
    folder_corpus(root, masks)
    good_png = (root / "a_rgb.png").read_bytes()
    good_jpg = (root / "b_jpeg.jpg").read_bytes()
    broken = {}

    def write(rel: str, data: bytes, reason: str):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        broken[str(Path(rel).with_suffix(""))] = reason

    write("bad_zero.png", b"", "empty file")
    write("bad_truncated.jpg", good_jpg[: len(good_jpg) // 2], "cannot decode")
    write("bad_cut_png.png", good_png[: len(good_png) // 2], "cannot decode")
    write("bad_text.jpg", b"this is not an image, just text\n" * 10, "cannot decode")
    write("bad_random.png", np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
          "cannot decode")
    write("bad_html.webp", b"<html><body>404 not found</body></html>", "cannot decode")
    write("notes.txt", b"a stray text file in the corpus", "cannot decode")
    # decompression bomb: a tiny file that decodes to 6000×6000 (above the test's pixel limit)
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")
    write("bad_bomb.png", buf.getvalue(), "decompression bomb")
    # header claims a size, data missing (bad IHDR/IDAT)
    write("bad_header_only.png", good_png[:60], "cannot decode")
    # mask problems: unreadable mask, mask of a different size
    _save(Image.fromarray(_rgb(20)), root / "bad_mask_corrupt.png")
    (masks / "bad_mask_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    broken["bad_mask_corrupt"] = "mask"
    _save(Image.fromarray(_rgb(21)), root / "bad_mask_size.png")
    _save(_mask(10, 10, 3), masks / "bad_mask_size.png")
    broken["bad_mask_size"] = "differs from image size"
    # duplicate key: a_rgb.jpg collides with a_rgb.png (same relative path without extension)
    _save(Image.fromarray(_rgb(22)), root / "a_rgb.jpg")
    broken["a_rgb#dup"] = "duplicate key"
    # broken symlink
    (root / "bad_link.png").symlink_to(root / "does_not_exist.png")
    broken["bad_link"] = "cannot read"
    return broken


def cub_corpus(root: Path, n: int = 6) -> None:
    lines, boxes, split = [], [], []
    for i in range(1, n + 1):
        rel = f"001.Bird/bird_{i:03d}.jpg"
        img = _rgb(100 + i, 80, 60)
        _save(Image.fromarray(img), root / "images" / rel, quality=95)
        _save(_mask(80, 60, i), root / "segmentations" / rel.replace(".jpg", ".png"))
        lines.append(f"{i} {rel}")
        boxes.append(f"{i} {10 + i}.0 5.0 30.0 40.0")
        split.append(f"{i} {1 if i <= n - 2 else 0}")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")


def dogs_corpus(root: Path, n: int = 4) -> None:
    tests = []
    for i in range(n):
        rel = f"n02085620-Chihuahua/n02085620_{i}"
        _save(Image.fromarray(_rgb(200 + i, 90, 70)), root / "Images" / f"{rel}.jpg", quality=95)
        ann = root / "Annotation" / rel
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(f"<annotation><size><width>90</width><height>70</height></size><object><name>dog</name>"
                       f"<bndbox><xmin>{5 + i}</xmin><ymin>6</ymin><xmax>60</xmax><ymax>50</ymax></bndbox>"
                       f"</object></annotation>")
        if i == n - 1:
            tests.append(f"{rel}.jpg")
    (root / "test_list.txt").write_text("\n".join(tests) + "\n")


def cars_corpus(root: Path, n: int = 4) -> None:
    from scipy.io import savemat
    for split in ("train", "test"):
        rows = []
        for i in range(n // 2):
            name = f"{i + 1:05d}.jpg"
            _save(Image.fromarray(_rgb(300 + i + (10 if split == "test" else 0), 100, 60)),
                  root / f"cars_{split}" / name, quality=95)
            rows.append((np.array([[3.0 + i]]), np.array([[4.0]]), np.array([[80.0]]), np.array([[50.0]]),
                         np.array([[1]]), np.array([name])))
        arr = np.array(rows, dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
                                    ("class", "O"), ("fname", "O")])
        (root / "devkit").mkdir(parents=True, exist_ok=True)
        savemat(root / "devkit" / f"cars_{split}_annos.mat", {"annotations": arr[None, :]})


def clevr_corpus(root: Path) -> dict[str, int]:
    """320×240 frames with label-map masks holding 2, 3, 5 and 7 objects."""
    counts = {}
    for i, n_obj in enumerate((2, 3, 5, 7)):
        img = _rgb(400 + i, 320, 240)
        labels = np.zeros((240, 320), np.uint8)
        for k in range(n_obj):
            labels[40 + 20 * k:55 + 20 * k, 80 + 15 * k:95 + 15 * k] = k + 1
        name = f"CLEVR_{i:06d}"
        _save(Image.fromarray(img), root / "images" / f"{name}.png")
        _save(Image.fromarray(labels), root / "masks" / f"{name}.png")
        counts[name] = n_obj
    return counts
