"""segment's Ray Data actor and the schema of the rows it returns: one model per actor, one unit (a
batch of inputs) per call; an input that cannot be decoded becomes a quarantined row with its
reason and the batch goes on (pipelines.segment runs it; tests run it directly)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from drc_core.threshold import DEFAULT, ThresholdPolicy
from pipelines.lib import devices
from pipelines.lib.grabcut import REFINE_MAX_SIDE
from pipelines.lib.imaging import MAX_PIXELS, BadInput, model_input, product_mask, read_photo
from pipelines.lib.mask_files import overlay, safe_name, write_pair
from pipelines.lib.models import load

OUTPUT_SCHEMA = pa.schema([("sample_id", pa.int64()), ("key", pa.string()), ("split", pa.string()),
                           ("status", pa.string()), ("reason", pa.string()), ("mask", pa.binary()),
                           ("fg_fraction", pa.float64()), ("confidence", pa.float64()),
                           ("recon_l1", pa.float64()), ("prob", pa.binary()), ("threshold", pa.float64()),
                           # image files: the photo's size and the (left, top, right, bottom) region
                           # the model saw (null for Parquet rows, which are at model resolution)
                           ("height", pa.int32()), ("width", pa.int32()), ("region", pa.list_(pa.int32())),
                           # --refine grabcut: the mask GrabCut re-drew from π_f's partition (PNG 0/255, at
                           # the photo's own size for image files, model resolution for Parquet rows)
                           ("refined", pa.binary()),
                           # image files: where the photo was read from
                           ("input", pa.string()),
                           # the Ray node whose actor segmented the row
                           ("node", pa.string())])
BOOKKEEPING = ("status", "reason", "input", "node")
RESULT_COLUMNS = [f.name for f in OUTPUT_SCHEMA if f.name not in BOOKKEEPING]


class SegmentBatch:
    """Ray Data actor: loads the model once, then segments one unit (a batch of inputs) per call.
    A row that cannot be decoded is returned as quarantined with its reason; the batch goes on."""

    def __init__(self, model: str, *, steps: int | None, seed: int, from_chains: bool, png: str | None,
                 threads: int, batch_size: int, tracking_uri: str | None = None, max_pixels: int = MAX_PIXELS,
                 threshold: str = DEFAULT.name, device: str = "auto", crop: str = "resize",
                 refine: bool = False, max_side: int = REFINE_MAX_SIDE):
        import torch
        torch.set_num_threads(max(1, threads))
        if tracking_uri:
            import mlflow
            mlflow.set_tracking_uri(tracking_uri)
        self.seg = load(model, devices.resolve(device, "segment"))
        self.steps, self.seed, self.batch_size = steps, seed, batch_size
        self.chains = None
        if from_chains:
            from pipelines.lib.chain_reader import ChainReader
            self.chains = ChainReader(self.seg.checkpoint)
        self.png = png
        self.max_pixels = max_pixels
        self.policy = ThresholdPolicy.parse(threshold)
        self.crop = crop
        self.refine, self.max_side = refine, max_side
        import ray
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def _read_photo(self, path: str) -> np.ndarray:
        return read_photo(path, self.max_pixels)

    def _decode(self, row: dict) -> tuple[np.ndarray, dict | None]:
        """(the model input, the photo's geometry {height, width, region} or None for a Parquet row)."""
        size = self.seg.resolution
        if row.get("image") is not None:                      # a Parquet dataset row: raw uint8
            raw = row["image"]
            if len(raw) != size * size * 3:
                raise BadInput(f"image has {len(raw)} bytes, expected {size}×{size}×3")
            return np.frombuffer(raw, np.uint8).reshape(size, size, 3), None
        photo = self._read_photo(row["path"])
        image, region = model_input(photo, size, self.crop)
        return image, {"height": photo.shape[0], "width": photo.shape[1], "region": list(region)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.lib.mlflow_model import result_frame
        rows = batch.to_pylist()
        out = [{"sample_id": int(r["sample_id"]), "key": r["key"], "split": r["split"], "status": "ok",
                "reason": "", **dict.fromkeys(RESULT_COLUMNS[3:]), "input": r["path"] or None,
                "node": getattr(self, "node", None)}
               for r in rows]
        images, good = [], []
        for i, r in enumerate(rows):
            try:
                image, geometry = self._decode(r)
                images.append(image)
                out[i].update(geometry or {})
                good.append(i)
            except BadInput as exc:
                out[i]["status"], out[i]["reason"] = "quarantined", str(exc)
        if good:
            ids = np.array([out[i]["sample_id"] for i in good], np.int64)
            z_init = self.chains.get(ids) if self.chains is not None else None
            res = self.seg.segment(np.stack(images), ids, steps=self.steps, seed=self.seed, z_init=z_init,
                                   batch_size=self.batch_size)
            frame, masks = result_frame(res["prob"], res["recon_l1"], self.policy)
            for j, i in enumerate(good):
                out[i].update(mask=frame["mask_png"][j], fg_fraction=float(frame["fg_fraction"][j]),
                              confidence=float(frame["confidence"][j]), recon_l1=float(frame["recon_l1"][j]),
                              prob=frame["prob_png"][j], threshold=float(frame["threshold"][j]))
                if self.refine or self.png is not None:
                    self._finish(out[i], rows[i], images[j], res["prob"][j], masks[j])
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _final_mask(self, row: dict, image: np.ndarray, prob: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """pipelines.lib.imaging.product_mask of the row: at the photo's own size for image files, at
        model resolution for Parquet rows; re-drawn by GrabCut when refining."""
        return product_mask(image, prob, row["threshold"], mask, row["region"], refine=self.refine,
                            seed=row["sample_id"], max_side=self.max_side)

    def _finish(self, row: dict, source: dict, image: np.ndarray, prob: np.ndarray, mask: np.ndarray) -> None:
        """The row's `refined` mask when refining, and DIR/masks/<name>.png + DIR/overlays/<name>.png
        (the product's mask: the refined one when refining) with --png."""
        import io

        from PIL import Image
        if row["region"] is not None:
            image = self._read_photo(source["path"])          # decoded again: batches hold no full-size photos
        final = self._final_mask(row, image, prob, mask)
        buf = io.BytesIO()
        Image.fromarray(final).save(buf, format="PNG")
        if self.refine:
            row["refined"] = buf.getvalue()
        if self.png is not None:                            # model-resolution rows: overlays upscaled to be seen
            write_pair(self.png, safe_name(row["sample_id"], row["key"]), buf.getvalue(),
                       overlay(image, final, 128 if row["region"] is None else 1))
