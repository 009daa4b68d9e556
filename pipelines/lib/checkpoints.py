"""Training checkpoints whose cost is what changed, read and verified only by who needs it.

A checkpoint folder (Ray Train merges the ranks' folders into one in the run's storage):

    state.pt                         rank 0: model + optimiser states + iteration
    config.json, meta.json           rank 0: resolved config; iteration, world size, run ids
    rank-r00001-of-00002.pt          rank r: its Langevin-noise generator state
    shard-r00001-of-00002.json       rank r, written last: sha256 of its files, its id ranges and
                                     the chain files that make up its chains at this iteration

The persistent chains do not travel with the checkpoint folder: each rank appends them to its own
chain log in the run folder, `<run>/chains/w00002-r00001/{posterior,prior}/`, as a *base* (every
chain of the shard) followed by *deltas* (the chains that changed since the previous write). A
checkpoint's record lists the base and deltas (with their sha256) whose replay gives its chains,
so writing a checkpoint costs the chains touched since the last one; a new base is written when
the deltas since the last base would outweigh it, so reading one back costs at most about two
shards. Files no kept checkpoint names are deleted by the rank that owns them. Without a run
folder (`write_shard(…, run=None)`, tests and tools) the chains are one base inside the
checkpoint folder.

Who reads what. A model (segment, distill, tune, the pyfunc export) reads meta.json, rank 0's
record, config.json and state.pt and verifies those two against the record; never a chain. A
restoring rank reads every rank's record (small), the model files and the chain files of the
ranks whose id ranges overlap its own (its own, with the same number of workers), verifying each
file it reads as it reads it; ranks agree to fall back to an older checkpoint when any of them
finds a file damaged. `--from-chains` reads the chains of the ranks that hold the asked ids. The
chain readers are pipelines/lib/chain_reader.py.

Every file is written under a temporary name and renamed into place (one object on object
stores); a rank's `shard-*.json` exists only once its files are complete, and a checkpoint is
complete only when all ranks' records exist. A write that fails (disk full) removes its temporary
file and raises CheckpointError naming the file. Everything loads through `safe_load`
(`torch.load(weights_only=True)`): tensors, numbers and strings only; a file whose pickle would
build any other object is refused, and nothing in it runs. Checkpoints live in a local folder or
on an object store (pipelines/lib/locations.py); nothing is downloaded that is not read.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import uuid
from pathlib import Path
from typing import Callable

import torch

from drc_core.chains import InMemoryChainBuffer
from drc_core.config import ConfigError, DRCConfig
from pipelines.lib import locations
from pipelines.lib.errors import os_reason

BUFFERS = ("posterior", "prior")


class CheckpointError(RuntimeError):
    pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write(location: str, data: bytes) -> str:
    """Write the whole file (pipelines.lib.locations.write_bytes: temporary name renamed into place
    locally, one object on object stores), fsync'd locally; its sha256. On failure (e.g. no space
    left) nothing is left under the name or a temporary one, and CheckpointError names the file."""
    try:
        if locations.is_uri(location):
            locations.write_bytes(location, data)
        else:
            path = Path(location)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise CheckpointError(f"{location}: cannot write the checkpoint file ({os_reason(exc)})") from exc
    return _sha256(data)


def read_verified(location: str, digest: str | None = None) -> bytes:
    """A checkpoint file's bytes, checked against its sha256 when given."""
    try:
        data = locations.read_bytes(location)
    except FileNotFoundError:
        raise CheckpointError(f"{location}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{location}: cannot read it ({os_reason(exc)})") from None
    if digest is not None and _sha256(data) != digest:
        raise CheckpointError(f"{location}: checksum mismatch (corrupted or partly written)")
    return data


def safe_load(path, map_location: str | torch.device = "cpu", data: bytes | None = None):
    """`torch.load(weights_only=True)` with clear errors: a file whose pickle would build anything
    but tensors, numbers, strings and containers (an object whose unpickling runs code) is
    refused, a damaged file is reported as such; both as CheckpointError naming the file. `data`:
    the file's bytes, already read (and verified)."""
    try:
        source = io.BytesIO(data) if data is not None else path
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported (?:global: GLOBAL \S+|operand \d+)", str(exc))
        raise CheckpointError(
            f"{path}: refused: the file holds pickled Python objects that are not plain tensors, "
            f"numbers or strings ({found.group(0) if found else 'not a weights-only pickle'}); it was "
            f"not loaded and nothing in it ran. Only load files from a source you trust.") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: "
                              f"{first[0] if first else ''}); the file is damaged or not a torch file") from None


def _shard_name(kind: str, rank: int, world: int, ext: str) -> str:
    return f"{kind}-r{rank:05d}-of-{world:05d}.{ext}"


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's values (used to prove chains were restored bit for bit)."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def parent(location: str) -> str:
    """The folder a checkpoint folder sits in: the run folder."""
    return str(location).rstrip("/").rsplit("/", 1)[0]


# ---- the chain log: a rank's chains as a base and deltas in the run folder ------------------------
class ChainLog:
    """One rank's chain files under `<run>/chains/w<world>-r<rank>/<buffer>/`, and the list of them
    (base first) that gives its chains now. Each entry: {"file": path relative to the run folder,
    "sha256", "rows", "kind": "base" | "delta", "bytes"}."""

    def __init__(self, run: str, rank: int, world: int):
        self.run, self.rank, self.world = run, rank, world
        self.folder = f"chains/w{world:05d}-r{rank:05d}"
        self.entries: dict[str, list[dict]] = {b: [] for b in BUFFERS}

    def adopt(self, record: dict) -> None:
        """Continue from a restored checkpoint of the same world size: its entries are this log's."""
        if record.get("chains") and record["world_size"] == self.world and record["rank"] == self.rank \
                and all(e.get("in_run") for b in BUFFERS for e in record["chains"][b]):
            self.entries = {b: list(record["chains"][b]) for b in BUFFERS}

    def write(self, name: str, buf: InMemoryChainBuffer, iteration: int) -> list[dict]:
        """Append `buf`'s changes (or a new base) to the log; its entries now."""
        entries = self.entries[name]
        since_base = sum(e["rows"] for e in entries[1:])
        if not entries or since_base + buf.n_changed >= len(buf):
            payload, kind = buf.state_dict(), "base"
            buf.mark_saved()
        else:
            payload, kind = buf.take_changed(), "delta"
        data = _torch_bytes(payload)
        rel = f"{self.folder}/{name}/{kind}-{iteration:08d}-{uuid.uuid4().hex[:8]}.pt"
        entry = {"file": rel, "sha256": _write(locations.join(self.run, rel), data), "rows": int(payload["ids"].numel()),
                 "kind": kind, "bytes": len(data), "in_run": True}
        self.entries[name] = [entry] if kind == "base" else [*entries, entry]
        return list(self.entries[name])

    def collect_garbage(self) -> int:
        """Delete this rank's chain files that neither this log nor any checkpoint still in the run
        folder names; rank 0 also deletes the logs of other world sizes no kept checkpoint uses.
        Returns the number of files deleted."""
        keep = {e["file"] for b in BUFFERS for e in self.entries[b]}
        worlds = {self.world}
        for folder in locations.subfolders(self.run, "checkpoint_"):
            try:
                meta = json.loads(locations.read_text(locations.join(folder, "meta.json")))
                worlds.add(int(meta["world_size"]))
                rec = json.loads(locations.read_text(locations.join(
                    folder, _shard_name("shard", self.rank, self.world, "json"))))
            except (OSError, ValueError, KeyError):
                continue
            keep |= {e["file"] for b in BUFFERS for e in (rec.get("chains") or {}).get(b, [])}
        deleted = 0
        for b in BUFFERS:
            try:
                listed = locations.list_files(locations.join(self.run, self.folder, b))
            except OSError:
                continue
            for rel, loc in listed:
                if f"{self.folder}/{b}/{rel}" not in keep:
                    locations.delete(loc)
                    deleted += 1
        if self.rank == 0:
            for other in locations.subfolders(locations.join(self.run, "chains"), "w"):
                w = other.rstrip("/").rsplit("/", 1)[-1]
                if re.fullmatch(r"w\d{5}-r\d{5}", w) and int(w[1:6]) not in worlds:
                    locations.delete(other)
        return deleted


def write_shard(folder: str | Path, *, rank: int, world_size: int, state, meta: dict, run: str | None = None,
                log: ChainLog | None = None, chains: bool = True, node: str | None = None,
                before_commit: Callable[[], None] | None = None) -> dict:
    """Write this rank's part of a checkpoint of `state` (a drc_core TrainState) into `folder`, its
    chains into `log` (its run folder's chain log) or, without one, into `folder`; `chains=False`
    keeps none (tune trials). `before_commit` runs after the data files and before the shard record
    (fault drills). Returns the record."""
    folder = str(folder)
    files = {}
    rank_file = _shard_name("rank", rank, world_size, "pt")
    files[rank_file] = _write(locations.join(folder, rank_file), _torch_bytes({"generator": state.generator.get_state().cpu()}))
    if rank == 0:
        files["state.pt"] = _write(locations.join(folder, "state.pt"), _torch_bytes(state.state_dict()))
        files["config.json"] = _write(locations.join(folder, "config.json"), state.cfg.to_json().encode())
        full_meta = {**meta, "iteration": state.iteration, "world_size": world_size}
        files["meta.json"] = _write(locations.join(folder, "meta.json"), json.dumps(full_meta).encode())
    record_chains, written = None, 0
    if chains:
        record_chains = {}
        for name, buf in (("posterior", state.chains), ("prior", state.prior_chains)):
            if log is not None:
                record_chains[name] = log.write(name, buf, state.iteration)
                written += record_chains[name][-1]["bytes"]
            else:
                data = _torch_bytes(buf.state_dict())
                rel = _shard_name(f"chains-{name}", rank, world_size, "pt")
                record_chains[name] = [{"file": rel, "sha256": _write(locations.join(folder, rel), data),
                                        "rows": len(buf), "kind": "base", "bytes": len(data), "in_run": False}]
                written += len(data)
    if before_commit is not None:
        before_commit()
    ids, prior = state.chains.ids, state.prior_chains.ids
    record = {"rank": rank, "world_size": world_size, "iteration": state.iteration, "files": files,
              "rank_file": rank_file, "chains": record_chains, "chain_bytes_written": written, "node": node,
              "count": int(ids.numel()),
              "id_min": int(ids.min()) if ids.numel() else None,
              "id_max": int(ids.max()) if ids.numel() else None,
              "prior_min": int(prior.min()) if prior.numel() else None,
              "prior_max": int(prior.max()) if prior.numel() else None,
              "posterior_digest": tensor_digest(state.chains.z)}
    _write(locations.join(folder, _shard_name("shard", rank, world_size, "json")),
           json.dumps(record, indent=1).encode())
    return record


# ---- reading -------------------------------------------------------------------------------------
def _read_json(location: str, keys: tuple[str, ...], data: bytes | None = None) -> dict:
    """A checkpoint's JSON record; a truncated or garbled one (an interrupted copy into storage
    leaves empty files) is a CheckpointError naming it."""
    try:
        data = json.loads(data if data is not None else read_verified(location))
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise ValueError(f"missing {[k for k in keys if not isinstance(data, dict) or k not in data]}")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{location}: unreadable record ({exc}): damaged or partly written") from None


def records(folder: str | Path) -> tuple[dict, list[dict]]:
    """(meta, every rank's record) of a complete checkpoint, reading those small files only;
    CheckpointError when it is not a checkpoint or a rank never finished writing."""
    folder = str(folder)
    meta_file = locations.join(folder, "meta.json")
    if not locations.exists(meta_file):
        raise CheckpointError(f"{folder}: no meta.json (not a DRC checkpoint, or an incomplete write)")
    meta = _read_json(meta_file, ("world_size", "iteration"))
    world = int(meta["world_size"])
    out = []
    for rank in range(world):
        loc = locations.join(folder, _shard_name("shard", rank, world, "json"))
        if not locations.exists(loc):
            raise CheckpointError(f"{folder}: rank {rank} of {world} never finished writing "
                                  f"({_shard_name('shard', rank, world, 'json')} missing)")
        out.append(_read_json(loc, ("files", "rank", "rank_file")))
    return meta, out


def read_rank_file(folder: str, rec: dict, name: str) -> bytes:
    """A file of `rec`'s rank in the checkpoint folder, verified."""
    return read_verified(locations.join(folder, name), rec["files"][name])


def chain_location(folder: str, entry: dict) -> str:
    return locations.join(parent(folder) if entry.get("in_run") else folder, entry["file"])


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[dict, DRCConfig, dict]:
    """(meta, config, state dict with model + optimisers + iteration), reading and verifying the
    model files only — no chain is read."""
    folder = str(folder)
    meta, recs = records(folder)
    cfg = DRCConfig.from_dict(json.loads(read_rank_file(folder, recs[0], "config.json")))
    state = safe_load(locations.join(folder, "state.pt"), device, data=read_rank_file(folder, recs[0], "state.pt"))
    return meta, cfg, state


def model_intact(folder: str | Path) -> tuple[dict, list[dict]]:
    """`records`, after checking the model files against rank 0's record (the cheap check of which
    checkpoint to start from: chain files are verified by the rank that loads them)."""
    meta, recs = records(folder)
    for name in ("config.json", "state.pt", "meta.json"):
        read_rank_file(str(folder), recs[0], name)
    return meta, recs


def verify(folder: str | Path) -> tuple[dict, list[dict]]:
    """Check every file of a checkpoint, chains included (tests and tools; jobs verify what they
    read instead); return (meta, records)."""
    folder = str(folder)
    meta, recs = records(folder)
    for rec in recs:
        for name in rec["files"]:
            read_rank_file(folder, rec, name)
        for b in BUFFERS:
            for e in (rec.get("chains") or {}).get(b, []):
                read_verified(chain_location(folder, e), e["sha256"])
    return meta, recs


def candidates(run_dir: str | Path | None) -> list[str]:
    """The run's `checkpoint_*` folders, newest first (a local folder or a URI)."""
    if run_dir is None or not locations.exists(str(run_dir)):
        return []
    return list(reversed(locations.subfolders(str(run_dir), "checkpoint_")))


def latest(run_dir: str | Path | None) -> str | None:
    """The newest complete `checkpoint_*` folder of a run whose model files are intact, or None."""
    for folder in candidates(run_dir):
        try:
            model_intact(folder)
            return folder if locations.is_uri(folder) else Path(folder)
        except CheckpointError as e:
            print(f"skipping {folder}: {e}", flush=True)
    return None


def load_config(folder: str | Path) -> DRCConfig:
    """The resolved config saved with a checkpoint (a local folder or a URI: only config.json is read)."""
    return DRCConfig.from_dict(json.loads(locations.read_text(locations.join(str(folder), "config.json"))))


def check_compatible(saved: DRCConfig, now: DRCConfig, where: str) -> None:
    """Resuming needs the same preset and architecture: fail fast naming the first differing field."""
    if saved.preset != now.preset:
        raise ConfigError(f"preset is {now.preset!r} but the checkpoint {where} was trained with preset "
                          f"{saved.preset!r}: resume with --preset {saved.preset}")
    a, b = saved.to_dict()["model"], now.to_dict()["model"]
    for key in a:
        if a[key] != b.get(key):
            raise ConfigError(f"model.{key} is {b.get(key)!r} but the checkpoint {where} was trained "
                              f"with {a[key]!r}: resume with the same model settings")
    if saved.langevin.prior_pool_size != now.langevin.prior_pool_size:
        raise ConfigError(f"langevin.prior_pool_size is {now.langevin.prior_pool_size} but the "
                          f"checkpoint {where} has {saved.langevin.prior_pool_size}")


def load_state(folder: str | Path, device: str | torch.device = "cpu") -> dict:
    return load_model(folder, device)[2]
