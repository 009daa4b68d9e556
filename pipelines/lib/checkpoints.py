"""Training checkpoints with sharded chains: every rank writes its own files, none gathers.

A checkpoint folder (Ray Train merges the ranks' folders into one in persistent storage):

    state.pt                         rank 0: model + optimiser states + iteration
    config.json, meta.json           rank 0: resolved config; iteration, world size, run ids
    chains-r00001-of-00002.pt        rank r: its posterior chains, its share of the prior pool
                                     (ids, z, visits) and its Langevin-noise generator state
    shard-r00001-of-00002.json       rank r, written last: sha256 of its files and the id range

Every file is written under a temporary name and renamed into place; a rank's `shard-*.json`
exists only once its files are complete, and a checkpoint is valid only when all ranks' shard
records exist and every checksum matches. A write that fails (disk full) removes its temporary
file and raises CheckpointError naming the file. Everything loads through `safe_load`
(`torch.load(weights_only=True)`): tensors, numbers and strings only; a file whose pickle would
build any other object is refused, and nothing in it runs. Restoring with another number of
workers reads only the shard files whose id range overlaps the new shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from drc_core.chains import InMemoryChainBuffer
from drc_core.config import ConfigError, DRCConfig
from pipelines.lib.errors import os_reason


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _replace_into(path: Path, write: Callable[[Path], None]) -> str:
    """Write through `write(tmp)`, fsync, rename to `path`; return the file's sha256. On failure
    (e.g. no space left) the temporary file is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise CheckpointError(f"{path}: cannot write the checkpoint file ({os_reason(exc)})") from exc
        raise
    os.replace(tmp, path)
    return _sha256(path)


def _torch_writer(obj) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        # through a Python file object a full disk raises OSError (ENOSPC) instead of torch's
        # opaque "enforce fail at inline_container.cc"
        with open(path, "wb") as f:
            torch.save(obj, f)
    return write


def safe_load(path: str | Path, map_location: str | torch.device = "cpu"):
    """`torch.load(weights_only=True)` with clear errors: a file whose pickle would build anything
    but tensors, numbers, strings and containers (an object whose unpickling runs code) is
    refused, a damaged file is reported as such; both as CheckpointError naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
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


def write_shard(folder: str | Path, *, rank: int, world_size: int, state, meta: dict,
                before_commit: Callable[[], None] | None = None) -> None:
    """Write this rank's part of a checkpoint of `state` (a drc_core TrainState) into `folder`.
    `before_commit` runs after the data files and before the shard record (fault drills)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    chains = _shard_name("chains", rank, world_size, "pt")
    files[chains] = _replace_into(folder / chains, _torch_writer({
        "posterior": state.chains.state_dict(), "prior": state.prior_chains.state_dict(),
        "generator": state.generator.get_state().cpu()}))
    if rank == 0:
        files["state.pt"] = _replace_into(folder / "state.pt", _torch_writer(state.state_dict()))
        files["config.json"] = _replace_into(folder / "config.json", lambda p: p.write_text(state.cfg.to_json()))
        full_meta = {**meta, "iteration": state.iteration, "world_size": world_size}
        files["meta.json"] = _replace_into(folder / "meta.json", lambda p: p.write_text(json.dumps(full_meta)))
    if before_commit is not None:
        before_commit()
    ids, prior = state.chains.ids, state.prior_chains.ids
    record = {"rank": rank, "world_size": world_size, "iteration": state.iteration, "files": files,
              "chains_file": chains, "count": int(ids.numel()),
              "id_min": int(ids.min()) if ids.numel() else None,
              "id_max": int(ids.max()) if ids.numel() else None,
              "prior_min": int(prior.min()) if prior.numel() else None,
              "prior_max": int(prior.max()) if prior.numel() else None,
              "posterior_digest": tensor_digest(state.chains.z)}
    _replace_into(folder / _shard_name("shard", rank, world_size, "json"),
                  lambda p: p.write_text(json.dumps(record, indent=1)))


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    """A checkpoint's JSON record; a truncated or garbled one (an interrupted copy into storage
    leaves empty files) is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise ValueError(f"missing {[k for k in keys if not isinstance(data, dict) or k not in data]}")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable record ({exc}): damaged or partly written") from None


def verify(folder: str | Path) -> tuple[dict, list[dict]]:
    """Check that a checkpoint is complete and intact; return (meta, shard records by rank)."""
    folder = Path(folder)
    if not (folder / "meta.json").exists():
        raise CheckpointError(f"{folder}: no meta.json (not a DRC checkpoint, or an incomplete write)")
    meta = _read_json(folder / "meta.json", ("world_size", "iteration"))
    world = int(meta["world_size"])
    records = []
    for rank in range(world):
        path = folder / _shard_name("shard", rank, world, "json")
        if not path.exists():
            raise CheckpointError(f"{folder}: rank {rank} of {world} never finished writing ({path.name} missing)")
        rec = _read_json(path, ("files", "chains_file", "rank"))
        for name, digest in rec["files"].items():
            if not (folder / name).exists():
                raise CheckpointError(f"{folder / name}: missing")
            if _sha256(folder / name) != digest:
                raise CheckpointError(f"{folder / name}: checksum mismatch (corrupted or partly written)")
        records.append(rec)
    return meta, records


def latest(run_dir: str | Path | None) -> Path | None:
    """The newest complete and intact `checkpoint_*` folder of a run on a local path, or None."""
    if run_dir is None:
        return None
    for folder in sorted(Path(run_dir).glob("checkpoint_*"), reverse=True):
        try:
            verify(folder)
            return folder
        except CheckpointError as e:
            print(f"skipping {folder}: {e}", flush=True)
    return None


def load_config(folder: str | Path) -> DRCConfig:
    """The resolved config saved with a checkpoint (a local folder or a URI: only config.json is read)."""
    from pipelines.lib import locations
    return DRCConfig.from_dict(json.loads(locations.read_text(locations.join(folder, "config.json"))))


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
    return safe_load(Path(folder) / "state.pt", device)


def _overlaps(rec: dict, lo_key: str, hi_key: str, ids: torch.Tensor) -> bool:
    if rec[lo_key] is None or not ids.numel():
        return False
    return rec[lo_key] <= int(ids[-1]) and rec[hi_key] >= int(ids[0])


def load_chains(folder: str | Path, records: list[dict], ids: torch.Tensor, prior_ids: torch.Tensor,
                dtype: torch.dtype) -> tuple[InMemoryChainBuffer, InMemoryChainBuffer, dict[int, torch.Tensor]]:
    """This rank's posterior and prior buffers, read only from shard files that overlap its ids.
    Returns also the saved generator states by saved rank."""
    folder = Path(folder)
    posterior, prior, gens = [], [], {}
    for rec in records:
        want_post = _overlaps(rec, "id_min", "id_max", ids)
        want_prior = _overlaps(rec, "prior_min", "prior_max", prior_ids)
        if not (want_post or want_prior):
            continue
        shard = safe_load(folder / rec["chains_file"])
        if want_post:
            posterior.append(shard["posterior"])
        if want_prior:
            prior.append(shard["prior"])
        gens[rec["rank"]] = shard["generator"]
    if not posterior or not prior:
        raise CheckpointError(f"{folder}: no chain shard covers sample ids "
                              f"[{int(ids[0])}, {int(ids[-1])}]")
    post = InMemoryChainBuffer.merge(posterior, ids)
    pri = InMemoryChainBuffer.merge(prior, prior_ids)
    post.z, pri.z = post.z.to(dtype), pri.z.to(dtype)
    return post, pri, gens


class ChainReader:
    """The posterior chains of any sample ids from a checkpoint, reading only the shard files
    whose id range holds them; the last `cache` shards read stay in memory (callers that go
    through the data in id order read each shard once)."""

    def __init__(self, folder: str | Path, cache: int = 2):
        self.folder = Path(folder)
        _, self.records = verify(self.folder)
        self.cache, self._shards = cache, {}

    def _shard(self, rec: dict) -> InMemoryChainBuffer:
        name = rec["chains_file"]
        if name not in self._shards:
            state = safe_load(self.folder / name)["posterior"]
            self._shards[name] = InMemoryChainBuffer.from_state_dict(state)
            while len(self._shards) > self.cache:
                self._shards.pop(next(iter(self._shards)))
        return self._shards[name]

    def get(self, ids) -> torch.Tensor:
        """(N, D) fp32 chains for `ids` (any order); KeyError naming the ids that have none."""
        ids = torch.tensor(np.asarray(ids), dtype=torch.long)
        out, found = None, torch.zeros(ids.numel(), dtype=torch.bool)
        for rec in self.records:
            if rec["id_min"] is None or not ids.numel():
                continue
            inside = (ids >= rec["id_min"]) & (ids <= rec["id_max"]) & ~found
            if not inside.any():
                continue
            shard = self._shard(rec)
            held = torch.isin(ids, shard.ids) & inside
            if out is None:
                out = torch.empty(ids.numel(), shard.dim)
            out[held] = shard.get(ids[held])
            found |= held
        if not found.all():
            raise KeyError(f"{self.folder}: no persistent chain for sample ids {ids[~found][:5].tolist()} "
                           f"(chains exist for the training split only)")
        return out
