"""The Parquet dataset contract (spec/architecture.md): `part-XXXXX.parquet` + `_manifest.json`.

Publishing is atomic: on a local filesystem the parts and manifest are written to a hidden
sibling folder and renamed into place in one step; on object stores (no atomic rename) the parts
go first and `_manifest.json` last — a dataset without a manifest is incomplete and readers
refuse it. A write that fails (disk full) removes the hidden folder, leaves an existing dataset
at the target as it was and raises DatasetError.

Integrity: parts are written with Parquet page checksums (CRC32) and read with them verified,
so a damaged part fails with DatasetError naming it instead of yielding wrong pixels;
`Store.check_parts` reads every part's footer (cheap: jobs run it before starting workers).
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from pipelines.lib import locations
from pipelines.lib.errors import os_reason

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"


class DatasetExists(FileExistsError):
    pass


class DatasetError(ValueError):
    pass


class Store:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = locations.resolve(locations.absolute(uri))
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def check_writable(self, overwrite: bool) -> None:
        if self._exists(self.path) and not overwrite:
            info = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
            if info:
                raise DatasetExists(f"{self.uri} already exists and is not empty; pass --overwrite to replace it")

    def publish(self, ds, manifest: dict, *, overwrite: bool) -> None:
        """Write the Ray dataset `ds` as parts + manifest at this store's location."""
        tmp = (str(Path(self.path).parent / f".{Path(self.path).name}.tmp-{uuid.uuid4().hex[:8]}")
               if self.local else self.path)
        from ray.data import SaveMode
        try:
            # our part names carry no write UUID, so the (fresh or replaced) folder is written in
            # OVERWRITE mode
            ds.write_parquet(tmp, filesystem=self.fs, filename_provider=_PartNames(), mode=SaveMode.OVERWRITE,
                             write_page_checksum=True)
            self._normalise_part_names(tmp)
            self._write_manifest(tmp, manifest)
        except Exception as exc:
            if self.local and self._exists(tmp):       # nothing half-written stays behind
                self.fs.delete_dir(tmp)
            kept = ("an existing dataset there is unchanged" if self.local
                    else "no manifest was written, so readers refuse the partial parts")
            raise DatasetError(f"{self.uri}: cannot write the dataset ({os_reason(exc)}); {kept}") from exc
        if self.local:
            old = None
            if self._exists(self.path):
                self.check_writable(overwrite)
                old = f"{tmp}.old"
                Path(self.path).rename(old)
            Path(tmp).rename(self.path)
            if old:
                self.fs.delete_dir(old)

    def _normalise_part_names(self, folder: str) -> None:
        """Ray may suffix block indices; rename the parts to part-00000.parquet, … in order."""
        names = sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(folder))
                       if i.base_name.endswith(".parquet"))
        for k, path in enumerate(names):
            want = f"{folder}/part-{k:05d}.parquet"
            if path != want:
                self.fs.move(path, want)

    def _write_manifest(self, folder: str, manifest: dict) -> None:
        files = sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(folder))
                       if i.base_name.endswith(".parquet"))
        manifest = {**manifest, "files": len(files), "file_names": files}
        with self.fs.open_output_stream(f"{folder}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())

    def read_manifest(self) -> dict:
        path = f"{self.path}/{MANIFEST}"
        if not self._exists(path):
            raise DatasetError(f"{self.uri}: no {MANIFEST} (not a dataset, or an incomplete write)")
        with self.fs.open_input_stream(path) as f:
            manifest = json.loads(f.read())
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(f"{self.uri}: schema_version {manifest.get('schema_version')} is not "
                               f"{SCHEMA_VERSION}")
        return manifest

    def check_parts(self) -> dict:
        """Every part the manifest lists is there and its footer reads, and the parts hold the
        manifest's number of rows; DatasetError naming the first bad part otherwise. Returns the
        manifest. Reads footers only (damaged data pages are found when the rows are read)."""
        manifest = self.read_manifest()
        rows = 0
        for name in manifest["file_names"]:
            path = f"{self.path}/{name}"
            try:
                with self.fs.open_input_file(path) as f:
                    rows += pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowException) as exc:
                raise part_error(self.uri, name, exc) from None
        want = manifest.get("counts", {}).get("ok")
        if want is not None and rows != want:
            raise DatasetError(f"{self.uri}: the parts hold {rows} rows but {MANIFEST} says {want}: "
                               f"a part was replaced or lost; re-create the dataset")
        return manifest


def part_error(uri: str, name: str, exc: BaseException) -> DatasetError:
    """The error for an unreadable part: names the part and says what to do."""
    first = str(exc).strip().splitlines()
    return DatasetError(f"{uri}: part {name} is damaged or unreadable ({type(exc).__name__}: "
                        f"{first[0] if first else ''}); re-create the dataset (e.g. rerun "
                        f"pipelines.preprocess with --overwrite) or restore the file")


def read_part(store: "Store", name: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """One part, with its page checksums verified; DatasetError naming the part if it is damaged."""
    try:
        return pq.read_table(f"{store.path}/{name}", filesystem=store.fs, columns=columns, filters=filters,
                             page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise part_error(store.uri, name, exc) from None


class _PartNames(FilenameProvider):
    """Ray Data filename provider: part-00000.parquet, part-00001.parquet, … (one per write task)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.parquet"

    def get_filename_for_block(self, block, write_uuid: str, task_index: int, block_index: int) -> str:
        return self.get_filename_for_task(write_uuid, task_index)


def _decode_table(table: pa.Table, size: int) -> dict[str, np.ndarray]:
    images = np.frombuffer(bytearray(b"".join(table["image"].to_pylist())), np.uint8).reshape(-1, size, size, 3)
    out = {"sample_id": table["sample_id"].to_numpy(), "key": np.array(table["key"].to_pylist()),
           "split": np.array(table["split"].to_pylist()), "images": images}
    masks = table["mask"].to_pylist()
    if masks and all(m is not None for m in masks):
        out["masks"] = np.frombuffer(bytearray(b"".join(masks)), np.uint8).reshape(-1, size, size)
    return out


def _read(store: Store, manifest: dict, columns: list[str] | None = None, filters=None) -> pa.Table:
    tables = [read_part(store, name, columns, filters) for name in manifest["file_names"]]
    return pa.concat_tables(tables).sort_by("sample_id")


def load_arrays(uri: str, split: str | None = None) -> dict[str, np.ndarray]:
    """Read a dataset into numpy: sample_id (N,), key (N,), images (N, H, W, 3) uint8 and, when
    every row has one, masks (N, H, W) uint8. For datasets that fit in memory (tests, CPU runs)."""
    store = Store(uri)
    manifest = store.read_manifest()
    table = _read(store, manifest, filters=None if split is None else [("split", "=", split)])
    return _decode_table(table, manifest["resolution"])


def split_ids(uri: str, split: str) -> np.ndarray:
    """Sorted sample ids of one split, reading only the id and split columns."""
    store = Store(uri)
    return _read(store, store.read_manifest(), ["sample_id"], [("split", "=", split)])["sample_id"].to_numpy()


def load_rows(uri: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of the given sorted sample ids (as `load_arrays`). Parquet row-group statistics
    skip the parts outside [min id, max id], so a worker reads little more than its shard."""
    store = Store(uri)
    manifest = store.read_manifest()
    size = manifest["resolution"]
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        raise DatasetError(f"{uri}: no sample ids requested")
    table = _read(store, manifest, filters=[("sample_id", ">=", int(ids[0])), ("sample_id", "<=", int(ids[-1]))])
    table = table.filter(pc.is_in(table["sample_id"], pa.array(ids)))
    if table.num_rows != ids.size:
        missing = np.setdiff1d(ids, table["sample_id"].to_numpy())[:5].tolist()
        raise DatasetError(f"{uri}: sample ids {missing} are missing from the dataset")
    return _decode_table(table, size)
