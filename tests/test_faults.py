"""Fault injection: corrupted checkpoints and Parquet parts, a full disk, diverging chains.

Run the whole suite (these cases and the worker-kill / node-loss / kill-during-checkpoint
drills of test_train.py and test_train_cluster.py) with

    .venv/bin/python -m pytest -m faults

Every case ends in a completed run or a clear error naming what broke, and nothing written
before the fault is lost (checked by digests of the earlier files).

A full disk is simulated with a small tmpfs mounted for the test (`mount -t tmpfs -o size=…`):
real ENOSPC from the kernel, in this process and in Ray's worker processes alike. Mounting needs
root (or CAP_SYS_ADMIN); where that is refused those cases are skipped and say why.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch

from drc_core.fit import TrainState
from drc_core.presets import get_config
from pipelines.lib import checkpoints as ckpt
from pipelines.lib.parquet_store import DatasetError, load_rows
from tests.test_hardening import _digests as digests
from tests.test_hardening import _saved_run
from tests.test_train import TINY, tracking_uri, train  # noqa: F401  (tracking_uri is a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.faults]
QUIET = ["--eval-every", "0", "--grid-every", "0", "--no-model"]


@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory):
    """56 TM-dSprites images at 32² in 4 Parquet parts."""
    from pipelines import preprocess
    out = tmp_path_factory.mktemp("data") / "tmds32"
    preprocess.main(["--source", "tm-dsprites", "--out", str(out), "--preset", "cpu-32", "--train", "48",
                     "--test", "8", "--rows-per-file", "16"])
    return out


def flip(path: Path, at: float = 0.5, n: int = 16) -> None:
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * at)
    raw[i:i + n] = bytes(b ^ 0xFF for b in raw[i:i + n])
    path.write_bytes(bytes(raw))


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


# ---- corrupted checkpoints ---------------------------------------------------------------------

def test_corrupted_newest_checkpoint_resume_falls_back_to_the_previous_one(data, tracking_uri, tmp_path,
                                                                          record_property):
    from pipelines.train import main
    first = train(str(data), tracking_uri, tmp_path / "ray", *QUIET)         # checkpoints 3 and 6
    run_dir = Path(first["storage"]) / first["name"]
    c3, c6 = run_dir / "checkpoint_00000003", run_dir / "checkpoint_00000006"
    kept = digests(c3)
    entry = ckpt.records(c6)[1][1]["chains"]["posterior"][-1]      # rank 1's chains at 6, in its chain log
    assert entry["file"] not in {e["file"] for e in ckpt.records(c3)[1][1]["chains"]["posterior"]}
    bad = run_dir / entry["file"]
    flip(bad)
    seen = len(events(run_dir))
    second = main(["--data", str(data), "--resume", first["name"], "--iterations", "9", "--checkpoint-every", "3",
                   "--keep", "10", "--storage", first["storage"], "--tracking-uri", tracking_uri, *QUIET, *TINY])
    new = events(run_dir)[seen:]
    rejected = [e for e in new if e["event"] == "checkpoint_rejected"]
    assert sorted(e["rank"] for e in rejected) == [0, 1]
    # only rank 1 reads that file; both ranks pass the checkpoint over together
    assert all(f"{bad.name}: checksum mismatch" in e["reason"] and e["fallback"] == str(c3) for e in rejected)
    assert {e["iteration"] for e in new if e["event"] == "restored"} == {3}
    assert digests(c3) == kept
    meta, _ = ckpt.verify(Path(second["checkpoint"]))
    assert meta["iteration"] == 9 and mlflow.tracking.MlflowClient(tracking_uri).get_run(
        second["mlflow_run_id"]).info.status == "FINISHED"
    record_property("outcome", "completed: damaged chain shard of checkpoint 6 rejected on both ranks, "
                               "resumed from 3, finished at 9; checkpoint 3 untouched")


def test_resume_with_every_checkpoint_corrupted_fails_naming_the_file(data, no_ray, tmp_path, record_property):
    from pipelines.train import main
    run_dir = _saved_run(tmp_path / "ray", "old", get_config("cpu-32"), str(data))
    flip(run_dir / "checkpoint_00000003" / "state.pt")
    kept = digests(run_dir)
    with pytest.raises(SystemExit) as info:
        main(["--data", str(data), "--resume", "old", "--storage", str(tmp_path / "ray")])
    message = str(info.value)
    assert message.startswith("train: --resume old: no intact checkpoint under ")
    assert "checkpoint_00000003/state.pt: checksum mismatch" in message
    assert digests(run_dir) == kept
    record_property("outcome", "clear error before Ray: '--resume old: no intact checkpoint under …; the newest: "
                               "…/state.pt: checksum mismatch'; files untouched")


# ---- corrupted Parquet parts ------------------------------------------------------------------

def _damage_data_page(part: Path, column: str = "image") -> None:
    """Overwrite bytes inside `column`'s first data page (a flipped bit on disk)."""
    meta = pq.read_metadata(part).row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    start = min(o for o in (col.dictionary_page_offset, col.data_page_offset) if o is not None)
    flip(part, at=(start + col.total_compressed_size // 2) / part.stat().st_size, n=4)


def test_a_damaged_data_page_is_caught_by_its_checksum_naming_the_part(data, tmp_path, record_property):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    _damage_data_page(bad / "part-00001.parquet")
    ids = pq.read_table(bad / "part-00001.parquet", columns=["sample_id"])["sample_id"].to_pylist()  # footer + ids read
    with pytest.raises(DatasetError, match=r"part part-00001\.parquet is damaged .*CRC checksum"):
        load_rows(str(bad), ids)                                              # what a train worker reads
    record_property("outcome", "clear error: load_rows (a train worker's read) names part-00001, CRC mismatch")


def test_training_on_a_truncated_part_fails_before_ray_and_keeps_the_run(data, no_ray, tmp_path, record_property):
    from pipelines.train import main
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    part = bad / "part-00002.parquet"
    part.write_bytes(part.read_bytes()[:part.stat().st_size // 2])
    run_dir = _saved_run(tmp_path / "ray", "old", get_config("cpu-32"), str(data))
    kept = digests(run_dir)
    for argv in (["--name", "new"], ["--resume", "old"]):
        with pytest.raises(SystemExit, match=r"part part-00002\.parquet is damaged or unreadable .*magic bytes"):
            main(["--data", str(bad), "--storage", str(tmp_path / "ray"), *argv])
    assert digests(run_dir) == kept and not (tmp_path / "ray" / "new").exists()
    record_property("outcome", "clear error before Ray: part-00002.parquet damaged (truncated); new run not "
                               "created, existing run untouched")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny DRC checkpoint (no training needed to segment)."""
    from tests.conftest import tiny_config
    folder = tmp_path_factory.mktemp("model") / "checkpoint_00000001"
    ckpt.write_shard(folder, rank=0, world_size=1, state=TrainState.create(tiny_config(), torch.arange(48)), meta={})
    return str(folder)


def _segment(model, data, out, *extra):
    from pipelines import segment
    return segment.main(["--model", model, "--input", str(data), "--output", str(out), "--steps", "1",
                         "--batch-size", "16", "--quiet", *extra])


def test_segmenting_a_damaged_part_fails_naming_it_and_keeps_the_previous_output(data, model, tmp_path,
                                                                                 record_property):
    out = tmp_path / "seg"
    assert _segment(model, data, out)["counts"]["ok"] == 56
    kept = digests(out)
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    _damage_data_page(bad / "part-00003.parquet")            # found by the page checksum, in a Ray task
    with pytest.raises(SystemExit, match=r"^segment: .*part part-00003\.parquet is damaged .*CRC checksum"):
        _segment(model, bad, out, "--overwrite")
    (bad / "part-00000.parquet").write_bytes(b"PAR1 overwritten")  # found from the footer, on the driver
    with pytest.raises(SystemExit, match=r"^segment: .*part part-00000\.parquet is damaged or unreadable"):
        _segment(model, bad, out, "--overwrite")
    assert digests(out) == kept and not list(tmp_path.glob(".seg.tmp-*"))
    record_property("outcome", "clear error: part-00003 (bad data page, CRC) and part-00000 (footer) named; "
                               "previous segmentation untouched")


# ---- a full disk ---------------------------------------------------------------------------------

def _cannot_mount(stderr: str) -> None:
    """Skip where a tmpfs cannot be mounted; in CI (CI=true) that is a failure, never a silent skip."""
    why = f"the full-disk cases mount a small tmpfs, which needs root: {stderr.strip()}"
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {why}")
    pytest.skip(why)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: writes beyond it fail with ENOSPC (No space left on device)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        _cannot_mount(proc.stderr)
    yield disk
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Leave about `leave` bytes free on `disk` (tmpfs allocates in 4 KiB pages)."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / f"filler-{len(list(disk.glob('filler-*')))}", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def hidden(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob(".*")]


def test_a_checkpoint_write_on_a_full_disk_fails_cleanly(tiny_cfg, small_disk, record_property):
    state = TrainState.create(tiny_cfg, torch.arange(48))
    state.iteration = 3
    ckpt.write_shard(small_disk / "checkpoint_00000003", rank=0, world_size=1, state=state, meta={})
    kept = digests(small_disk / "checkpoint_00000003")
    fill(small_disk, leave=64 * 1024)
    state.iteration = 6
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint_00000006/\S+\.pt: cannot write the checkpoint "
                                                   r"file \(No space left on device\)"):
        ckpt.write_shard(small_disk / "checkpoint_00000006", rank=0, world_size=1, state=state, meta={})
    assert digests(small_disk / "checkpoint_00000003") == kept
    assert hidden(small_disk) == [] and not list((small_disk / "checkpoint_00000006").glob("shard-*"))
    assert ckpt.latest(small_disk) == small_disk / "checkpoint_00000003"
    record_property("outcome", "clear error: CheckpointError 'No space left on device' naming the file; no "
                               "temporary file left, checkpoint 6 never valid, 3 intact")


def test_training_whose_storage_fills_up_fails_clearly_and_keeps_the_last_checkpoint(data, tracking_uri, tmp_path,
                                                                                    record_property):
    """Ray copies each checkpoint into --storage; with room for one checkpoint only, the copy of
    the second fails (ENOSPC), the restarted workers resume from the first and fail again."""
    from pipelines.train import main
    probe = tmp_path / "probe"                   # the size of one checkpoint of this run
    state = TrainState.create(get_config("cpu-32", dict(s.split("=") for s in TINY)), torch.arange(48))
    state.step(torch.zeros(8, 3, 32, 32), torch.arange(8))     # Adam's moments are in the checkpoint too
    ckpt.write_shard(probe, rank=0, world_size=1, state=state, meta={})
    size = sum(p.stat().st_size for p in probe.iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6)}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        _cannot_mount(mounted.stderr)
    try:
        with pytest.raises(SystemExit) as info:
            main(["--data", str(data), "--workers", "2", "--iterations", "6", "--checkpoint-every", "3",
                  "--keep", "10", "--max-failures", "1", "--storage", str(disk), "--name", "full",
                  "--tracking-uri", tracking_uri, *QUIET, *TINY])
        message = str(info.value)
        # the first write of checkpoint 6 that finds the disk full names itself: the rank's chain
        # delta in its chain log, or Ray's copy of the checkpoint folder into storage
        assert re.match(r"train: (cannot save checkpoint_00000006 into |\S+/chains/w00002-r0000\d/\w+/"
                        r"(base|delta)-00000006-\w+\.pt: cannot write the checkpoint file )", message) and \
            "(No space left on device)" in message, message
        meta, _ = ckpt.verify(disk / "full" / "checkpoint_00000003")
        assert meta["iteration"] == 3 and ckpt.latest(disk / "full") == disk / "full" / "checkpoint_00000003"
        restored = [e for e in events(disk / "full") if e["event"] == "restored"]
        assert sorted((e["rank"], e["iteration"]) for e in restored) == [(0, 3), (1, 3)]   # the one restart
        run_id = json.loads((disk / "full" / "drc_run.json").read_text())["mlflow_run_id"]
        assert mlflow.tracking.MlflowClient(tracking_uri).get_run(run_id).info.status == "FAILED"
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    record_property("outcome", "clear error naming the file of checkpoint 6 that did not fit (No space left on "
                               "device); checkpoint 3 intact and the newest valid one")


def test_preprocess_and_segment_outputs_on_a_full_disk_fail_keep_the_old_output_and_resume(
        data, model, small_disk, record_property):
    from pipelines import preprocess, segment
    args = ["--source", "tm-dsprites", "--preset", "cpu-32", "--train", "48", "--test", "8", "--overwrite"]
    preprocess.main([*args, "--out", str(small_disk / "data")])
    _segment(model, data, small_disk / "seg")
    kept = {name: digests(small_disk / name) for name in ("data", "seg")}
    fill(small_disk, leave=32 * 1024)
    big = [*args[:5], "400", *args[6:], "--rows-per-file", "100"]
    with pytest.raises(SystemExit, match=r"preprocess: .*/data: cannot write the dataset \(No space left on device\); "
                                         r"an existing dataset there is unchanged; the parts written so far stay in "
                                         r".*/\.data\.partial \(--resume continues"):
        preprocess.main([*big, "--out", str(small_disk / "data")])
    fill(small_disk, leave=4096)                 # a segmentation of 56 images is ~20 KiB
    with pytest.raises(SystemExit, match=r"segment: .*/seg: cannot write the dataset \(No space left on device\)"):
        _segment(model, data, small_disk / "seg", "--overwrite")
    with pytest.raises(SystemExit, match=r"segment: --png .*: cannot write (masks|overlays)/\S+\.png "
                                         r"\(No space left on device\)"):
        _segment(model, data, small_disk.parent / "seg2", "--png", str(small_disk / "png"))
    assert {name: digests(small_disk / name) for name in ("data", "seg")} == kept
    # what is left: the interrupted runs' folders, which --resume continues once there is room
    assert set(hidden(small_disk)) <= {".data.partial", ".seg.partial"}
    for filler in small_disk.glob("filler-*"):
        filler.unlink()
    resumed = preprocess.main([*(a for a in big if a != "--overwrite"), "--resume", "--out", str(small_disk / "data")])
    fresh = preprocess.main([*big, "--out", str(small_disk.parent / "fresh")])
    assert resumed["counts"]["ok"] == 408 and resumed["sample_id_checksum"] == fresh["sample_id_checksum"]
    again = _segment(model, data, small_disk / "seg", "--resume")
    _segment(model, data, small_disk.parent / "seg-fresh")
    assert again["counts"]["ok"] == 56
    assert segment.read_output(str(small_disk / "seg")).equals(segment.read_output(str(small_disk.parent / "seg-fresh")))
    assert hidden(small_disk) == []
    record_property("outcome", "clear error: 'No space left on device' for preprocess, segment Parquet and PNG "
                               "writes; old dataset and segmentation intact; --resume with room finished both, "
                               "the same as fresh runs")


# ---- diverging Langevin chains under Ray Train ---------------------------------------------------

def test_diverging_chains_under_ray_train_are_reset_counted_in_mlflow_and_training_completes(
        data, tracking_uri, tmp_path, record_property):
    s = train(str(data), tracking_uri, tmp_path / "ray", *QUIET, "langevin.posterior_step_size=1e3", iterations=3)
    run_dir = Path(s["storage"]) / s["name"]
    resets = [e for e in events(run_dir) if e["event"] == "chains_reset"]
    assert {(e["rank"], e["iteration"], e["chains"]) for e in resets} == {(r, i, 8) for r in (0, 1) for i in (1, 2, 3)}
    client = mlflow.tracking.MlflowClient(tracking_uri)
    history = client.get_metric_history(s["mlflow_run_id"], "chains_reset")
    assert [(m.step, m.value) for m in history] == [(1, 16.0), (2, 16.0), (3, 16.0)]   # summed over both workers
    assert client.get_run(s["mlflow_run_id"]).info.status == "FINISHED"
    meta, _ = ckpt.verify(Path(s["checkpoint"]))
    state = ckpt.load_state(s["checkpoint"])
    assert meta["iteration"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())
    record_property("outcome", "completed: 8 chains reset per rank and iteration, chains_reset=16 in MLflow, "
                               "finite weights")
