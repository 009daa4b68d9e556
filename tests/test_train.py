"""pipelines.train on a real local Ray instance: DDP workers, sharded persistent chains,
checkpoints, fault recovery, re-sharding and MLflow tracking."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from drc_core.chains import InMemoryChainBuffer, initial_chains
from pipelines.lib import checkpoints as ckpt
from pipelines.lib.chain_reader import read_chains

pytestmark = pytest.mark.integration

# the cpu-32 preset at batch 8 (48 training images → 24 per worker → 3 iterations per epoch),
# with a small prior pool and few test-time steps so evaluation stays cheap
TINY = ["optim.batch_size=8", "langevin.prior_pool_size=16", "langevin.test_steps=4"]
NUM_TRAIN = 48


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory):
    from pipelines import preprocess
    out = tmp_path_factory.mktemp("data") / "tmds32"
    preprocess.main(["--source", "tm-dsprites", "--out", str(out), "--preset", "cpu-32",
                     "--train", str(NUM_TRAIN), "--test", "8"])
    return str(out)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def train(dataset, tracking_uri, storage, *extra, workers="2", iterations=6):
    from pipelines.train import main
    return main(["--data", dataset, "--workers", workers, "--iterations", str(iterations),
                 "--checkpoint-every", "3", "--eval-every", "3", "--eval-images", "8",
                 "--grid-every", "3", "--keep", "10", "--storage", str(storage),
                 "--tracking-uri", tracking_uri, *extra, *TINY])


def shard(folder: Path, rank: int, world: int) -> dict:
    """Rank `rank`'s chains at this checkpoint (its chain log's base with the deltas replayed)."""
    _, records = ckpt.records(folder)
    assert len(records) == world
    return {b: read_chains(str(folder), records[rank], b) for b in ckpt.BUFFERS}


def events(summary) -> list[dict]:
    path = Path(summary["storage"]) / summary["name"] / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_workers_train_persist_every_chain_and_track_everything_in_mlflow(dataset, tracking_uri, tmp_path):
    import mlflow
    import pandas as pd
    from PIL import Image
    s = train(dataset, tracking_uri, tmp_path / "ray")
    run_dir = Path(s["storage"]) / s["name"]
    first, last = run_dir / "checkpoint_00000003", run_dir / "checkpoint_00000006"
    meta, records = ckpt.verify(last)
    assert meta["iteration"] == 6 and meta["world_size"] == 2 and len(records) == 2

    seen = []
    for rank in range(2):
        a, b = shard(first, rank, 2)["posterior"], shard(last, rank, 2)["posterior"]
        assert torch.equal(a["ids"], b["ids"])
        seen.append(b["ids"])
        start = initial_chains(a["ids"], a["z"].shape[1], seed=0 + 1)
        # 3 iterations = one epoch: every chain of the shard was advanced once, then once more
        assert (a["visits"] == 1).all() and (b["visits"] == 2).all()
        assert (a["z"] != start).any(dim=1).all() and (b["z"] != a["z"]).any(dim=1).all()
    ids = torch.cat(seen)
    assert ids.tolist() == list(range(NUM_TRAIN)), "the two shards partition the training ids"

    client = mlflow.tracking.MlflowClient(tracking_uri)
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.fg_dim"] == "32" and run.data.params["job.workers"] == "2"
    history = client.get_metric_history(run.info.run_id, "gen_loss")
    assert [m.step for m in history] == list(range(1, 7))
    for key in ("ebm_loss", "prior_energy", "recon_l1", "mask_area", "images_per_s", "eval_iou", "eval_dice"):
        assert key in run.data.metrics, key
    # the logged held-out IoU is what the final model's fresh chains give on the first 8 test images
    # under the default policy, each worker scoring its slice (recomputed here from the checkpoint)
    from drc_core.chains import shard_bounds
    from drc_core.inference import segment
    from drc_core.metrics import iou_dice
    from drc_core.threshold import DEFAULT
    from pipelines.lib.models import load
    from pipelines.lib.parquet_store import load_rows, split_ids
    model = load(str(last))
    test_ids = split_ids(dataset, "test")[:8]
    ious = []
    for rank in range(2):
        lo, hi = shard_bounds(len(test_ids), 2, rank)
        rows = load_rows(dataset, test_ids[lo:hi])
        seg = segment(model.net, rows["images"], model.cfg, seed=0)
        ious.append(iou_dice(DEFAULT.masks(seg.prob), torch.as_tensor(rows["masks"]) > 0)[0])
    final_eval = next(m.value for m in client.get_metric_history(run.info.run_id, "eval_iou") if m.step == 6)
    assert final_eval == pytest.approx(100 * float(torch.cat(ious).mean()), abs=1.0)
    grids = [f.path for f in client.list_artifacts(run.info.run_id, "grids")]
    assert grids == ["grids/iter_0000003.png", "grids/iter_0000006.png"]
    # MLflow holds the model and the checkpoint's records, never the chains; the tag names the checkpoint
    saved = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert saved == {"config.json", "meta.json"} and run.data.tags["checkpoint"] == s["checkpoint"] == str(last)
    assert not any("chains" in f.path for f in client.list_artifacts(run.info.run_id))
    model = mlflow.pyfunc.load_model(s["model_uri"])
    from pipelines.lib.parquet_store import load_arrays
    test = load_arrays(dataset, "test")["images"][:3]
    pngs = []
    for img in test:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    out = model.predict(pd.DataFrame({"image": pngs}), params={"steps": 2, "seed": 0})
    again = model.predict(pd.DataFrame({"image": pngs}), params={"steps": 2, "seed": 0})
    assert len(out) == 3 and list(out["mask_png"]) == list(again["mask_png"])
    mask = np.asarray(Image.open(io.BytesIO(out["mask_png"][0])))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
    assert np.isclose(out["fg_fraction"][0], (mask > 0).mean())


def _restored(summary) -> list[dict]:
    return [e for e in events(summary) if e["event"] == "restored"]


def _assert_restored_exactly(summary, iteration: int) -> None:
    """Every rank restored its chains bit for bit from the checkpoint of `iteration`."""
    folder = Path(summary["storage"]) / summary["name"] / f"checkpoint_{iteration:08d}"
    ckpt.verify(folder)
    restored = _restored(summary)
    assert sorted(e["rank"] for e in restored) == [0, 1]
    for e in restored:
        assert e["iteration"] == iteration
        assert e["posterior_digest"] == ckpt.tensor_digest(shard(folder, e["rank"], 2)["posterior"]["z"])


@pytest.mark.faults
def test_a_failed_worker_resumes_from_the_last_checkpoint_with_every_chain(dataset, tracking_uri, tmp_path,
                                                                           record_property):
    # an exception in one worker; a worker process SIGKILLed is the next test's (mid-checkpoint)
    s = train(dataset, tracking_uri, tmp_path / "ray", "--inject-fault", "raise:5:1")
    assert [e["iteration"] for e in events(s) if e["event"] == "fault"] == [5]
    _assert_restored_exactly(s, 3)
    meta, _ = ckpt.verify(Path(s["checkpoint"]))
    assert meta["iteration"] == 6
    record_property("outcome", "completed: rank 1 raised at iteration 5, both ranks restored checkpoint 3 "
                               "bit for bit, finished at 6")


@pytest.mark.faults
def test_a_kill_during_checkpoint_write_leaves_the_previous_checkpoint_loadable(dataset, tracking_uri, tmp_path,
                                                                                record_property):
    # rank 1's process SIGKILLed while it writes checkpoint 6: Ray Train restarts the group
    s = train(dataset, tracking_uri, tmp_path / "ray", "--inject-fault", "kill-in-checkpoint:6:1")
    assert [e["kind"] for e in events(s) if e["event"] == "fault"] == ["kill-in-checkpoint"]
    _assert_restored_exactly(s, 3)               # the half-written checkpoint 6 was never used
    meta, records = ckpt.verify(Path(s["checkpoint"]))
    assert meta["iteration"] == 6 and len(records) == 2
    record_property("outcome", "completed: half-written checkpoint 6 never used, restored 3, rewrote 6")


def test_resume_with_one_worker_after_two_reshards_the_chains(dataset, tracking_uri, tmp_path):
    from pipelines.train import main
    first = train(dataset, tracking_uri, tmp_path / "ray", iterations=3)
    folder = Path(first["checkpoint"])
    merged = InMemoryChainBuffer.merge([shard(folder, r, 2)["posterior"] for r in range(2)],
                                       torch.arange(NUM_TRAIN))
    second = main(["--data", dataset, "--resume", first["name"], "--workers", "1", "--iterations", "6",
                   "--checkpoint-every", "3", "--eval-every", "0", "--grid-every", "0",
                   "--storage", first["storage"], "--tracking-uri", tracking_uri, *TINY])
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    (restored,) = [e for e in _restored(second) if e["world_size"] == 1]
    assert restored["saved_world_size"] == 2 and restored["iteration"] == 3
    assert restored["posterior_digest"] == ckpt.tensor_digest(merged.z)
    meta, records = ckpt.verify(Path(second["checkpoint"]))
    assert meta["iteration"] == 6 and meta["world_size"] == 1
    final = shard(Path(second["checkpoint"]), 0, 1)["posterior"]
    assert final["ids"].tolist() == list(range(NUM_TRAIN))
    # 3 more iterations of batch 8 on one worker advanced 24 chains; the rest kept their state
    advanced = final["visits"] > merged.visits
    assert int(advanced.sum()) == 24 and torch.equal(final["z"][~advanced], merged.z[~advanced])


def test_progress_times_read_as_a_clock():
    from pipelines.lib.train_worker import _clock
    assert [_clock(s) for s in (0, 9.4, 61, 245, 3599, 3725)] == ["0s", "9s", "1m01s", "4m05s", "59m59s", "1h02m"]
