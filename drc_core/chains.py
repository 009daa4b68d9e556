"""Persistent Langevin chains behind a small interface keyed by `sample_id`.

Every training image owns one posterior chain z⁺ that persists across epochs. The in-memory
buffer here holds a contiguous range of ids [offset, offset + n); a sharded buffer (one per Ray
Train worker) is simply several of these with disjoint ranges, checkpointed and re-sharded
through `state_dict`. Storage may be fp16 to halve memory; chains are returned as fp32.
"""
from __future__ import annotations

from typing import Protocol

import torch


class ChainBuffer(Protocol):
    def get(self, ids: torch.Tensor) -> torch.Tensor: ...
    def set(self, ids: torch.Tensor, z: torch.Tensor) -> None: ...
    def state_dict(self) -> dict: ...


class InMemoryChainBuffer:
    """Chains for sample ids [offset, offset + num_chains), initialised from N(0, I)."""

    def __init__(self, num_chains: int, dim: int, *, offset: int = 0, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        if num_chains < 0 or dim <= 0:
            raise ValueError(f"InMemoryChainBuffer needs num_chains >= 0 and dim > 0, got {num_chains}, {dim}")
        gen = torch.Generator().manual_seed(seed)
        self.offset = offset
        self.z = torch.randn(num_chains, dim, generator=gen).to(dtype)
        self.visits = torch.zeros(num_chains, dtype=torch.int32)

    def __len__(self) -> int:
        return self.z.shape[0]

    @property
    def dim(self) -> int:
        return self.z.shape[1]

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(ids, dtype=torch.long) - self.offset
        if rows.numel() and (rows.min() < 0 or rows.max() >= len(self)):
            bad = torch.as_tensor(ids)[(rows < 0) | (rows >= len(self))][:5].tolist()
            raise KeyError(f"sample ids {bad} are outside this buffer's range "
                           f"[{self.offset}, {self.offset + len(self)})")
        return rows

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        return self.z[self._rows(ids)].float()

    def set(self, ids: torch.Tensor, z: torch.Tensor) -> None:
        rows = self._rows(ids)
        self.z[rows] = z.detach().to(device="cpu", dtype=self.z.dtype)
        self.visits[rows] += 1

    def state_dict(self) -> dict:
        return {"offset": self.offset, "z": self.z.clone(), "visits": self.visits.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "InMemoryChainBuffer":
        buf = cls.__new__(cls)
        buf.offset = int(state["offset"])
        buf.z = state["z"].clone()
        buf.visits = state["visits"].clone()
        return buf

    @classmethod
    def merge(cls, shards: list[dict], offset: int, count: int) -> "InMemoryChainBuffer":
        """Build the buffer for ids [offset, offset + count) from any set of shard state dicts
        that together cover that range (re-sharding after the number of workers changed)."""
        if not shards:
            raise ValueError("merge needs at least one shard")
        dim, dtype = shards[0]["z"].shape[1], shards[0]["z"].dtype
        buf = cls(0, dim, dtype=dtype)
        buf.offset = offset
        buf.z = torch.empty(count, dim, dtype=dtype)
        buf.visits = torch.zeros(count, dtype=torch.int32)
        covered = torch.zeros(count, dtype=torch.bool)
        for s in shards:
            lo, n = int(s["offset"]), s["z"].shape[0]
            a, b = max(lo, offset), min(lo + n, offset + count)
            if a < b:
                buf.z[a - offset:b - offset] = s["z"][a - lo:b - lo]
                buf.visits[a - offset:b - offset] = s["visits"][a - lo:b - lo]
                covered[a - offset:b - offset] = True
        if not covered.all():
            missing = (~covered).nonzero().flatten()[:5] + offset
            raise KeyError(f"shards do not cover sample ids {missing.tolist()} …")
        return buf
