"""What `pipelines.segment` reads: a Parquet dataset (one read task per part, through our
checksum-verifying reader) or a folder of image files (keys and dense ids as preprocess gives
them, a duplicate key quarantined), as a Ray dataset of rows to segment."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.lib import locations, sources
from pipelines.lib.errors import os_reason
from pipelines.lib.models import ModelError
from pipelines.lib.parquet_store import MANIFEST, Store, read_part


def _read_parts(batch: pa.Table, uri: str, split: str | None) -> pa.Table:
    store = Store(uri)
    tables = [read_part(store, name, ["sample_id", "key", "split", "image"],
                        None if split is None else [("split", "=", split)]) for name in batch["part"].to_pylist()]
    return pa.concat_tables(tables)


def folder_records(root: str) -> tuple[list[dict], list[dict]]:
    """Every file under `root` (a folder or URI), keyed by relative path without extension (as
    preprocess does), ids dense in key order; a second file with the same key is quarantined."""
    seen, records, quarantine = set(), [], []
    for rec in sources.folder(root):
        if rec["key"] in seen:
            quarantine.append({"input": rec["path"], "key": rec["key"], "reason": f"duplicate key {rec['key']!r}"})
            continue
        seen.add(rec["key"])
        records.append({"key": rec["key"], "split": rec["split"], "path": rec["path"]})
    records.sort(key=lambda r: r["key"])
    for i, r in enumerate(records):
        r["sample_id"] = i
    return records, quarantine


def input_dataset(args, resolution: int):
    """(Ray dataset of rows to segment, number of inputs, quarantined before reading, description,
    input path by key for image folders)."""
    import pandas as pd
    import ray
    src = args.input
    try:
        is_dataset = locations.exists(locations.join(src, MANIFEST))
    except OSError as exc:                           # an object store out of reach, no such bucket
        raise ModelError(f"--input {src}: cannot read it ({os_reason(exc)})") from None
    if is_dataset:
        store = Store(src)
        manifest = store.check_parts()               # a damaged part fails here, naming it
        if manifest.get("resolution") != resolution:
            raise ModelError(f"--input {src} has resolution {manifest.get('resolution')} but the model "
                             f"segments {resolution}×{resolution}: preprocess the corpus at {resolution}")
        per_split = manifest["counts"]["per_split"]
        # one read task per part, through our reader: it verifies the parts' page checksums
        # (Ray Data's Parquet reader does not), so damaged data pages fail naming the part
        # instead of yielding wrong pixels
        parts = manifest["file_names"]
        # the read tasks reserve no CPU: the segmenting actors (a separate operator, since their
        # restart settings differ) may hold every CPU of the instance, and a read task waiting for
        # one would then wait forever
        ds = ray.data.from_items([{"part": name} for name in parts], override_num_blocks=max(1, len(parts))) \
            .map_batches(_read_parts, fn_kwargs={"uri": src, "split": args.split}, batch_size=1, batch_format="pyarrow",
                         num_cpus=0)
        n = per_split.get(args.split, 0) if args.split else sum(per_split.values())
        return ds, n, [], {"kind": "parquet", "input": src, "split": args.split}, {}
    if args.from_chains:
        raise ModelError("--from-chains needs a Parquet dataset as --input (the one the model was trained on)")
    try:
        records, quarantine = folder_records(src)
    except sources.SourceError as exc:
        raise ModelError(f"--input {src}: {exc}") from None
    if args.split:
        records = [r for r in records if r["split"] == args.split]
    frame = pd.DataFrame(records, columns=["sample_id", "key", "split", "path"])
    blocks = max(1, min(len(frame) // 64, 200))
    bounds = np.linspace(0, len(frame), blocks + 1).astype(int)
    chunks = [frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a] or [frame]
    return (ray.data.from_pandas(chunks), len(records) + len(quarantine), quarantine, {"kind": "folder", "input": src},
            {r["key"]: r["path"] for r in records})
