"""Every stage on object storage, against a local S3 server (moto's, started by the
`s3_server` fixture in conftest.py) with the real clients: pyarrow's S3 filesystem in the driver
and in every Ray worker, boto3 only to create the bucket. Preprocess from an s3:// image folder
into an s3:// dataset; train with checkpoints on s3:// and --resume from them; segment s3://
images into an s3:// dataset; a tune study whose state and trial checkpoints live on s3://."""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from drc_core.chains import InMemoryChainBuffer
from pipelines.lib import checkpoints as ckpt
from pipelines.lib.chain_reader import read_chains
from pipelines.lib import locations, mask_files
from pipelines.lib.imaging import decode_mask
from pipelines.lib.parquet_store import Store, load_arrays, read_part
from tests import corpora
from tests.test_preprocess import _direct
from tests.test_train import tracking_uri  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "s3://drc-test"
# cpu-32 at batch 4 with a small prior pool: 16 training images → 8 per worker on 2 workers
TINY = ["optim.batch_size=4", "langevin.prior_pool_size=16", "langevin.test_steps=4"]
N_TRAIN, N_TEST = 16, 4


def _objects(uri: str) -> set[str]:
    """The names of the objects under `uri`, relative to it (listed with pyarrow's S3 client)."""
    return {rel for rel, _ in locations.list_files(uri)}


def _download(uri: str) -> Path:
    return locations.download(uri, tempfile.mkdtemp(prefix="drc-s3-test-"))


@pytest.fixture(scope="module")
def photos(s3_server, tmp_path_factory) -> dict:
    """16 training and 4 test photos (40×30, in train/ and test/) with masks, and a text file
    among them, uploaded to s3://drc-test/corpus/."""
    local = tmp_path_factory.mktemp("corpus")
    keys = []
    for i in range(N_TRAIN + N_TEST):
        key = f"{'train' if i < N_TRAIN else 'test'}/p{i:02d}"
        corpora._save(Image.fromarray(corpora._rgb(i)), local / "photos" / f"{key}.png")
        corpora._save(corpora._mask(40, 30, i), local / "masks" / f"{key}.png")
        keys.append(key)
    (local / "photos" / "train" / "notes.txt").write_bytes(b"a stray text file in the corpus")
    s3, path = pafs.FileSystem.from_uri(f"{BUCKET}/corpus")
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    return {"local": local, "images": f"{BUCKET}/corpus/photos/", "masks": f"{BUCKET}/corpus/masks",
            "keys": keys}


@pytest.fixture(scope="module")
def dataset(ray_local, photos) -> dict:
    from pipelines import preprocess
    out = f"{BUCKET}/data/photos-32"
    manifest = preprocess.main(["--source", "folder", "--input", photos["images"], "--masks", photos["masks"],
                                "--out", out, "--preset", "cpu-32"])
    return {"uri": out, "manifest": manifest}


@pytest.fixture(scope="module")
def trained(dataset, tracking_uri):  # noqa: F811
    """Two workers, two iterations (one epoch), a checkpoint after each, the run record and the
    workers' chain logs on s3://."""
    from pipelines.train import main
    return main(["--data", dataset["uri"], "--workers", "2", "--iterations", "2", "--checkpoint-every", "1",
                 "--eval-every", "0", "--grid-every", "0", "--keep", "10", "--storage", f"{BUCKET}/runs",
                 "--tracking-uri", tracking_uri, *TINY])


def test_preprocess_reads_an_s3_image_folder_and_writes_the_dataset_to_s3(dataset, photos):
    m = dataset["manifest"]
    assert m["counts"] == {"inputs": N_TRAIN + N_TEST + 1, "ok": N_TRAIN + N_TEST, "quarantined": 1, "filtered": 0,
                           "per_split": {"test": N_TEST, "train": N_TRAIN}, "with_mask": N_TRAIN + N_TEST}
    (q,) = m["quarantine"]
    assert q["input"] == f"{BUCKET}/corpus/photos/train/notes.txt" and "cannot decode" in q["reason"]
    assert _objects(dataset["uri"]) == {"_manifest.json", "part-00000.parquet", "_quarantine/part-00000.parquet"}
    (row,) = read_part(Store(dataset["uri"]), "_quarantine/part-00000.parquet").to_pylist()   # a row of its own
    assert row["key"] == "train/notes" and row["status"] == "quarantined" and "cannot decode" in row["reason"]
    data = load_arrays(dataset["uri"])
    assert data["key"].tolist() == sorted(photos["keys"][:N_TRAIN]) + sorted(photos["keys"][N_TRAIN:])
    for i, key in enumerate(data["key"]):
        image, mask = _direct(photos["local"] / "photos" / f"{key}.png", 32,
                              mask=decode_mask((photos["local"] / "masks" / f"{key}.png").read_bytes()))
        assert np.array_equal(data["images"][i], image) and np.array_equal(data["masks"][i], mask), key
    assert not Path("s3:").exists()                         # nothing went to a local folder named after the URI


def test_a_missing_s3_folder_is_named_before_ray_starts(s3_server, no_ray):
    from pipelines import preprocess
    with pytest.raises(SystemExit, match=f"input folder not found: {BUCKET}/nothing-here"):
        preprocess.main(["--source", "folder", "--input", f"{BUCKET}/nothing-here", "--out", f"{BUCKET}/x"])
    with pytest.raises(SystemExit, match="input folder not found: s3://no-such-bucket/photos"):
        preprocess.main(["--source", "folder", "--input", "s3://no-such-bucket/photos", "--out", f"{BUCKET}/x"])


def test_train_checkpoints_to_s3_and_resume_continues_from_the_checkpoint(trained, dataset, tracking_uri):  # noqa: F811
    import mlflow
    from pipelines.train import main
    name = trained["name"]
    assert trained["checkpoint"] == f"{BUCKET}/runs/{name}/checkpoint_00000002"
    record = json.loads(locations.read_text(f"{BUCKET}/runs/{name}/drc_run.json"))
    assert record["mlflow_run_id"] == trained["mlflow_run_id"] and record["data"] == dataset["uri"]
    first = trained["checkpoint"]                                     # read where it is, nothing downloaded
    meta, records = ckpt.verify(first)
    assert meta["iteration"] == 2 and meta["world_size"] == 2
    # each rank's chains: the base its first checkpoint wrote and the delta of the 4 it advanced since,
    # in its chain log on s3://, outside the checkpoint folder
    for r in records:
        entries = r["chains"]["posterior"]
        assert [(e["kind"], e["rows"]) for e in entries] == [("base", 8), ("delta", 4)]
        assert all(locations.exists(f"{BUCKET}/runs/{name}/{e['file']}") for e in entries)
    assert not any("chains" in o for o in _objects(first))
    shards = [read_chains(first, r, "posterior") for r in records]
    merged = InMemoryChainBuffer.merge(shards, torch.arange(N_TRAIN))
    assert (merged.visits == 1).all()                                 # one epoch: every chain advanced once

    # same name and storage: Ray Train restores checkpoint 2 from s3:// and one worker re-shards it
    second = main(["--data", dataset["uri"], "--resume", name, "--workers", "1", "--iterations", "4",
                   "--checkpoint-every", "2", "--eval-every", "0", "--grid-every", "0", "--no-model",
                   "--storage", f"{BUCKET}/runs", "--tracking-uri", tracking_uri, *TINY])
    assert second["mlflow_run_id"] == trained["mlflow_run_id"]
    assert second["checkpoint"] == f"{BUCKET}/runs/{name}/checkpoint_00000004"
    assert {"checkpoint_00000002", "checkpoint_00000004"} <= {Path(f).name for f in
                                                              locations.subfolders(f"{BUCKET}/runs/{name}")}
    last = second["checkpoint"]
    meta, records = ckpt.verify(last)
    assert meta["iteration"] == 4 and meta["world_size"] == 1
    final = read_chains(last, records[0], "posterior")
    assert final["ids"].tolist() == list(range(N_TRAIN))
    # iterations 3-4 on one worker (batch 4, 16 ids) advanced 8 chains a second time; the other 8
    # are exactly as checkpoint 2 left them (a run started over would have visited each once)
    advanced = final["visits"] > merged.visits
    assert int(advanced.sum()) == 8 and (final["visits"][advanced] == 2).all()
    assert torch.equal(final["z"][~advanced], merged.z[~advanced])
    history = mlflow.tracking.MlflowClient(tracking_uri).get_metric_history(trained["mlflow_run_id"], "gen_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]            # continued, not repeated


def test_resume_on_s3_checks_the_saved_run_before_ray_starts(trained, dataset, tracking_uri, no_ray):  # noqa: F811
    from pipelines.train import main
    common = ["--data", dataset["uri"], "--storage", f"{BUCKET}/runs", "--tracking-uri", tracking_uri, *TINY]
    with pytest.raises(SystemExit, match=f"--resume no-such-run: no run of that name under {BUCKET}/runs"):
        main(["--resume", "no-such-run", *common])
    with pytest.raises(SystemExit, match=r"model.fg_dim is 16 but the checkpoint s3://.*/checkpoint_0000000\d "
                                         r"was trained with 32"):
        main(["--resume", trained["name"], *common, "model.fg_dim=16"])


def test_segment_reads_s3_images_and_writes_its_dataset_to_s3(trained, photos, tracking_uri):  # noqa: F811
    from pipelines import segment
    out = f"{BUCKET}/seg/photos"
    args = ["--model", trained["model_uri"], "--tracking-uri", tracking_uri, "--input", photos["images"],
            "--quiet", "--steps", "2", "--batch-size", "8"]
    m = segment.main([*args, "--output", out, "--png", f"{BUCKET}/png"])
    assert m["source"] == {"kind": "folder", "input": photos["images"]}
    assert m["counts"]["inputs"] == N_TRAIN + N_TEST + 1 and m["counts"]["ok"] == N_TRAIN + N_TEST
    (q,) = m["quarantine"]
    assert q["input"] == f"{BUCKET}/corpus/photos/train/notes.txt" and "cannot decode" in q["reason"]
    store = Store(out)
    manifest = store.check_parts()                                  # every part on s3:// reads
    assert manifest["counts"] == m["counts"] and "_manifest.json" in _objects(out)
    rows = sorted((r for name in manifest["file_names"] for r in read_part(store, name).to_pylist()),
                  key=lambda r: r["sample_id"])
    # ids as preprocess gives them: in (split, key) order, train before test
    assert [r["key"] for r in rows if r["status"] == "ok"] == sorted(photos["keys"][:N_TRAIN]) + \
        sorted(photos["keys"][N_TRAIN:])
    (bad,) = [r for r in rows if r["status"] != "ok"]                 # the quarantined input: a row of its own
    assert bad["key"] == "train/notes" and "cannot decode" in bad["reason"]
    rows = [r for r in rows if r["status"] == "ok"]
    pngs = _objects(f"{BUCKET}/png")                                 # --png on s3:// too, masks and overlays
    assert pngs == {f"{sub}/{mask_files.safe_name(r['sample_id'], r['key'])}" for r in rows
                    for sub in ("masks", "overlays")}
    for r in rows:
        mask = np.asarray(Image.open(io.BytesIO(r["mask"])))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
        assert r["fg_fraction"] == pytest.approx((mask > 0).mean()) and (r["height"], r["width"]) == (30, 40)


def test_a_study_keeps_its_state_and_trial_checkpoints_on_s3_and_resumes_from_there(dataset, tracking_uri):  # noqa: F811
    import mlflow
    from pipelines import tune
    storage = f"{BUCKET}/tune"
    # two workers per trial: each trial a Ray Train job (test_tune.py's studies run one worker per
    # trial, in the trial's own process), its checkpoints written to s3:// by Ray Train
    args = ["--space", str(ROOT / "tune_spaces/quick.yaml"), "--data", dataset["uri"], "--storage", storage,
            "--tracking-uri", tracking_uri, "--trials", "1", "--search", "random", "--no-early-stopping",
            "--iterations", "2", "--report-every", "2", "--eval-images", "4", "--eval-steps", "2",
            "--concurrency", "1", "--workers-per-trial", "2", *TINY]
    out = tune.main(["--name", "s3-study", *args])
    (trial,) = out["trials"]
    assert out["metric"] == "eval_iou" and trial["status"] == "ok" and trial["iterations"] == 2
    (run,) = locations.subfolders(f"{storage}/s3-study/trials")        # the trial's Ray Train run
    assert trial["checkpoint"] == f"{run}/checkpoint_00000002"
    assert {"meta.json", "state.pt", "config.json"} <= _objects(trial["checkpoint"])
    assert not any(o.startswith("chains/") for o in _objects(run))   # a trial keeps no chains unless asked
    study = _objects(f"{storage}/s3-study")
    assert {"drc_study.json", "summary.json"} <= study
    assert any(name.startswith("experiment_state") for name in study), study     # Ray Tune's own state
    assert json.loads(locations.read_text(f"{storage}/s3-study/summary.json"))["best"]["trial"] == trial["trial"]
    c = mlflow.tracking.MlflowClient(tracking_uri)
    assert {Path(a.path).name for a in c.list_artifacts(out["parent_run_id"], "best_checkpoint")} >= \
        {"state.pt", "meta.json"}                                   # copied from s3:// into MLflow

    resumed = tune.main(["--resume", "s3-study", *args])            # Tune restores the study from s3://
    assert resumed["parent_run_id"] == out["parent_run_id"] and resumed["unfinished"] == 0
    assert [t["trial"] for t in resumed["trials"]] == [trial["trial"]] and resumed["trials"][0]["iterations"] == 2
    assert c.get_run(out["parent_run_id"]).info.status == "FINISHED"
