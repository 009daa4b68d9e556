"""What `pipelines.segment` reads, as units of work: a Parquet dataset (pipelines.preprocess) or a
folder of image files (listed by pipelines/lib/listing.py into the output's `_listing/`, so that a
resumed job sees the very same files under the very same ids).

A unit is `--batch-size` consecutive inputs of one part (a dataset part, or a listing part): it
is read as one Ray Data block by one read task, segmented by one actor call and written whole
into one output file, so all actors get work, a retry redoes one batch, and on `--resume` the
units whose rows are in the output are exactly the finished ones. The driver holds one row per
part (`Units`); the unit of a sample id is arithmetic on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.lib import listing, locations
from pipelines.lib.errors import os_reason
from pipelines.lib.models import ModelError
from pipelines.lib.parquet_store import MANIFEST, Store, read_part_rows, split_range

READ_SCHEMA = pa.schema([("sample_id", pa.int64()), ("key", pa.string()), ("split", pa.string()),
                         ("image", pa.binary()), ("path", pa.string())])


@dataclass
class Units:
    """Units of `size` ids over parts: part j holds ids [lo[j], hi[j]) (its share of the selection)
    and its units are numbered from first[j]."""
    kind: str                       # "parquet" | "folder"
    where: str                      # the dataset's location, or the saved listing's folder
    parts: list[dict]               # dataset parts (name, id_min, id_max) or listing parts (location, first)
    lo: np.ndarray
    hi: np.ndarray
    size: int

    def __post_init__(self):
        counts = -(-(self.hi - self.lo) // self.size)
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def count(self) -> int:
        return int(self.first[-1])

    @property
    def inputs(self) -> int:
        return int((self.hi - self.lo).sum())

    def bounds(self, u: int) -> tuple[int, int, int]:
        """(part index, first id, last id + 1) of unit u."""
        j = int(np.searchsorted(self.first, u, "right") - 1)
        a = int(self.lo[j] + (u - self.first[j]) * self.size)
        return j, a, min(a + self.size, int(self.hi[j]))

    def of_ids(self, ids: np.ndarray) -> np.ndarray:
        """The unit of each sample id (−1 for an id outside the selection)."""
        j = np.searchsorted(self.lo, ids, "right") - 1
        ok = (j >= 0) & (ids < self.hi[np.maximum(j, 0)])
        return np.where(ok, self.first[np.maximum(j, 0)] + (ids - self.lo[np.maximum(j, 0)]) // self.size, -1)

    def sizes(self) -> np.ndarray:
        """Rows in each unit."""
        u = np.arange(self.count)
        j = np.searchsorted(self.first, u, "right") - 1
        a = self.lo[j] + (u - self.first[j]) * self.size
        return np.minimum(a + self.size, self.hi[j]) - a


def read_unit(batch: pa.Table, units: Units, pending: np.ndarray) -> pa.Table:
    """Ray Data map: the rows of the unit pending[i] for each row i of `batch` (one, by design)."""
    out = []
    for i in batch["id"].to_pylist():
        j, a, b = units.bounds(int(pending[i]))
        part = units.parts[j]
        if units.kind == "parquet":
            t = read_part_rows(Store(units.where), part, a, b, ["sample_id", "key", "split", "image"])
            out.append(t.append_column("path", pa.array([""] * t.num_rows, pa.string())))
        else:
            t = listing.table(part["location"]).slice(a - part["first"], b - a)
            out.append(pa.table({"sample_id": t["index"], "key": t["key"], "split": t["split"],
                                 "image": pa.nulls(t.num_rows, pa.binary()), "path": t["path"]}))
    return pa.concat_tables([t.cast(READ_SCHEMA) for t in out])


def dataset_units(src: str, split: str | None, size: int, resolution: int, limit: int | None) -> tuple[Units, dict]:
    """The units of a preprocessed dataset's split (or all of it)."""
    store = Store(src)
    manifest = store.check_parts()               # a damaged part fails here, naming it
    if manifest.get("resolution") != resolution:
        raise ModelError(f"--input {src} has resolution {manifest.get('resolution')} but the model "
                         f"segments {resolution}×{resolution}: preprocess the corpus at {resolution}")
    a, b = split_range(manifest, split)
    if limit is not None:
        b = min(b, a + limit)
    parts = [p for p in manifest["parts"] if p["id_min"] < b and p["id_max"] >= a]
    lo = np.array([max(a, p["id_min"]) for p in parts], np.int64)
    hi = np.array([min(b, p["id_max"] + 1) for p in parts], np.int64)
    return (Units("parquet", store.location, parts, lo, hi, size),
            {"kind": "parquet", "input": src, "split": split})


def folder_units(src: str, saved: listing.Listing, split: str | None, size: int, limit: int | None) -> Units:
    """The units of a saved folder listing's split (or all of it)."""
    a, b = saved.splits.get(split, (0, 0)) if split else (0, saved.total)
    if limit is not None:
        b = min(b, a + limit)
    chosen = [p for p in saved.parts if p.first < b and p.first + p.count > a]
    lo = np.array([max(a, p.first) for p in chosen], np.int64)
    hi = np.array([min(b, p.first + p.count) for p in chosen], np.int64)
    parts = [{"location": p.source, "first": p.first} for p in chosen]
    return Units("folder", src, parts, lo, hi, size)


def is_dataset(src: str) -> bool:
    try:
        return locations.exists(locations.join(src, MANIFEST))
    except OSError as exc:                           # an object store out of reach, no such bucket
        raise ModelError(f"--input {src}: cannot read it ({os_reason(exc)})") from None
