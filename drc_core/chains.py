"""Persistent Langevin chains behind a small interface keyed by `sample_id`.

Every training image owns one posterior chain z⁺ that persists across epochs. A buffer holds
the chains of a sorted set of sample ids — one training process's shard. A sharded buffer is
several of these with disjoint id sets (one per Ray Train worker), each checkpointed on its own
and re-sharded through `state_dict` + `merge` when the number of workers changes; no process
ever holds all chains. A chain's initial value is a function of (seed, sample_id) only, so the
same sample starts from the same point however the ids are sharded. Storage may be fp16 to halve
memory; chains are returned as fp32. A buffer remembers which chains changed since `take_changed`
last ran, so a checkpoint can write only those (`apply` replays such a delta onto a saved state).
"""
from __future__ import annotations

from typing import Protocol

import torch

_INIT_BLOCK = 1024          # ids are initialised in seeded blocks of this many consecutive ids


class ChainBuffer(Protocol):
    def get(self, ids: torch.Tensor) -> torch.Tensor: ...
    def set(self, ids: torch.Tensor, z: torch.Tensor) -> None: ...
    def state_dict(self) -> dict: ...


def initial_chains(ids: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """N(0, I) draws that depend only on (seed, id): block b of ids [1024·b, 1024·(b+1)) comes
    from a generator seeded with (seed, b)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    out = torch.empty(ids.numel(), dim)
    blocks = torch.div(ids, _INIT_BLOCK, rounding_mode="floor")
    for b in torch.unique(blocks).tolist():
        sel = blocks == b
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        out[sel] = torch.randn(_INIT_BLOCK, dim, generator=gen)[ids[sel] - b * _INIT_BLOCK]
    return out


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items; shares differ in size by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


class InMemoryChainBuffer:
    """Chains for a sorted, duplicate-free set of sample ids."""

    def __init__(self, ids, dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float32):
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if dim <= 0:
            raise ValueError(f"InMemoryChainBuffer needs dim > 0, got {dim}")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("InMemoryChainBuffer ids must be sorted and unique")
        self.ids = ids.clone()
        self.z = initial_chains(ids, dim, seed).to(dtype)
        self.visits = torch.zeros(ids.numel(), dtype=torch.int32)
        self.changed = torch.zeros(ids.numel(), dtype=torch.bool)

    @classmethod
    def for_range(cls, count: int, dim: int, *, offset: int = 0, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> "InMemoryChainBuffer":
        """Chains for ids [offset, offset + count)."""
        if count < 0:
            raise ValueError(f"InMemoryChainBuffer needs count >= 0, got {count}")
        return cls(torch.arange(offset, offset + count), dim, seed=seed, dtype=dtype)

    def __len__(self) -> int:
        return self.z.shape[0]

    @property
    def dim(self) -> int:
        return self.z.shape[1]

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        rows = torch.searchsorted(self.ids, ids).clamp_(max=max(len(self) - 1, 0))
        bad = self.ids[rows] != ids if len(self) else torch.ones_like(ids, dtype=torch.bool)
        if bad.any():
            lo_hi = (f"[{int(self.ids[0])}, {int(self.ids[-1])}]" if len(self) else "(empty)")
            raise KeyError(f"sample ids {ids[bad][:5].tolist()} are not in this buffer (ids {lo_hi})")
        return rows

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        return self.z[self._rows(ids)].float()

    def set(self, ids: torch.Tensor, z: torch.Tensor) -> None:
        rows = self._rows(ids)
        self.z[rows] = z.detach().to(device="cpu", dtype=self.z.dtype)
        self.visits[rows] += 1
        self.changed[rows] = True

    @property
    def n_changed(self) -> int:
        return int(self.changed.sum())

    def take_changed(self) -> dict:
        """The state dict of the chains changed since the last call (or since creation / loading), and
        forget them: a delta for `apply`."""
        rows = self.changed.nonzero()[:, 0]
        self.changed.zero_()
        return {"ids": self.ids[rows].clone(), "z": self.z[rows].clone(), "visits": self.visits[rows].clone()}

    def mark_saved(self) -> None:
        """Everything is now in a saved state: nothing has changed since."""
        self.changed.zero_()

    @staticmethod
    def apply(state: dict, delta: dict) -> dict:
        """`state` (a state dict) with the rows of `delta` (a state dict of some of its ids) replaced."""
        if delta["ids"].numel():
            rows = torch.searchsorted(state["ids"], delta["ids"])
            if rows.max() >= state["ids"].numel() or not bool((state["ids"][rows] == delta["ids"]).all()):
                raise KeyError("a chain delta holds sample ids its base does not")
            state["z"][rows] = delta["z"].to(state["z"].dtype)
            state["visits"][rows] = delta["visits"]
        return state

    def state_dict(self) -> dict:
        return {"ids": self.ids.clone(), "z": self.z.clone(), "visits": self.visits.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "InMemoryChainBuffer":
        buf = cls.__new__(cls)
        buf.ids, buf.z, buf.visits = (state[k].clone() for k in ("ids", "z", "visits"))
        buf.changed = torch.zeros(buf.ids.numel(), dtype=torch.bool)
        return buf

    @classmethod
    def merge(cls, shards: list[dict], ids) -> "InMemoryChainBuffer":
        """Build the buffer for sorted `ids` from shard state dicts that together cover them
        (re-sharding after the number of workers changed). Shards may hold other ids too."""
        if not shards:
            raise ValueError("merge needs at least one shard")
        ids = torch.as_tensor(ids, dtype=torch.long)
        dim, dtype = shards[0]["z"].shape[1], shards[0]["z"].dtype
        buf = cls(ids[:0], dim, dtype=dtype)
        buf.ids = ids.clone()
        buf.z = torch.empty(ids.numel(), dim, dtype=dtype)
        buf.visits = torch.zeros(ids.numel(), dtype=torch.int32)
        buf.changed = torch.zeros(ids.numel(), dtype=torch.bool)
        covered = torch.zeros(ids.numel(), dtype=torch.bool)
        for s in shards:
            inside = torch.isin(s["ids"], ids)
            rows = torch.searchsorted(ids, s["ids"][inside])
            buf.z[rows] = s["z"][inside].to(dtype)
            buf.visits[rows] = s["visits"][inside]
            covered[rows] = True
        if not covered.all():
            raise KeyError(f"shards do not cover sample ids {ids[~covered][:5].tolist()} …")
        return buf
