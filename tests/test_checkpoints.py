"""Sharded checkpoints without Ray: write per rank, verify, re-shard, detect damage."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from drc_core.chains import shard_bounds
from drc_core.config import ConfigError, apply_overrides
from drc_core.fit import TrainState
from pipelines.lib import chain_reader
from pipelines.lib import checkpoints as ckpt
from pipelines.lib.train_worker import batch_ids


def _states(cfg, n: int, world: int) -> list[TrainState]:
    states = []
    for rank in range(world):
        lo, hi = shard_bounds(n, world, rank)
        s = TrainState.create(cfg, torch.arange(lo, hi), rank=rank, world_size=world)
        s.chains.set(s.chains.ids[:2], torch.full((2, s.chains.dim), float(rank + 1)))   # touched chains
        s.iteration = 7
        states.append(s)
    return states


def _write(folder, states) -> None:
    for rank, s in enumerate(states):
        ckpt.write_shard(folder, rank=rank, world_size=len(states), state=s, meta={"run": "t"})


def test_two_shards_restore_into_one_worker_and_into_three(tiny_cfg, tmp_path):
    states = _states(tiny_cfg, 10, 2)
    _write(tmp_path, states)
    meta, records = ckpt.verify(tmp_path)
    assert meta["iteration"] == 7 and meta["world_size"] == 2 and [r["count"] for r in records] == [5, 5]
    whole = torch.cat([s.chains.z for s in states])
    post, prior, gens = chain_reader.load_chains(tmp_path, records, torch.arange(10), torch.arange(16), torch.float32)
    assert torch.equal(post.z, whole) and post.visits[[0, 1, 5, 6]].tolist() == [1, 1, 1, 1]
    assert torch.equal(prior.z, torch.cat([s.prior_chains.z for s in states]))
    assert set(gens) == {0, 1}
    for rank in range(3):                      # 3 workers: shards 0–2, 3–5, 6–9 (rank 1 reads both files)
        lo, hi = shard_bounds(10, 3, rank)
        part, _, _ = chain_reader.load_chains(tmp_path, records, torch.arange(lo, hi),
                                              torch.arange(*shard_bounds(16, 3, rank)), torch.float32)
        assert torch.equal(part.z, whole[lo:hi])
    state = ckpt.load_state(tmp_path)          # weights_only inside
    assert state["iteration"] == 7 and "model" in state and "optimizers" in state


def test_damaged_or_incomplete_checkpoints_are_refused_and_skipped(tiny_cfg, tmp_path):
    good, bad_chains, bad_model, partial = (tmp_path / f"checkpoint_0000000{i}" for i in (3, 5, 6, 9))
    for folder in (good, bad_chains, bad_model):
        _write(folder, _states(tiny_cfg, 10, 2))
    for path in (bad_chains / "chains-posterior-r00001-of-00002.pt", bad_model / "state.pt"):
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="chains-posterior-r00001-of-00002.pt: checksum mismatch"):
        ckpt.verify(bad_chains)
    _, records = ckpt.records(bad_chains)                     # rank 0 reads only its own chains: they load
    chain_reader.load_chains(bad_chains, records, torch.arange(5), torch.arange(8), torch.float32)
    with pytest.raises(ckpt.CheckpointError, match="chains-posterior-r00001-of-00002.pt: checksum mismatch"):
        chain_reader.load_chains(bad_chains, records, torch.arange(5, 10), torch.arange(8, 16), torch.float32)
    with pytest.raises(ckpt.CheckpointError, match="state.pt: checksum mismatch"):
        ckpt.load_model(bad_model)
    states = _states(tiny_cfg, 10, 2)          # rank 1 dies before committing its shard record
    ckpt.write_shard(partial, rank=0, world_size=2, state=states[0], meta={})
    with pytest.raises(ckpt.CheckpointError, match="rank 1 of 2 never finished"):
        ckpt.verify(partial)
    with pytest.raises(ckpt.CheckpointError, match="not a DRC checkpoint"):
        ckpt.verify(tmp_path)
    # the newest complete checkpoint with intact model files (chains are checked by whoever loads them)
    assert ckpt.latest(tmp_path) == bad_chains


def _run_checkpoint(run, state, it, log, rank=0, world=1):
    state.iteration = it
    return ckpt.write_shard(run / f"checkpoint_{it:08d}", rank=rank, world_size=world, state=state, meta={},
                            run=str(run), log=log)


def test_the_chain_log_writes_what_changed_and_replays_to_the_same_chains(tiny_cfg, tmp_path):
    state = TrainState.create(tiny_cfg, torch.arange(1000))
    log = ckpt.ChainLog(str(tmp_path), 0, 1)
    first = _run_checkpoint(tmp_path, state, 1, log)
    assert [e["kind"] for e in first["chains"]["posterior"]] == ["base"] and first["chains"]["posterior"][0]["rows"] == 1000
    sizes = []
    for it in range(2, 6):                     # 10 chains change per checkpoint: deltas of 10 rows
        ids = torch.arange(10 * it, 10 * it + 10)
        state.chains.set(ids, torch.randn(10, state.chains.dim))
        rec = _run_checkpoint(tmp_path, state, it, log)
        sizes.append(rec["chains"]["posterior"][-1]["bytes"])
        assert [e["kind"] for e in rec["chains"]["posterior"]] == ["base"] + ["delta"] * (it - 1)
        assert rec["chains"]["posterior"][-1]["rows"] == 10
    assert max(sizes) < first["chains"]["posterior"][0]["bytes"] / 20     # a delta costs what changed
    _, records = ckpt.records(tmp_path / "checkpoint_00000005")
    post, _, _ = chain_reader.load_chains(tmp_path / "checkpoint_00000005", records, torch.arange(1000),
                                          torch.arange(16), torch.float32)
    assert torch.equal(post.z, state.chains.z) and torch.equal(post.visits, state.chains.visits)
    # once the deltas since the base would outweigh it, a new base replaces them
    state.chains.set(torch.arange(1000), torch.randn(1000, state.chains.dim))
    rec = _run_checkpoint(tmp_path, state, 6, log)
    assert [e["kind"] for e in rec["chains"]["posterior"]] == ["base"]
    # files no checkpoint names any more go; those the kept checkpoints name stay
    for it in (1, 2, 3, 4):
        import shutil
        shutil.rmtree(tmp_path / f"checkpoint_{it:08d}")
    log.collect_garbage()
    kept = {p.name for p in (tmp_path / "chains" / "w00001-r00000" / "posterior").iterdir()}
    named = {e["file"].rsplit("/", 1)[-1] for it in (5, 6) for e in
             ckpt.records(tmp_path / f"checkpoint_{it:08d}")[1][0]["chains"]["posterior"]}
    assert kept == named and len(kept) == 1 + 4 + 1
    ckpt.verify(tmp_path / "checkpoint_00000005")


def test_a_model_loads_without_reading_any_chain(tiny_cfg, tmp_path):
    state = TrainState.create(tiny_cfg, torch.arange(100))
    _run_checkpoint(tmp_path, state, 3, ckpt.ChainLog(str(tmp_path), 0, 1))
    import shutil
    shutil.rmtree(tmp_path / "chains")                          # no chain file at all
    meta, cfg, saved = ckpt.load_model(tmp_path / "checkpoint_00000003")
    assert meta["iteration"] == 3 and saved["iteration"] == 3 and cfg.model.fg_dim == tiny_cfg.model.fg_dim
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        chain_reader.ChainReader(tmp_path / "checkpoint_00000003").get([0])


def test_resume_with_another_architecture_fails_naming_the_field(tiny_cfg):
    other = apply_overrides(tiny_cfg, {"model.fg_dim": 12})
    with pytest.raises(ConfigError, match="model.fg_dim is 12 .* trained with 8"):
        ckpt.check_compatible(tiny_cfg, other, "x")
    ckpt.check_compatible(tiny_cfg, apply_overrides(tiny_cfg, {"optim.gen_lr": 0.5}), "x")  # not architecture


def test_batches_cover_the_shard_once_per_epoch_and_are_reproducible():
    ids = torch.arange(100, 124)
    epoch0 = torch.cat([batch_ids(ids, 8, 3, it, seed=0, rank=1) for it in range(3)])
    assert sorted(epoch0.tolist()) == ids.tolist()
    epoch1 = torch.cat([batch_ids(ids, 8, 3, it, seed=0, rank=1) for it in range(3, 6)])
    assert sorted(epoch1.tolist()) == ids.tolist() and not torch.equal(epoch0, epoch1)
    assert torch.equal(batch_ids(ids, 8, 3, 4, seed=0, rank=1), epoch1[8:16])
    assert not np.array_equal(batch_ids(ids, 8, 3, 0, seed=0, rank=0), epoch0[:8])
