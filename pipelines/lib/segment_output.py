"""What segment has written, read back: each output file's summary from its small columns (rows,
counts per status and split, id range, nodes, the units it holds: how --resume knows what is done
and the manifest what was written), the files' names, the one-line error of a failed write, and
the rows themselves for small outputs (as Arrow, or decoded to numpy)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from pipelines.lib import locations
from pipelines.lib.errors import find_cause, os_reason
from pipelines.lib.parquet_store import DatasetError, Output, Store, read_part
from pipelines.lib.scoring import png
from pipelines.lib.segment_batch import BOOKKEEPING, OUTPUT_SCHEMA
from pipelines.lib.segment_inputs import Units

EXAMPLES = 1000                    # quarantined inputs named in the manifest (every one is a row of the output)


class PartNames(FilenameProvider):
    """part-<write id>-<task>.parquet: a resumed run's files never replace the interrupted run's."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}-{task_index:06d}.parquet"

    def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
        return self.get_filename_for_task(write_uuid, task_index)


def scan_part(location: str, units: Units | None) -> dict:
    """One output file's summary, read from its small columns: rows, ok / quarantined counts, per
    split, sample-id range, its first quarantined rows and (with `units`) the units whose rows it
    holds with their row counts. None when the file is unreadable (a write cut short)."""
    fs, path = locations.resolve(location)
    try:
        with fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["sample_id", "key", "split", "status", "reason", "input", "node"])
    except (OSError, pa.ArrowException):
        return None
    ids = t["sample_id"].to_numpy()
    ok = np.asarray(t["status"].to_pylist()) == "ok"
    splits, counts = np.unique(np.asarray(t["split"].to_pylist())[ok], return_counts=True)
    nodes, per_node = np.unique(np.asarray([n or "" for n in t["node"].to_pylist()]), return_counts=True)
    bad = t.filter(pa.array(~ok)).slice(0, EXAMPLES).to_pylist()
    out = {"name": location.rstrip("/").rsplit("/", 1)[-1], "rows": t.num_rows, "ok": int(ok.sum()),
           "quarantined": int((~ok).sum()), "per_split": dict(zip(splits.tolist(), counts.tolist())),
           "id_min": int(ids.min()) if len(ids) else None, "id_max": int(ids.max()) if len(ids) else None,
           "examples": [{"input": r["input"] or r["key"], "key": r["key"], "sample_id": r["sample_id"],
                         "reason": r["reason"]} for r in bad],
           "nodes": {n: int(c) for n, c in zip(nodes.tolist(), per_node.tolist()) if n}}
    if units is not None:
        u, n = np.unique(units.of_ids(ids), return_counts=True)
        out["units"] = [u, n]
    return out


def scan_output(output: Output, units: Units | None) -> list[dict]:
    """Every readable output file's summary, one task per file; an unreadable one (cut short by a
    kill) is deleted, so that its unit is done again."""
    import ray
    scan = ray.remote(num_cpus=0.25)(scan_part)
    names = output.parts()
    found = ray.get([scan.remote(output.file(n), units) for n in names])
    for name, s in zip(names, found):
        if s is None:
            locations.delete(output.file(name))
    return [s for s in found if s is not None]


def count_nodes(files: list[dict]) -> dict[str, int]:
    """Rows segmented per Ray node (the actors' nodes), over every output file."""
    out: dict[str, int] = {}
    for f in files:
        for n, c in f["nodes"].items():
            out[n] = out.get(n, 0) + c
    return dict(sorted(out.items()))


def write_failure(exc: BaseException, uri: str, folder: str) -> DatasetError | None:
    """The one-line error for a write that failed (a DatasetError raised by an actor, a full disk),
    holding no reference to the failed run's frames (nor so to its actors); None for other errors."""
    clear = find_cause(exc, (DatasetError, OSError))
    if clear is None:
        return None
    if isinstance(clear, DatasetError):
        return DatasetError(str(clear))
    return DatasetError(f"{uri}: cannot write the dataset ({os_reason(clear)}); the parts written so far stay in "
                        f"{folder} (--resume continues)")


def read_output(uri: str, columns: list[str] | None = None, ok_only: bool = True) -> pa.Table:
    """A segmentation output's rows (the segmented ones unless `ok_only` is off), in sample-id order:
    for small outputs (tests, notebooks); pipelines.evaluate reads by id range instead."""
    store = Store(uri)
    manifest = store.read_manifest()
    cols = None if columns is None else list(dict.fromkeys([*columns, "sample_id", "status"]))
    tables = [read_part(store, p["name"], cols) for p in manifest["parts"]]
    t = pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()
    if ok_only:
        t = t.filter(pc.equal(t["status"], "ok"))
    t = t.sort_by("sample_id")
    return t.select(columns) if columns is not None else t.drop_columns(list(BOOKKEEPING))


def read_predictions(uri: str) -> dict:
    """A small segmentation output in numpy (tests, notebooks): {"manifest", "sample_id" (N,), "masks"
    (N, H, W) bool, "prob" (N, H, W) float32 π_f, "key", "geometry" (per row: the photo's (height,
    width, region, threshold) for image files, None for Parquet rows), "refined" (per row the uint8
    mask GrabCut re-drew, or None)}, in sample-id order. `evaluate` itself reads by id range."""
    manifest = Store(uri).read_manifest()
    t = read_output(uri)
    size = manifest["resolution"]
    rows = t.to_pylist()
    stack = (lambda col, f, dtype: np.stack([f(png(r[col])) for r in rows]) if rows
             else np.zeros((0, size, size), dtype))
    return {"manifest": manifest, "sample_id": t["sample_id"].to_numpy(),
            "masks": stack("mask", lambda a: a > 127, bool),
            "prob": stack("prob", lambda a: a.astype(np.float32) / 255.0, np.float32),
            "key": [r["key"] for r in rows],
            "geometry": [None if r["region"] is None else (r["height"], r["width"], tuple(r["region"]), r["threshold"])
                         for r in rows],
            "refined": [png(r["refined"]) for r in rows] if manifest.get("refine") else None}
