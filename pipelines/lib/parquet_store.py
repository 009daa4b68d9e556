"""The Parquet dataset contract (spec/architecture.md): `part-*.parquet` + `_manifest.json`.

Streaming and resumable writes (`Output`). A stage writes its parts as it goes, each part one
complete file (locally a temporary file renamed into place, on an object store one object that
appears only once it is complete), and `_manifest.json` last, counted from the parts written. On
a local filesystem it writes into a hidden sibling folder (`.<name>.partial`) renamed onto the
target at the end, so an existing dataset there stays readable until the new one is complete; on
object stores (no rename) it writes in place. `_job.json` there records the job's settings: a
job that was killed is continued by `--resume` (its finished parts are kept, nothing is written
twice; other settings are refused naming them) or started over by `--overwrite`. A dataset
without a manifest is incomplete and readers refuse it.

Reading. The manifest lists every part with its row count and sample-id range (and, for a
preprocessed dataset, each split's id range: ids are dense and a split's rows contiguous), so a
reader opens only the parts that hold the ids it needs and, within a part, only the row groups
(`ROW_GROUP` rows each) that hold them.

Integrity: parts are written with Parquet page checksums (CRC32) and read with them verified, so
a damaged part fails with DatasetError naming it instead of yielding wrong pixels;
`Store.check_parts` reads every part's footer (cheap: jobs run it before starting workers).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.lib import locations
from pipelines.lib.errors import os_reason

SCHEMA_VERSION = 2
MANIFEST = "_manifest.json"
JOB = "_job.json"
ROW_GROUP = 64                    # rows per Parquet row group: a batch read touches ~ its own rows


class DatasetExists(FileExistsError):
    pass


class DatasetError(ValueError):
    pass


class Store:
    """A finished dataset (or one being written, for `Output`)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.location = locations.absolute(uri)
        self.fs, self.path = locations.resolve(self.location)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def file(self, name: str) -> str:
        return locations.join(self.location, name)

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}" if name else self.path).type != pafs.FileType.NotFound

    def read_manifest(self) -> dict:
        if not self.exists(MANIFEST):
            raise DatasetError(f"{self.uri}: no {MANIFEST} (not a dataset, or an incomplete write)")
        manifest = json.loads(locations.read_text(self.file(MANIFEST)))
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(f"{self.uri}: schema_version {manifest.get('schema_version')} is not {SCHEMA_VERSION}: "
                               f"it was written by an older version; re-create it (rerun the stage that wrote it)")
        return manifest

    def check_parts(self) -> dict:
        """Every part the manifest lists is there, its footer reads and holds the rows the manifest
        says; DatasetError naming the first bad part otherwise. Returns the manifest. Reads footers
        only, many at once (damaged data pages are found when the rows are read)."""
        manifest = self.read_manifest()

        def rows(part: dict) -> int:
            try:
                with self.fs.open_input_file(f"{self.path}/{part['name']}") as f:
                    return pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise part_error(self.uri, part["name"], exc) from None
        with ThreadPoolExecutor(16) as pool:
            for part, n in zip(manifest["parts"], pool.map(rows, manifest["parts"])):
                if n != part["rows"]:
                    raise DatasetError(f"{self.uri}: part {part['name']} holds {n} rows but {MANIFEST} says "
                                       f"{part['rows']}: a part was replaced; re-create the dataset")
        return manifest


def part_error(uri: str, name: str, exc: BaseException) -> DatasetError:
    """The error for an unreadable part: names the part and says what to do."""
    first = str(exc).strip().splitlines()
    return DatasetError(f"{uri}: part {name} is damaged or unreadable ({type(exc).__name__}: "
                        f"{first[0] if first else ''}); re-create the dataset (e.g. rerun "
                        f"pipelines.preprocess with --overwrite) or restore the file")


def write_table(table: pa.Table, location: str, metadata: dict | None = None, row_group_size: int = ROW_GROUP) -> int:
    """One part, atomically (locally renamed into place, on an object store one object), with page
    checksums and `metadata` (JSON) in its footer; returns its size in bytes."""
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"drc": json.dumps(metadata).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, write_page_checksum=True)
    data = sink.getvalue()
    locations.write_bytes(location, data.to_pybytes())
    return data.size


def part_metadata(location: str) -> dict | None:
    """The JSON metadata `write_table` put in a part's footer, or None when the file is missing or
    unreadable (an interrupted write)."""
    fs, path = locations.resolve(location)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    except (OSError, pa.ArrowException):
        return None
    return json.loads(meta[b"drc"]) if b"drc" in meta else {}


def read_part(store: Store, name: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """One part, with its page checksums verified; DatasetError naming the part if it is damaged."""
    try:
        return pq.read_table(f"{store.path}/{name}", filesystem=store.fs, columns=columns, filters=filters,
                             page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise part_error(store.uri, name, exc) from None


def _read_row_range(fs, path: str, a: int, b: int, columns: list[str] | None = None) -> pa.Table:
    """Rows [a, b) (positions) of one Parquet file, reading only the row groups that hold them,
    page checksums verified."""
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        first, last = np.searchsorted(starts, a, "right") - 1, np.searchsorted(starts, b, "left")
        t = pf.read_row_groups(list(range(first, last)), columns=columns)
    return t.slice(a - starts[first], b - a)


def read_rows(location: str, a: int, b: int, columns: list[str] | None = None) -> pa.Table:
    """Rows [a, b) (positions) of the Parquet file at `location` (a path or URI)."""
    fs, path = locations.resolve(location)
    return _read_row_range(fs, path, a, b, columns)


def read_part_rows(store: Store, part: dict, lo: int, hi: int, columns: list[str] | None = None) -> pa.Table:
    """Rows with sample ids [lo, hi) of a part of a preprocessed dataset (ids dense within the part:
    row r holds id_min + r), reading only the row groups that hold them, checksums verified."""
    a, b = max(lo, part["id_min"]) - part["id_min"], min(hi, part["id_max"] + 1) - part["id_min"]
    if b <= a:
        return None
    try:
        return _read_row_range(store.fs, f"{store.path}/{part['name']}", a, b, columns)
    except (OSError, pa.ArrowException) as exc:
        raise part_error(store.uri, part["name"], exc) from None


def split_range(manifest: dict, split: str | None) -> tuple[int, int]:
    """[lo, hi) of a split's sample ids (all ids without a split) in a preprocessed dataset."""
    if split is None:
        return 0, manifest["counts"]["ok"]
    lo, hi = manifest["splits"].get(split, (0, 0))
    return lo, hi


def read_range(uri: str, lo: int, hi: int, columns: list[str] | None = None) -> pa.Table:
    """The rows with sample ids [lo, hi) of a preprocessed dataset, in id order."""
    store = Store(uri)
    manifest = store.read_manifest()
    tables = [t for p in manifest["parts"] if p["rows"] and p["id_min"] < hi and p["id_max"] >= lo
              for t in [read_part_rows(store, p, lo, hi, columns)] if t is not None]
    return pa.concat_tables(tables) if tables else None


def _fill(out: np.ndarray, column: pa.ChunkedArray, name: str) -> None:
    """Copy a binary column whose every value is out[i]'s bytes into `out`, straight from Arrow's
    value buffers (one copy, no Python bytes objects)."""
    width, at = int(np.prod(out.shape[1:])), 0
    flat = out.reshape(len(out), width)
    for chunk in column.chunks:
        n = len(chunk)
        if n == 0:
            continue
        large = pa.types.is_large_binary(chunk.type)
        offsets = np.frombuffer(chunk.buffers()[1], np.int64 if large else np.int32, count=n + 1,
                                offset=chunk.offset * (8 if large else 4))
        if chunk.null_count or np.any(np.diff(offsets) != width):
            raise DatasetError(f"{name}: a value is missing or not {width} bytes")
        flat[at:at + n] = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(n, width)
        at += n


def _decode_tables(tables, n: int, size: int) -> dict[str, np.ndarray]:
    """Tables of rows (in order, n rows in all) decoded into arrays allocated once: sample_id (N,),
    key (N,), split (N,), images (N, H, W, 3) uint8 and, when every row has one, masks (N, H, W)
    uint8. A worker's peak is its arrays plus one part's table, not two or three copies of them."""
    ids = np.empty(n, np.int64)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)            # pages are touched only when filled
    keys, splits, with_masks, at = [], [], n > 0, 0
    for t in tables:
        k = t.num_rows
        if at + k > n:
            raise DatasetError(f"more rows than the {n} expected")
        ids[at:at + k] = t["sample_id"].to_numpy()
        _fill(images[at:at + k], t["image"], "image")
        with_masks = with_masks and t["mask"].null_count == 0
        if with_masks:
            _fill(masks[at:at + k], t["mask"], "mask")
        keys += t["key"].to_pylist()
        splits += t["split"].to_pylist()
        at += k
    if at != n:
        raise DatasetError(f"{at} rows read where {n} were expected")
    out = {"sample_id": ids, "key": np.array(keys, dtype=str), "split": np.array(splits, dtype=str),
           "images": images}
    if with_masks:
        out["masks"] = masks
    return out


def load_range(uri: str, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows [lo, hi) of sample ids decoded to numpy: sample_id (N,), key (N,), split (N,), images
    (N, H, W, 3) uint8 and, when every row has one, masks (N, H, W) uint8; read part by part."""
    store = Store(uri)
    manifest = store.read_manifest()
    hi = max(lo, min(hi, manifest["counts"]["ok"]))
    parts = [p for p in manifest["parts"] if p["rows"] and p["id_min"] < hi and p["id_max"] >= lo]
    tables = (t for p in parts for t in [read_part_rows(store, p, lo, hi)] if t is not None)
    return _decode_tables(tables, hi - lo, manifest["resolution"])


def load_arrays(uri: str, split: str | None = None) -> dict[str, np.ndarray]:
    """A whole split (or dataset) decoded to numpy, as `load_range`: for what fits in memory."""
    lo, hi = split_range(Store(uri).read_manifest(), split)
    return load_range(uri, lo, hi)


def split_ids(uri: str, split: str) -> np.ndarray:
    """Sorted sample ids of one split (from the manifest, no data read)."""
    lo, hi = split_range(Store(uri).read_manifest(), split)
    return np.arange(lo, hi, dtype=np.int64)


def load_rows(uri: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of the given sorted sample ids (as `load_range`), reading only the parts and row
    groups that hold them."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        raise DatasetError(f"{uri}: no sample ids requested")
    store = Store(uri)
    manifest = store.read_manifest()
    parts = [p for p in manifest["parts"] if p["rows"]]
    held = np.zeros(ids.size, bool)                     # a part holds every id of its range
    for p in parts:
        held |= (ids >= p["id_min"]) & (ids <= p["id_max"])
    if not held.all():
        raise DatasetError(f"{uri}: sample ids {ids[~held][:5].tolist()} are missing from the dataset")

    def pieces():
        for p in parts:
            inside = ids[(ids >= p["id_min"]) & (ids <= p["id_max"])]
            if inside.size:
                t = read_part_rows(store, p, int(inside[0]), int(inside[-1]) + 1)
                yield t.filter(pc.is_in(t["sample_id"], pa.array(inside)))
    return _decode_tables(pieces(), ids.size, manifest["resolution"])


class Output:
    """Where a streaming stage writes a dataset (module docstring): `begin`, parts written into
    `folder` as the stage goes, `finish` with the manifest."""

    def __init__(self, uri: str):
        self.uri = uri
        self.target = Store(uri)
        if self.target.local:
            p = Path(self.target.location)
            self.folder = str(p.parent / f".{p.name}.partial")
        else:
            self.folder = self.target.location
        self.staging = Store(self.folder)

    def file(self, name: str) -> str:
        return locations.join(self.folder, name)

    def complete(self) -> bool:
        return self.target.exists(MANIFEST)

    def _partial(self) -> bool:
        return self.staging.exists(JOB)

    def check(self, *, resume: bool, overwrite: bool) -> str:
        """What `begin` would do — 'fresh', 'resume' or 'complete' (a finished dataset and --resume:
        nothing to do) — or DatasetExists saying why it must not start. Reads two small files."""
        complete = self.complete()
        partial = self.staging.exists(JOB) and (self.target.local or not complete)
        if partial:
            if resume:
                return "resume"
            if not overwrite:
                raise DatasetExists(f"{self.uri}: an interrupted run left its parts in {self.folder}; pass --resume to "
                                    f"continue it or --overwrite to start over")
        elif complete and not overwrite:
            if resume:
                return "complete"
            raise DatasetExists(f"{self.uri} already exists and is not empty; pass --overwrite to replace it")
        elif not complete and not overwrite and self.target.exists():
            if self.target.fs.get_file_info(pafs.FileSelector(self.target.path, allow_not_found=True)):
                raise DatasetExists(f"{self.uri} already exists and is not empty; pass --overwrite to replace it")
        return "fresh"

    def begin(self, job: dict, *, resume: bool, overwrite: bool) -> str:
        """Prepare to write; returns check's verdict. On 'resume' the settings in `job` must equal the
        interrupted run's (DatasetError naming each that differs); on 'fresh' an interrupted run's
        parts are removed (and on an object store an old dataset at the target too)."""
        verdict = self.check(resume=resume, overwrite=overwrite)
        if verdict == "complete":
            return verdict
        job = json.loads(json.dumps(job))              # as it reads back (tuples are lists)
        if verdict == "resume":
            saved = json.loads(locations.read_text(self.file(JOB)))
            differ = [k for k in sorted(set(job) | set(saved)) if saved.get(k) != job.get(k)]
            if differ:
                raise DatasetError(f"{self.uri}: --resume with other settings than the interrupted run: "
                                   + "; ".join(f"{k} was {saved.get(k)!r}, now {job.get(k)!r}" for k in differ)
                                   + " (rerun with the same settings, or --overwrite to start over)")
            return verdict
        if self.staging.exists():
            locations.delete(self.folder)
        try:
            locations.write_text(self.file(JOB), json.dumps(job, indent=1, sort_keys=True))
        except OSError as exc:
            raise DatasetError(f"{self.uri}: cannot write the dataset ({os_reason(exc)})") from exc
        return verdict

    def parts(self, prefix: str = "part-") -> list[str]:
        """Names of the complete part files written so far (an interrupted local write's temporary
        file is not one)."""
        infos = self.staging.fs.get_file_info(pafs.FileSelector(self.staging.path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(prefix)
                      and i.base_name.endswith(".parquet"))

    def finish(self, manifest: dict) -> dict:
        """Write the manifest last (and publish a local folder by renaming it onto the target)."""
        manifest = {"schema_version": SCHEMA_VERSION, **manifest}
        try:
            locations.write_text(self.file(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
        except OSError as exc:
            raise DatasetError(f"{self.uri}: cannot write the dataset ({os_reason(exc)}); its parts stay in "
                               f"{self.folder} (--resume finishes it)") from exc
        locations.delete(self.file(JOB))
        if self.target.local:
            target = Path(self.target.location)
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                target.rename(old)
            Path(self.folder).rename(target)
            if old:
                locations.delete(str(old))
        return manifest
