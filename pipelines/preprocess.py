"""Ray Data: image corpora (or the TM-dSprites generator) → sharded, validated Parquet.

    python -m pipelines.preprocess --source tm-dsprites --preset cpu-32 --out data/tmds-32
    python -m pipelines.preprocess --source folder --input photos/ [--masks masks/] --resolution 64 --out data/photos
    python -m pipelines.preprocess --source cub --input CUB_200_2011/ --crop box --resolution 128 --out data/cub
    python -m pipelines.preprocess --source folder --input s3://bucket/photos/ --resolution 64 --out s3://bucket/data/photos

Inputs and outputs are folders or URIs (pipelines/lib/locations.py: credentials and endpoint from
the environment, e.g. AWS_* and AWS_ENDPOINT_URL for an S3-compatible store).

Listing, decoding, cropping/resizing, validation and writing all run as Ray tasks. A folder is
listed one directory per task (pipelines/lib/listing.py) into parts of `--rows-per-file` inputs in
(split, key) order; each part is decoded by one task and written as one Parquet part as soon as
its first dense `sample_id` is known (the good rows of the parts before it), so the corpus is
never gathered anywhere and the driver holds one small summary per part. Output:
`part-XXXXX.parquet` files + `_manifest.json` (counts from the written parts, each part's sample-id
range, each split's id range), written to a hidden folder renamed into place at the end (local)
or in place with the manifest last (object stores). Bad inputs are quarantined with a reason as
rows of `_quarantine/` (the manifest names the first 1,000); the job completes. A killed job is
continued by `--resume`: finished parts are kept and the same inputs get the same ids.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.lib import listing, locations, sources
from pipelines.lib.imaging import CROPS, MAX_PIXELS
from pipelines.lib.parquet_store import DatasetError, DatasetExists, Output, part_metadata, write_table
from pipelines.lib.records import Options, process_record

def check_inputs(args) -> None:
    """Fail before Ray starts when --input (or --masks) is missing or cannot be read."""
    if args.source == "tm-dsprites":
        return
    if not args.input:
        raise sources.SourceError(f"--input is required for source {args.source!r}")
    if args.source == "folder":
        sources.need(args.input, "input folder")
        if args.masks:
            sources.need(args.masks, "mask folder")


def listing_maker(args, rows: int):
    """A function that lists the inputs (it needs Ray) into the folders `where(name)` names:
    (listing, mask listing or None)."""
    def make(where):
        if args.source == "tm-dsprites":
            return listing.tm_dsprites(args.train, args.test, rows), None
        if args.source == "folder":
            masks = listing.list_folder(args.masks, rows=rows, folder=where("_listing_masks")) if args.masks else None
            return listing.list_folder(args.input, rows=rows, folder=where("_listing")), masks
        records = {"cub": lambda: sources.cub(args.input),
                   "stanford-dogs": lambda: sources.stanford_dogs(args.input, args.masks),
                   "stanford-cars": lambda: sources.stanford_cars(args.input, args.masks),
                   "clevr-masks": lambda: sources.clevr_masks(args.input)}[args.source]()
        return listing.from_records(records, rows), None
    return make


RESULT_SCHEMA = pa.schema([("key", pa.string()), ("split", pa.string()), ("image", pa.binary()),
                           ("mask", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
                           ("status", pa.string()), ("reason", pa.string()), ("input", pa.string())])
PART_SCHEMA = pa.schema([("sample_id", pa.int64()), *(f for f in RESULT_SCHEMA if f.name not in ("status", "reason", "input"))])
QUARANTINE_SCHEMA = pa.schema([("input", pa.string()), ("key", pa.string()), ("split", pa.string()),
                               ("status", pa.string()), ("reason", pa.string())])
QUARANTINE = "_quarantine"
EXAMPLES = 1000                      # quarantined / filtered inputs listed in the manifest (all are in _quarantine/)


def _records(t: pa.Table, masks: dict[str, str] | None) -> list[dict]:
    """Listing rows as process_record's records (folder listings have no boxes; masks joined by key)."""
    recs = t.to_pylist()
    for r in recs:
        r.setdefault("path", "")
        r["index"] = r.pop("tmds_index", -1)
        if masks is not None:
            r["mask_path"] = masks.get(r["key"], "")
        r.setdefault("mask_path", "")
        for k in ("box_x", "box_y", "box_w", "box_h"):
            r.setdefault(k, float("nan"))
    return recs


def _process_part(part, first: int, opt: Options, *mask_parts) -> tuple[dict, pa.Table]:
    """One listing part decoded, cropped and validated: ({"ok": rows kept}, every row with its status)."""
    masks = None
    if mask_parts:
        masks = {}
        for m in map(listing.table, mask_parts):
            masks.update(zip(m["key"].to_pylist(), m["path"].to_pylist()))
    rows = []
    for rec in _records(listing.table(part, first), masks):
        row = process_record(rec, opt)
        row["input"] = rec["path"] or rec["key"]
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    return {"ok": sum(r["status"] == "ok" for r in rows)}, table


def _write_part(k: int, offset: int, processed: pa.Table, folder: str) -> dict:
    """Part k: its good rows with sample ids offset, offset + 1, … (in listing order) as part-k, its
    bad ones in _quarantine/part-k (written first: a part file exists only once its part is whole).
    Returns the part's summary, also stored in its footer."""
    import ray
    ok = processed.filter(pc.equal(processed["status"], "ok"))
    bad = processed.filter(pc.not_equal(processed["status"], "ok"))
    name = f"part-{k:05d}.parquet"
    if bad.num_rows:
        write_table(bad.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA),
                    locations.join(folder, QUARANTINE, name))
    ids = np.arange(offset, offset + ok.num_rows, dtype=np.int64)
    data = pa.table([pa.array(ids, pa.int64()), *(ok[f.name] for f in PART_SCHEMA if f.name != "sample_id")],
                    schema=PART_SCHEMA)
    keys = ok["key"].to_pylist()
    h = hashlib.sha256()
    for i, key in zip(ids.tolist(), keys):
        h.update(f"{i}\t{key}\n".encode())
    statuses = bad["status"].to_pylist()
    summary = {"part": k, "name": name, "offset": offset, "rows": ok.num_rows,
               "id_min": offset if ok.num_rows else None, "id_max": offset + ok.num_rows - 1 if ok.num_rows else None,
               "per_split": {s: int(n) for s, n in zip(*np.unique(ok["split"].to_numpy(zero_copy_only=False),
                                                                  return_counts=True))} if ok.num_rows else {},
               "with_mask": int(ok.num_rows - ok["mask"].null_count), "inputs": processed.num_rows,
               "quarantined": statuses.count("quarantined"), "filtered": statuses.count("filtered"),
               "digest": h.hexdigest(), "node": ray.get_runtime_context().get_node_id()}
    summary["bytes"] = write_table(data, locations.join(folder, name), metadata=summary)
    return summary


def _rows_per_node(parts) -> dict[str, int]:
    """Inputs written per Ray node by this run."""
    out: dict[str, int] = {}
    for p in parts:
        out[p["node"]] = out.get(p["node"], 0) + p["inputs"]
    return dict(sorted(out.items()))


def _split_ranges(parts: list[dict]) -> dict[str, list[int]]:
    """Each split's [first id, last id + 1]: ids follow (split, key) order, so a split is one range."""
    out = {}
    for p in parts:
        at = p["offset"]
        for s in sorted(p["per_split"], key=lambda s: listing.SPLIT_ORDER.get(s, 9)):
            n = p["per_split"][s]
            out[s] = [out.get(s, [at])[0], at + n]
            at += n
    return out


def _examples(folder: str, names: list[str], duplicates: list) -> tuple[list[dict], list[dict]]:
    """Up to EXAMPLES quarantined and filtered inputs (in listing order, duplicates first)."""
    quarantine, filtered = [], []
    tables = [listing.duplicates_table(d) for d in duplicates]
    for name in names:
        if len(quarantine) >= EXAMPLES and len(filtered) >= EXAMPLES:
            break
        loc = locations.join(folder, QUARANTINE, name)
        if locations.exists(loc):
            tables.append(pq.read_table(locations.resolve(loc)[1], filesystem=locations.resolve(loc)[0]))
    for t in tables:
        for r in t.to_pylist():
            entry = {"input": r["input"], "key": r["key"], "reason": r["reason"]}
            target = filtered if r.get("status") == "filtered" else quarantine
            if len(target) < EXAMPLES:
                target.append(entry)
    return quarantine, filtered


def run(make_listing, opt: Options, out: str, **kwargs) -> dict:
    """Process the listing `make_listing(where)` returns ((listing, mask listing or None), listed into
    the folders `where(name)` names; called only when
    no saved listing is resumed) and publish the dataset at `out`; returns the manifest. A write that
    fails (a full disk) is a DatasetError naming `out`; what was written stays for --resume."""
    try:
        return _run(make_listing, opt, out, **kwargs)
    except (DatasetError, DatasetExists, sources.SourceError):
        raise
    except Exception as exc:
        from pipelines.lib.errors import find_cause, os_reason
        cause = find_cause(exc, OSError)
        if cause is None:
            raise
        kept = Output(out)
        raise DatasetError(f"{out}: cannot write the dataset ({os_reason(cause)}); "
                           + ("an existing dataset there is unchanged; " if kept.target.local else "")
                           + f"the parts written so far stay in {kept.folder} (--resume continues, --overwrite "
                             f"starts over)") from exc


def _run(make_listing, opt: Options, out: str, *, rows_per_file: int = 2000, overwrite: bool = False,
         resume: bool = False, description: dict | None = None, progress: bool = True,
         window: int | None = None) -> dict:
    """Dense ids in one pass: part k's ids start where part k − 1's good rows end, which is known only
    once part k − 1 is decoded. Parts are decoded `window` at a time (by default four per CPU); as
    each one's count of good rows arrives, in order, its write task starts with its first id, so
    decoding runs ahead while writes follow, and the driver holds one small summary per part."""
    import ray
    from pipelines.lib.ray_env import set_progress_bars
    t0 = time.perf_counter()
    set_progress_bars(ray.data.DataContext.get_current(), progress)
    output = Output(out)
    job = {"kind": "dataset", "source": {"kind": opt.source, **(description or {})}, "options": asdict(opt),
           "rows_per_file": rows_per_file}
    verdict = output.begin(job, resume=resume, overwrite=overwrite)
    if verdict == "complete":
        manifest = output.target.read_manifest()
        manifest["run"] = {"inputs_processed": 0, "parts_reused": len(manifest["parts"]), "seconds": 0.0}
        return manifest
    lists = [listing.load(output.file(f)) for f in ("_listing", "_listing_masks")] if verdict == "resume" else [None]
    if lists[0] is None:
        fresh, masks = make_listing(output.file)
        if not fresh.total:
            raise sources.SourceError("no inputs found")
        if masks is not None:
            masks = listing.save(masks, output.file("_listing_masks"))
        lists = [listing.save(fresh, output.file("_listing")), masks]
    inputs, masks = lists
    done = {}
    def finished(name: str) -> dict | None:
        meta = part_metadata(output.file(name))
        if meta:
            meta["bytes"] = output.staging.fs.get_file_info(f"{output.staging.path}/{name}").size
        return meta
    with ThreadPoolExecutor(16) as pool:                 # what an interrupted run finished (footers only)
        for meta in pool.map(finished, output.parts()):
            if meta:
                done[meta["part"]] = meta
    process = ray.remote(num_returns=2)(_process_part)
    write = ray.remote(num_cpus=0.25)(_write_part)
    window = window or max(2, 4 * int(ray.cluster_resources().get("CPU", 1)))
    queue, writes, summaries, offset, processed = deque(), [], {}, 0, 0

    def settle(every: bool) -> None:
        """Wait for every write in flight (`every`) or for one of them (blocking: no busy loop)."""
        nonlocal writes
        if not writes:
            return
        ready, writes = ray.wait(writes, num_returns=len(writes) if every else 1)
        for s in ray.get(ready):
            summaries[s["part"]] = s
    for k, part in enumerate(inputs.parts):
        if k in done:
            queue.append((k, None, None))
        else:
            mask_parts = masks.overlapping(part.lo, part.hi) if masks is not None else []
            queue.append((k, *process.remote(part.source, part.first, opt, *(m.source for m in mask_parts))))
            processed += part.count
        while sum(1 for q in queue if q[1] is not None) >= window or (k == len(inputs.parts) - 1 and queue):
            head, count_ref, table_ref = queue.popleft()
            if count_ref is None:
                meta = done[head]
                if meta["offset"] != offset:
                    raise DatasetError(f"{out}: --resume: part {head} of the interrupted run starts at sample id "
                                       f"{meta['offset']}, not {offset}: the inputs changed since; use --overwrite")
                summaries[head] = meta
                offset += meta["rows"]
                continue
            writes.append(write.remote(head, offset, table_ref, output.folder))
            offset += ray.get(count_ref)["ok"]
            while len(writes) > window:
                settle(False)
    settle(True)
    parts = [summaries[k] for k in range(len(inputs.parts))]
    quarantine, filtered = _examples(output.folder, [p["name"] for p in parts], inputs.duplicates)
    ok = sum(p["rows"] for p in parts)
    per_split = {}
    for p in parts:
        for s, n in p["per_split"].items():
            per_split[s] = per_split.get(s, 0) + n
    digest = hashlib.sha256("".join(p["digest"] for p in parts).encode()).hexdigest()
    listed = [p for p in parts if p["rows"]]
    manifest = {
        "created_unix": time.time(),
        "source": job["source"],
        "resolution": opt.size,
        "crop": opt.crop,
        "image_encoding": "raw uint8, row-major (height, width, 3)",
        "mask_encoding": "raw uint8 {0,1}, row-major (height, width); null when the input has none",
        "counts": {"inputs": inputs.total + inputs.n_duplicates, "ok": ok,
                   "quarantined": sum(p["quarantined"] for p in parts) + inputs.n_duplicates,
                   "filtered": sum(p["filtered"] for p in parts), "per_split": dict(sorted(per_split.items())),
                   "with_mask": sum(p["with_mask"] for p in parts)},
        "rows": ok,
        "files": len(listed),
        "file_names": [p["name"] for p in listed],
        "parts": [{"name": p["name"], "rows": p["rows"], "id_min": p["id_min"], "id_max": p["id_max"]} for p in listed],
        "splits": _split_ranges(listed),
        "rows_per_file_target": rows_per_file,
        "bytes": sum(p["bytes"] for p in parts),
        "nodes": _rows_per_node(p for p in parts if p["part"] not in done),
        "sample_id_checksum": digest,
        "quarantine": quarantine,
        "filtered": filtered,
        "quarantine_folder": QUARANTINE,
    }
    for name in (p["name"] for p in parts if not p["rows"]):     # empty parts only marked their part done
        locations.delete(output.file(name))
    for j, d in enumerate(inputs.duplicates):                    # duplicate keys: quarantined rows too
        t = listing.duplicates_table(d)
        t = t.append_column("split", pa.array([listing.split_of(k) for k in t["key"].to_pylist()], pa.string()))
        t = t.append_column("status", pa.array(["quarantined"] * t.num_rows, pa.string()))
        write_table(t.select(QUARANTINE_SCHEMA.names), output.file(f"{QUARANTINE}/duplicates-{j:05d}.parquet"))
    for f in ("_listing", "_listing_masks"):
        locations.delete(output.file(f))
    # the run that finished the dataset: what it did itself (the rest an interrupted run had written)
    manifest["run"] = {"inputs_processed": processed, "parts_reused": len(done), "seconds": time.perf_counter() - t0}
    return output.finish(manifest)


def summary_table(manifest: dict) -> str:
    c = manifest["counts"]
    lines = [f"{'split':<10}{'images':>10}", *(f"{s:<10}{n:>10}" for s, n in c["per_split"].items()),
             f"{'ok':<10}{c['ok']:>10}", f"{'quarant.':<10}{c['quarantined']:>10}",
             f"{'filtered':<10}{c['filtered']:>10}", f"{'inputs':<10}{c['inputs']:>10}"]
    for q in manifest["quarantine"][:20]:
        lines.append(f"  quarantined {q['input']}: {q['reason']}")
    more = c["quarantined"] - min(20, len(manifest["quarantine"]))
    if more > 0:
        lines.append(f"  … {more} more in {manifest['quarantine_folder']}/ of the dataset")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from drc_core.presets import get_config, preset_names
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=sources.SOURCES)
    p.add_argument("--input", help="dataset root, a folder or URI (s3://bucket/photos/, gs://…); not for tm-dsprites")
    p.add_argument("--masks", help="mask folder or URI matched by relative path/stem (folder, dogs, cars)")
    p.add_argument("--out", "--output", dest="out", required=True, help="output folder or URI (file://, s3://, gs://, …)")
    p.add_argument("--preset", default="cpu-32", choices=preset_names(), help="resolution and TM-dSprites settings")
    p.add_argument("--resolution", type=int, default=None, help="override the preset's resolution")
    p.add_argument("--crop", default=None, choices=CROPS, help="default: box where boxes exist, else center")
    p.add_argument("--margin", type=float, default=0.1, help="box crop margin, fraction of the box side")
    p.add_argument("--train", type=int, default=None, help="TM-dSprites train images (default: preset)")
    p.add_argument("--test", type=int, default=None, help="TM-dSprites test images (default: preset)")
    p.add_argument("--rows-per-file", type=int, default=2000)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="decompression-bomb limit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into --out: its finished parts are kept, the rest is done")
    p.add_argument("--address", default=None, help="Ray address (default: local, or the job's cluster)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the summary table is still printed)")
    args = p.parse_args(argv)
    from pipelines.lib.ray_env import ScratchPathError, check_job_outputs
    try:
        check_job_outputs("preprocess", {"--out": args.out})
    except ScratchPathError as exc:
        sys.exit(str(exc))

    cfg = get_config(args.preset)
    size = args.resolution or cfg.model.resolution
    args.train = cfg.data.train_size if args.train is None else args.train
    args.test = cfg.data.test_size if args.test is None else args.test
    crop = args.crop or ("box" if args.source in ("cub", "stanford-dogs", "stanford-cars") else "center")
    opt = Options(source=args.source, size=size, crop=crop, margin=args.margin, max_pixels=args.max_pixels,
                  bank_seed=cfg.data.bank_seed, sprite_size=tuple(cfg.data.sprite_size))
    desc = {"input": args.input, "masks": args.masks, "preset": args.preset}
    if args.source == "tm-dsprites":
        desc.update(train=args.train, test=args.test, bank_seed=cfg.data.bank_seed,
                    sprite_size=list(cfg.data.sprite_size))
    try:
        check_inputs(args)
        Output(args.out).check(resume=args.resume, overwrite=args.overwrite)   # before Ray starts
        from pipelines.lib.ray_env import init_ray
        init_ray(address=args.address, num_cpus=args.num_cpus)
        manifest = run(listing_maker(args, args.rows_per_file), opt, args.out, rows_per_file=args.rows_per_file,
                       overwrite=args.overwrite, resume=args.resume, description=desc, progress=not args.quiet)
    except (sources.SourceError, DatasetExists, DatasetError) as exc:   # no inputs, an existing dataset, a full disk
        sys.exit(f"preprocess: {exc}")
    except Exception as exc:
        from pipelines.lib.errors import find_cause
        clear = find_cause(exc, (sources.SourceError, DatasetError, OSError))
        if clear is None:
            raise
        failed = f"preprocess: {clear}"
    else:
        failed = None
    if failed:
        sys.exit(failed)
    print(summary_table(manifest))
    r = manifest["run"]
    print(f"wrote {manifest['counts']['ok']} rows in {manifest['files']} files to {args.out} in {r['seconds']:.1f} s"
          + (f" ({r['parts_reused']} parts kept from the interrupted run)" if r["parts_reused"] else ""))
    return manifest


if __name__ == "__main__":
    main()
