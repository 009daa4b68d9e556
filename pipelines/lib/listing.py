"""Sorted listings of input images at any corpus size, built where the files are.

A listing is every input as a row (`index`, `key`, `split`, `path`) in one global order: split
(train, val, test), then key (the file's path relative to the root, without its extension), cut
into parts of at most `rows` rows. `index` is dense (0..N−1) in that order, so a rerun over the same
folder gives every file the same index: segment keys its output by it, preprocess assigns its
`sample_id`s in the same order, and the rows of one split are one contiguous range.

A folder is listed by one Ray task per directory (`locations.entries`: os.scandir locally, one
non-recursive listing on an object store), level by level, many at once; the driver keeps only
each directory's file count and sub-folder names, never the files, and the parts are assembled
by tasks from the directories' tables in the object store. The order is the one `sorted(keys)`
gives: within a directory a sub-folder `name` sorts as the string `name/` among the file stems, so
walking the tree depth-first in that order lists the keys in string order. Two files whose keys
collide (`a.jpg`, `a.png`) keep the first by file name; the other is a duplicate, with its reason.

The benchmark layouts (CUB, Stanford Dogs/Cars, CLEVR: ≤ ~10⁵ images whose annotation files are
read on the driver) become listings through `from_records`, the TM-dSprites generator through
`tm_dsprites`, whose parts are only made when a task reads them.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa

from pipelines.lib import locations

SPLITS = ("train", "val", "test")
SPLIT_ORDER = {s: i for i, s in enumerate(SPLITS)}
INDEX_FILE = "_listing.json"
DUPLICATE_SCHEMA = pa.schema([("input", pa.string()), ("key", pa.string()), ("reason", pa.string())])


def stem(rel: str) -> str:
    """A file's key: its relative path without the extension."""
    return str(PurePosixPath(rel).with_suffix(""))


def split_of(rel: str) -> str:
    """Top-level folders named train/val/test set the split; anything else is 'train'."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 and parts[0] in SPLITS else "train"


def sort_key(split: str, key: str) -> list:
    return [SPLIT_ORDER.get(split, len(SPLITS)), key]


@dataclass
class Part:
    """Rows `first` .. `first + count − 1` of a listing. `source`: an Arrow table's ObjectRef, a
    Parquet file's location, or a TM-dSprites spec {"tmds": [split, lo, hi]}; `lo`/`hi`: the sort
    keys of its first and last rows (for merge joins with another listing)."""
    source: object
    first: int
    count: int
    lo: list | None = None
    hi: list | None = None


@dataclass
class Listing:
    parts: list[Part]
    splits: dict[str, list[int]]                 # split → [first index, last index + 1]
    duplicates: list = field(default_factory=list)   # tables (input, key, reason), ObjectRefs or locations
    n_duplicates: int = 0
    saved_in: str | None = None                  # the folder it was read from (`load`)

    @property
    def total(self) -> int:
        return self.parts[-1].first + self.parts[-1].count if self.parts else 0

    def overlapping(self, lo: list, hi: list) -> list[Part]:
        """The parts whose sort-key range meets [lo, hi]."""
        return [p for p in self.parts if p.count and not (p.hi < lo or p.lo > hi)]


def table(source, first: int = 0) -> pa.Table:
    """A part's rows, whatever its source (an ObjectRef given to a task arrives as the table)."""
    if isinstance(source, pa.Table):
        return source
    if isinstance(source, dict):
        split, lo, hi = source["tmds"]
        idx = np.arange(lo, hi, dtype=np.int64)
        return pa.table({"key": pa.array([f"{split}/{i:07d}" for i in idx], pa.string()),
                         "split": pa.array([split] * len(idx), pa.string()),
                         "tmds_index": idx, "index": np.arange(first, first + len(idx), dtype=np.int64)})
    if isinstance(source, str):
        import pyarrow.parquet as pq
        fs, path = locations.resolve(source)
        return pq.read_table(path, filesystem=fs)
    import ray
    return ray.get(source)


def duplicates_table(source) -> pa.Table:
    return table(source) if not isinstance(source, dict) else DUPLICATE_SCHEMA.empty_table()


# ---- folders --------------------------------------------------------------------------------------
DIRS = "_dirs"                 # file mode: one table per directory, deleted once the parts are written
ROW_GROUP = 8192               # rows per row group of a directory's table: a part reads only its slice


def _list_directory(root: str, rel: str) -> tuple[dict, pa.Table, pa.Table]:
    """One directory: (its file count and sub-folders with their place among the file stems, its
    files as (key, path) in key order, its duplicate keys as (input, key, reason))."""
    folder = locations.join(root, rel) if rel else root
    names, folders = locations.entries(folder)
    prefix = f"{rel}/" if rel else ""
    seen: dict[str, str] = {}
    dups = {"input": [], "key": [], "reason": []}
    for name in names:                           # by file name: the first of a colliding key wins
        key = prefix + stem(name)
        if key in seen:
            dups["input"].append(locations.join(folder, name))
            dups["key"].append(key)
            dups["reason"].append(f"duplicate key {key!r}")
        else:
            seen[key] = locations.join(folder, name)
    keys = sorted(seen)
    stems = [k[len(prefix):] for k in keys]
    subs = sorted(folders, key=lambda f: f + "/")
    summary = {"count": len(keys), "duplicates": len(dups["key"]),
               "folders": [[f, bisect.bisect_left(stems, f + "/")] for f in subs]}
    files = pa.table({"key": pa.array(keys, pa.string()), "path": pa.array([seen[k] for k in keys], pa.string())})
    return summary, files, pa.table(dups, schema=DUPLICATE_SCHEMA)


def _list_directory_to(root: str, rel: str, folder: str) -> dict:
    """File mode: the directory's tables written under `folder/_dirs/` (its files in row groups of
    ROW_GROUP), only the summary returned, naming them: nothing per file reaches the driver."""
    import hashlib
    summary, files, dups = _list_directory(root, rel)
    name = hashlib.sha1(rel.encode()).hexdigest()[:24]
    summary["files"] = summary["dups"] = None
    if files.num_rows:
        summary["files"] = locations.join(folder, DIRS, f"{name}.parquet")
        _write_table(files, summary["files"], row_group_size=ROW_GROUP)
    if dups.num_rows:
        summary["dups"] = locations.join(folder, f"duplicates-{name}.parquet")
        _write_table(dups, summary["dups"])
    return summary


def _join_slices(first: int, splits: list[str], tables) -> tuple[dict, pa.Table]:
    """A listing part from directory tables already cut to their slices, each with its split, in
    order, with its dense `index` from `first`; and its sort-key range."""
    pieces = []
    for split, t in zip(splits, tables):
        pieces.append(t.append_column("split", pa.array([split] * t.num_rows, pa.string())))
    out = pa.concat_tables(pieces)
    out = out.append_column("index", pa.array(np.arange(first, first + out.num_rows), pa.int64()))
    ends = [out.slice(i, 1).to_pylist()[0] for i in (0, out.num_rows - 1)]
    return {"lo": sort_key(ends[0]["split"], ends[0]["key"]), "hi": sort_key(ends[1]["split"], ends[1]["key"])}, out


def _assemble(first: int, slices: list[tuple[int, int, str]], *tables: pa.Table) -> tuple[dict, pa.Table]:
    """In-memory mode: a part from slices of directory tables held in the object store."""
    return _join_slices(first, [s for _, _, s in slices],
                        [t.slice(lo, hi - lo) for (lo, hi, _), t in zip(slices, tables)])


def _assemble_to(first: int, slices: list[tuple[int, int, str]], files: list[str], out: str) -> dict:
    """File mode: a part from slices of the directories' files, reading only their row groups,
    written to `out`; returns its sort-key range."""
    from pipelines.lib.parquet_store import read_rows
    meta, table = _join_slices(first, [s for _, _, s in slices],
                               [read_rows(f, lo, hi) for (lo, hi, _), f in zip(slices, files)])
    _write_table(table, out)
    return meta


def list_folder(root: str, *, rows: int = 2000, concurrency: int = 256, folder: str | None = None) -> Listing:
    """The listing of every file under `root` (a folder or a URI). Needs Ray; OSError (raised in
    the task that met it) when a directory cannot be listed.

    With `folder` (a location every task can reach, e.g. a stage's staging folder), the listing is
    written there as `save` writes one, by the tasks themselves, and read back: the driver holds a
    few numbers per directory and part, whatever the corpus. Without it, the directories' and the
    parts' tables stay in the object store (owned by the driver; a table under Ray's inline limit,
    ~100 KB, is held in the driver's own memory)."""
    import ray
    if folder is None:
        lister = ray.remote(num_cpus=0.25, num_returns=3, max_retries=3)(_list_directory)
    else:
        lister = ray.remote(num_cpus=0.25, max_retries=3)(_list_directory_to)
    tree: dict[str, tuple[dict, object]] = {}
    duplicates, n_dup = [], 0
    todo, running = [""], {}
    while todo or running:
        while todo and len(running) < concurrency:
            rel = todo.pop()
            if folder is None:
                summary, files, dups = lister.remote(root, rel)
            else:
                summary, files, dups = lister.remote(root, rel, folder), None, None
            running[summary] = (rel, files, dups)
        (ready,), _ = ray.wait(list(running), num_returns=1)
        rel, files, dups = running.pop(ready)
        summary = ray.get(ready)
        if folder is not None:
            files, dups = summary.pop("files"), summary.pop("dups")
        tree[rel] = (summary, files)
        if summary["duplicates"]:
            duplicates.append(dups)
            n_dup += summary["duplicates"]
        todo += [f"{rel}/{f}" if rel else f for f, _ in summary["folders"]]

    def walk(rel: str, split: str, top: bool = False):
        summary, files = tree[rel]
        prev = 0
        for name, pos in summary["folders"]:
            if top and name in ("val", "test"):
                continue
            if pos > prev:
                yield files, prev, pos, split
            yield from walk(f"{rel}/{name}" if rel else name, split)
            prev = pos
        if summary["count"] > prev:
            yield files, prev, summary["count"], split

    top = {name for name, _ in tree[""][0]["folders"]}
    segments = [*walk("", "train", top=True), *(seg for s in ("val", "test") if s in top for seg in walk(s, s))]
    listing = _cut(segments, rows, duplicates, n_dup, folder)
    if folder is None:
        return listing
    _write_index(folder, listing, [p.source for p in listing.parts], listing.duplicates)
    try:
        locations.delete(locations.join(folder, DIRS))
    except OSError:
        pass                                             # only space: nothing reads them again
    return load(folder)


def _cut(segments, rows: int, duplicates: list, n_dup: int, folder: str | None = None) -> Listing:
    """Parts of at most `rows` rows from ordered segments (table ref or file, lo, hi, split); in
    file mode each part is written to `folder/part-XXXXX.parquet` by the task that assembles it."""
    import ray
    if folder is None:
        assemble = ray.remote(num_cpus=0.25, num_returns=2)(_assemble)
    else:
        assemble = ray.remote(num_cpus=0.25, max_retries=3)(_assemble_to)
    launched, first, splits = [], 0, {}
    slices, refs, n = [], [], 0

    def flush():
        nonlocal slices, refs, n, first
        if n:
            if folder is None:
                launched.append((*assemble.remote(first, slices, *refs), first, n))
            else:
                out = locations.join(folder, f"part-{len(launched):05d}.parquet")
                launched.append((assemble.remote(first, slices, refs, out), out, first, n))
            first += n
        slices, refs, n = [], [], 0
    for files, lo, hi, split in segments:
        a, b = splits.get(split, [first + n, first + n])
        splits[split] = [a, b + hi - lo]
        while lo < hi:
            take = min(hi - lo, rows - n)
            slices.append((lo, lo + take, split))
            refs.append(files)
            n, lo = n + take, lo + take
            if n == rows:
                flush()
    flush()
    parts = []
    for meta, out, start, count in launched:
        m = ray.get(meta)
        parts.append(Part(out, start, count, m["lo"], m["hi"]))
    return Listing(parts, splits, duplicates, n_dup)


# ---- records (benchmark layouts) and the generator ------------------------------------------------
def from_records(records: list[dict], rows: int = 2000) -> Listing:
    """A listing of records (dicts with at least key, split, path) built on the driver: the first
    record of a key (in the given order) wins, the rest are duplicates; parts go to the object store."""
    import ray
    seen, unique, dups = set(), [], {"input": [], "key": [], "reason": []}
    for r in records:
        if r["key"] in seen:
            dups["input"].append(r.get("path") or r["key"])
            dups["key"].append(r["key"])
            dups["reason"].append(f"duplicate key {r['key']!r}")
        else:
            seen.add(r["key"])
            unique.append({k: v for k, v in r.items() if k != "index"})
    unique.sort(key=lambda r: sort_key(r["split"], r["key"]))
    parts, splits = [], {}
    for i, r in enumerate(unique):
        a, b = splits.get(r["split"], [i, i])
        splits[r["split"]] = [a, b + 1]
    for first in range(0, len(unique), rows):
        chunk = unique[first:first + rows]
        t = pa.Table.from_pylist(chunk)
        t = t.append_column("index", pa.array(np.arange(first, first + len(chunk)), pa.int64()))
        parts.append(Part(ray.put(t), first, len(chunk), sort_key(chunk[0]["split"], chunk[0]["key"]),
                          sort_key(chunk[-1]["split"], chunk[-1]["key"])))
    dup_refs = [ray.put(pa.table(dups, schema=DUPLICATE_SCHEMA))] if dups["key"] else []
    return Listing(parts, splits, dup_refs, len(dups["key"]))


def tm_dsprites(train: int, test: int, rows: int = 2000) -> Listing:
    """The generator's keys (train/0000000, …, test/0000000, …) as a listing; no task, no file."""
    parts, first = [], 0
    for split, n in (("train", train), ("test", test)):
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            parts.append(Part({"tmds": [split, lo, hi]}, first, hi - lo, sort_key(split, f"{split}/{lo:07d}"),
                              sort_key(split, f"{split}/{hi - 1:07d}")))
            first += hi - lo
    return Listing(parts, {s: r for s, r in (("train", [0, train]), ("test", [train, train + test])) if r[1] > r[0]})


# ---- persisting a listing, so that a resumed job sees the very same inputs -------------------------
def _write_table(t: pa.Table, location: str, row_group_size: int | None = None) -> None:
    import pyarrow.parquet as pq
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, row_group_size=row_group_size)
    locations.write_bytes(location, sink.getvalue().to_pybytes())


def _write_index(folder: str, listing: Listing, names: list[str], duplicates: list[str]) -> None:
    """`folder/_listing.json`, written last: a listing is there once its index is."""
    def base(location: str) -> str:                     # every file named here lies in `folder`
        return str(location).rstrip("/").rsplit("/", 1)[-1]
    index = {"parts": [{"name": base(n), "first": p.first, "count": p.count, "lo": p.lo, "hi": p.hi}
                       for n, p in zip(names, listing.parts)],
             "duplicates": [base(d) for d in duplicates],
             "n_duplicates": listing.n_duplicates, "splits": listing.splits}
    locations.write_text(locations.join(folder, INDEX_FILE), json.dumps(index))


def save(listing: Listing, folder: str) -> Listing:
    """Write the parts as `folder/part-XXXXX.parquet` (one task each), the duplicates, and
    `folder/_listing.json` last; returns the listing read back from there (a listing that
    `list_folder` already wrote there is returned as it is)."""
    import ray
    if listing.saved_in == folder:
        return listing
    writer = ray.remote(num_cpus=0.25)(lambda src, first, loc: _write_table(table(src, first), loc))
    names = [f"part-{k:05d}.parquet" for k in range(len(listing.parts))]
    waits = [writer.remote(p.source, p.first, locations.join(folder, n)) for p, n in zip(listing.parts, names)]
    dup_names = [f"duplicates-{k:05d}.parquet" for k in range(len(listing.duplicates))]
    waits += [writer.remote(d, 0, locations.join(folder, n)) for d, n in zip(listing.duplicates, dup_names)]
    ray.get(waits)
    _write_index(folder, listing, names, dup_names)
    return load(folder)


def load(folder: str) -> Listing | None:
    """A listing saved by `save`, or None when there is none (or it was never finished)."""
    index_file = locations.join(folder, INDEX_FILE)
    if not locations.exists(index_file):
        return None
    index = json.loads(locations.read_text(index_file))
    parts = [Part(locations.join(folder, p["name"]), p["first"], p["count"], p["lo"], p["hi"]) for p in index["parts"]]
    return Listing(parts, index["splits"], [locations.join(folder, n) for n in index["duplicates"]],
                   index["n_duplicates"], saved_in=folder)
