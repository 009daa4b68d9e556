"""Reading the persistent chains back from a checkpoint (pipelines/lib/checkpoints.py writes them
and says how they are laid out): a restoring rank's buffers from the saved ranks whose id ranges
overlap its own (`load_chains`), one saved rank's chains (`read_chains`), and the chains of any
sample ids for `--from-chains` and distillation (`ChainReader`). Every file is verified as it is read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from drc_core.chains import InMemoryChainBuffer
from pipelines.lib import locations
from pipelines.lib.checkpoints import (CheckpointError, chain_location, read_rank_file, read_verified, records,
                                       safe_load)


def _overlaps(rec: dict, lo_key: str, hi_key: str, ids: torch.Tensor) -> bool:
    if rec[lo_key] is None or not ids.numel():
        return False
    return rec[lo_key] <= int(ids[-1]) and rec[hi_key] >= int(ids[0])


def read_chains(folder: str, rec: dict, name: str, counter: list | None = None) -> dict:
    """One saved rank's `name` chains as a state dict: its base with its deltas replayed, each file
    verified as it is read. `counter` ([bytes]) adds the bytes read."""
    entries = (rec.get("chains") or {}).get(name)
    if not entries:
        raise CheckpointError(f"{folder}: rank {rec['rank']} saved no {name} chains")
    state = None
    for e in entries:
        loc = chain_location(folder, e)
        data = read_verified(loc, e["sha256"])
        if counter is not None:
            counter[0] += len(data)
        part = safe_load(loc, data=data)
        state = part if state is None else InMemoryChainBuffer.apply(state, part)
    return state


def load_chains(folder: str | Path, recs: list[dict], ids: torch.Tensor, prior_ids: torch.Tensor,
                dtype: torch.dtype, counter: list | None = None
                ) -> tuple[InMemoryChainBuffer, InMemoryChainBuffer, dict[int, torch.Tensor]]:
    """This rank's posterior and prior buffers, read only from the saved ranks whose id ranges
    overlap its own, and the saved generator states of those ranks."""
    folder = str(folder)
    posterior, prior, gens = [], [], {}
    for rec in recs:
        want_post = _overlaps(rec, "id_min", "id_max", ids)
        want_prior = _overlaps(rec, "prior_min", "prior_max", prior_ids)
        if not (want_post or want_prior):
            continue
        if want_post:
            posterior.append(read_chains(folder, rec, "posterior", counter))
        if want_prior:
            prior.append(read_chains(folder, rec, "prior", counter))
        data = read_rank_file(folder, rec, rec["rank_file"])
        if counter is not None:
            counter[0] += len(data)
        gens[rec["rank"]] = safe_load(locations.join(folder, rec["rank_file"]), data=data)["generator"]
    if not posterior or not prior:
        raise CheckpointError(f"{folder}: no chain shard covers sample ids [{int(ids[0])}, {int(ids[-1])}]")
    post = InMemoryChainBuffer.merge(posterior, ids)
    pri = InMemoryChainBuffer.merge(prior, prior_ids)
    post.z, pri.z = post.z.to(dtype), pri.z.to(dtype)
    return post, pri, gens


class ChainReader:
    """The posterior chains of any sample ids from a checkpoint, reading only the chain files of the
    ranks whose id ranges hold them; the last `cache` ranks' chains stay in memory (callers that go
    through the data in id order read each rank's once)."""

    def __init__(self, folder: str | Path, cache: int = 2):
        self.folder = str(folder)
        _, self.records = records(self.folder)
        if any(not r.get("chains") for r in self.records):
            raise CheckpointError(f"{self.folder}: the checkpoint keeps no chains (a tune trial's, or written "
                                  f"without them)")
        self.cache, self._shards = cache, {}

    def _shard(self, rec: dict) -> InMemoryChainBuffer:
        key = rec["rank"]
        if key not in self._shards:
            self._shards[key] = InMemoryChainBuffer.from_state_dict(read_chains(self.folder, rec, "posterior"))
            while len(self._shards) > self.cache:
                self._shards.pop(next(iter(self._shards)))
        return self._shards[key]

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
