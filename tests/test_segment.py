"""pipelines.segment / distill / evaluate on a real local Ray instance, real Parquet and MLflow."""
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from drc_core.fit import TrainState
from drc_core.presets import get_config
from drc_core.inference import decode, images_to_tensor
from pipelines.lib import checkpoints as ckpt
from pipelines.lib.chain_reader import ChainReader
from drc_core.threshold import DEFAULT, ThresholdPolicy
from pipelines import distill, evaluate, preprocess, segment
from pipelines.lib import mask_files
from pipelines.lib.evaluation_output import format_table
from pipelines.lib.parquet_store import load_arrays
from pipelines.lib.scoring import BEFORE_REFINE, SUBJECT_SIZES
from pipelines.lib.segment_output import read_predictions
from tests import corpora

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    """A 32² TM-dSprites dataset, a DRC checkpoint with persistent chains (2 shards) after a few
    EM iterations, and a student distilled from it (logged to MLflow)."""
    from tests.conftest import tiny_config
    root = tmp_path_factory.mktemp("seg")
    data = root / "data"
    preprocess.main(["--source", "tm-dsprites", "--preset", "cpu-32", "--train", "48", "--test", "24",
                     "--out", str(data), "--rows-per-file", "20"])
    cfg = tiny_config()
    train = load_arrays(str(data), "train")
    x = images_to_tensor(train["images"])
    folder = root / "ckpt"
    states = [TrainState.create(cfg, torch.arange(24 * r, 24 * (r + 1)), rank=r, world_size=2) for r in range(2)]
    for st in states:
        st.model.load_state_dict(states[0].model.state_dict())
        for _ in range(2):
            ids = st.chains.ids[:8]
            st.step(x[ids], ids)
    for r, st in enumerate(states):
        ckpt.write_shard(folder, rank=r, world_size=2, state=st, meta={"test": True})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summary = distill.main(["--teacher", str(folder), "--data", str(data), "--steps", "20", "--prior-images", "32",
                            "--width", "8", "--levels", "2", "--out", str(root / "student"), "--tracking-uri", uri])
    return {"root": root, "data": str(data), "ckpt": str(folder), "student": str(root / "student" / "student.pt"),
            "uri": uri, "distill": summary, "cfg": cfg, "train": train}


def _segment(world, out, *extra):
    return segment.main(["--input", world["data"], "--output", str(out), "--quiet", "--batch-size", "8", *extra])


def _read(out) -> pd.DataFrame:
    """The segmented rows of an output (quarantined inputs are rows of their own, left out here)."""
    return segment.read_output(str(out)).to_pandas()


def _rows(rows: list[dict]):
    """Rows as segment's read tasks hand them to the actor: photos by path, no pixels."""
    from pipelines.lib.segment_inputs import READ_SCHEMA
    return pa.Table.from_pylist([{"image": None, **r} for r in rows], schema=READ_SCHEMA)


def test_a_folder_with_broken_images_is_segmented_in_both_modes(world, tmp_path):
    corpora.broken_corpus(tmp_path / "in", tmp_path / "masks")
    (tmp_path / "in" / "we ird$name..png").write_bytes((tmp_path / "in" / "a_rgb.png").read_bytes())
    for mode, model in (("langevin", world["ckpt"]), ("amortized", world["student"])):
        out = tmp_path / f"out-{mode}"
        m = segment.main(["--model", model, "--input", str(tmp_path / "in"), "--output", str(out), "--quiet",
                          "--steps", "3", "--max-pixels", "1000000", "--png", str(tmp_path / f"png-{mode}")])
        c = m["counts"]
        assert m["mode"] == mode and c["ok"] + c["quarantined"] == c["inputs"]
        reasons = {q["key"]: q["reason"] for q in m["quarantine"]}
        assert c["ok"] == 14, reasons            # 11 good formats + 2 images whose masks are bad + "we ird$name."
        assert {"bad_zero", "bad_truncated", "bad_bomb", "bad_link", "notes", "bad_html"} <= set(reasons)
        assert "empty file" in reasons["bad_zero"] and "decompression bomb" in reasons["bad_bomb"]
        assert "duplicate key" in next(r for k, r in reasons.items() if k == "a_rgb")
        df = _read(out)
        assert len(df) == 14 and set(df.columns) == {"sample_id", "key", "split", "mask", "fg_fraction",
                                                     "confidence", "recon_l1", "prob", "threshold",
                                                     "height", "width", "region", "refined"}
        masks = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in df["mask"]])
        assert masks.shape == (14, 32, 32) and set(np.unique(masks)) <= {0, 255}
        # the stored π_f (8 bits) reproduces the mask under the recorded threshold, up to quantisation
        prob = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in df["prob"]]).astype(np.float64) / 255
        th = df["threshold"].to_numpy()[:, None, None]
        clear = np.abs(prob - th) > 1 / 255
        assert np.array_equal((masks > 0)[clear], (prob > th)[clear])
        assert json.loads((out / "_manifest.json").read_text())["threshold_policy"] == DEFAULT.name
        np.testing.assert_allclose(df["fg_fraction"], (masks > 0).reshape(14, -1).mean(1))
        stored = np.clip(2 * prob - 1, -1, 1)                 # confidence = mean |2π_f − 1| of the stored π_f
        assert np.allclose(df["confidence"], np.abs(stored).mean(axis=(1, 2)), atol=2 / 255)
        assert df["recon_l1"].isna().all() == (mode == "amortized")
        names = sorted(p.name for p in (tmp_path / f"png-{mode}" / "overlays").iterdir())
        assert len(names) == 14 and all("/" not in n and not n.startswith(".") for n in names)
        assert any(n.endswith("-we_ird_name.png") for n in names)
        # the PNG masks and overlays are at each photo's own size; the Parquet rows say which
        for r in df.itertuples():
            name = mask_files.safe_name(r.sample_id, r.key)
            with Image.open(tmp_path / f"png-{mode}" / "masks" / name) as mask_img, \
                    Image.open(tmp_path / f"png-{mode}" / "overlays" / name) as over_img:
                assert mask_img.size == over_img.size == (r.width, r.height)
            assert list(r.region) == [0, 0, r.width, r.height]             # --crop resize: the whole photo
        assert len({(r.width, r.height) for r in df.itertuples()}) > 1
        assert json.loads((out / "_manifest.json").read_text())["counts"] == c


def test_langevin_masks_are_deterministic_and_independent_of_batching(world, tmp_path, monkeypatch):
    a = _segment(world, tmp_path / "a", "--model", world["ckpt"], "--split", "test", "--steps", "4")
    c = _segment(world, tmp_path / "c", "--model", world["ckpt"], "--split", "test", "--steps", "4", "--seed", "1")
    # batches of 8 (a unit per batch), two actors (they fill both CPUs of the session's instance: the
    # Parquet reads must still run) and a corpus cut into windows of WINDOW_UNITS units, one Ray Data
    # execution each (the driver keeps per-block stats only for one): three windows of one unit
    monkeypatch.setattr(segment, "WINDOW_UNITS", 1)
    b = _segment(world, tmp_path / "b", "--model", world["ckpt"], "--split", "test", "--steps", "4",
                 "--batch-size", "8", "--actors", "2")
    assert a["counts"]["ok"] == b["counts"]["ok"] == 24 and a["steps"] == 4
    assert b["files"] >= 3 > a["files"]
    da, db, dc = _read(tmp_path / "a"), _read(tmp_path / "b"), _read(tmp_path / "c")
    assert da["sample_id"].tolist() == db["sample_id"].tolist() == list(range(48, 72))
    assert da["mask"].tolist() == db["mask"].tolist()                 # the same masks however it is cut
    np.testing.assert_allclose(da["recon_l1"], db["recon_l1"], rtol=1e-4)
    assert not np.allclose(da["recon_l1"], dc["recon_l1"])          # another seed, other chains


def test_from_chains_decodes_the_persistent_chains_under_each_threshold_policy(world, tmp_path):
    from pipelines.lib.models import load
    teacher = load(world["ckpt"])
    z = ChainReader(world["ckpt"]).get(np.arange(48))
    prob = decode(teacher.net, images_to_tensor(world["train"]["images"]), z).prob
    for policy in ("0.5", "otsu", "0.3"):
        m = _segment(world, tmp_path / policy, "--model", world["ckpt"], "--split", "train", "--from-chains",
                     "--steps", "0", "--threshold", policy)
        assert m["from_chains"] and m["counts"]["ok"] == 48 and m["threshold_policy"] == policy
        df = _read(tmp_path / policy)
        want = ThresholdPolicy.parse(policy)
        got = np.stack([np.asarray(Image.open(io.BytesIO(b))) > 0 for b in df["mask"]])
        assert np.array_equal(got, want.masks(prob).numpy()), policy
        np.testing.assert_allclose(df["threshold"], want.thresholds(prob).numpy())
    with pytest.raises(SystemExit, match="--threshold: threshold policy 'sometimes'"):
        _segment(world, tmp_path / "bad", "--model", world["ckpt"], "--threshold", "sometimes")
    with pytest.raises(Exception, match="no persistent chain"):
        _segment(world, tmp_path / "t", "--model", world["ckpt"], "--split", "test", "--from-chains")


def test_distilled_student_is_tracked_and_its_pyfunc_segments(world):
    import mlflow
    s = world["distill"]
    assert s["pairs"] == ["chains", "prior"] and s["eval"]["images"] == 24
    assert s["eval"]["threshold"] == DEFAULT.name and "iou" in s["eval"]["protocol"]
    run = mlflow.tracking.MlflowClient(world["uri"]).get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["pairs"] == "chains,prior"
    assert run.data.params["targets"] == DEFAULT.name            # hard targets from the default policy
    # a TM-dSprites teacher: the boundary prior is off by default (its sprites may touch the frame)
    assert s["max_border"] is None and run.data.params["max_border"] == "off"
    assert s["pairs_kept"] == {"chains": [48, 48], "prior": [32, 32]}
    assert "eval_iou" in run.data.metrics and "loss" in run.data.metrics
    mlflow.set_tracking_uri(world["uri"])
    model = mlflow.pyfunc.load_model(s["model_uri"])
    test = load_arrays(world["data"], "test")
    pngs = []
    for img in test["images"][:5]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    out = model.predict(pd.DataFrame({"image": pngs}))
    from drc_core.amortized import predict
    from pipelines.lib.models import load
    prob = predict(load(world["student"]).net, test["images"][:5])
    got = np.stack([np.asarray(Image.open(io.BytesIO(b))) > 0 for b in out["mask_png"]])
    assert np.array_equal(got, DEFAULT.masks(prob).numpy()) and out["recon_l1"].isna().all()
    half = model.predict(pd.DataFrame({"image": pngs}), params={"threshold": "0.5"})
    got = np.stack([np.asarray(Image.open(io.BytesIO(b))) > 0 for b in half["mask_png"]])
    assert np.array_equal(got, prob.numpy() > 0.5) and (half["threshold"] == 0.5).all()


def test_evaluate_writes_tables_report_and_mlflow_run(world, tmp_path, monkeypatch):
    _segment(world, tmp_path / "l", "--model", world["ckpt"], "--steps", "3")
    _segment(world, tmp_path / "a", "--model", world["student"])
    r = evaluate.main(["--data", world["data"], "--pred", f"langevin={tmp_path / 'l'}", "--pred",
                       f"amortized={tmp_path / 'a'}", "--out", str(tmp_path / "eval"), "--tracking-uri", world["uri"],
                       "--threshold", "otsu-corpus"])
    methods = {row["method"] for row in r["table"]}
    assert {"langevin", "amortized", "GrabCut", "all foreground", f"langevin, {evaluate.PROTOCOL_LABEL}",
            f"amortized, {evaluate.PROTOCOL_LABEL}", "langevin, threshold otsu-corpus"} <= methods
    # the protocol row is the stored π_f at ½, recomputed without the model
    pred = read_predictions(str(tmp_path / "l"))
    gt = load_arrays(world["data"])
    from drc_core.metrics import mean_iou_dice as miou
    want = miou(pred["prob"] > 0.5, gt["masks"] > 0)["iou"]
    assert next(row["iou"] for row in r["table"] if row["method"] == f"langevin, {evaluate.PROTOCOL_LABEL}"
                and row["split"] == "all") == pytest.approx(want)
    assert any(m.startswith("centred disc") for m in methods)
    # Parquet rows refined by GrabCut are scored at model resolution by the refined column, π_f's own
    # mask (the plain amortized output's) beside them
    _segment(world, tmp_path / "r", "--model", world["student"], "--refine", "grabcut")
    r2 = evaluate.main(["--data", world["data"], "--pred", f"refined={tmp_path / 'r'}", "--out",
                        str(tmp_path / "eval-r"), "--tracking-uri", world["uri"], "--no-grabcut"])
    at = {row["method"]: row["iou"] for row in r2["table"] if row["split"] == "all"}
    refined = read_predictions(str(tmp_path / "r"))
    assert refined["sample_id"].tolist() == sorted(gt["sample_id"].tolist())
    assert at["refined"] == pytest.approx(miou(np.stack(refined["refined"]) == 255, gt["masks"] > 0)["iou"])
    assert at[f"refined, {BEFORE_REFINE}"] == pytest.approx(
        next(row["iou"] for row in r["table"] if row["method"] == "amortized" and row["split"] == "all"))
    assert {row["split"] for row in r["table"]} == {"train", "test", "all"}
    allfg = next(row for row in r["table"] if row["method"] == "all foreground" and row["split"] == "test")
    test = load_arrays(world["data"], "test")
    from drc_core.metrics import mean_iou_dice
    assert allfg["iou"] == pytest.approx(mean_iou_dice(np.ones_like(test["masks"]), test["masks"])["iou"])
    html = (tmp_path / "eval" / "report.html").read_text()
    assert 'id="results"' in html and "GrabCut" in html and html.count("<figure>") == 12
    assert len(pd.read_csv(tmp_path / "eval" / "per_image.csv")) == 72
    import mlflow
    run = mlflow.tracking.MlflowClient(world["uri"]).get_run(r["mlflow_run_id"])
    assert run.data.metrics["GrabCut.test.iou"] == pytest.approx(
        next(row["iou"] for row in r["table"] if row["method"] == "GrabCut" and row["split"] == "test"))
    # units of 8 images, 2 per Ray Data execution (5 windows): the same scores, per image and in total
    monkeypatch.setattr(evaluate, "UNIT", 8)
    monkeypatch.setattr(evaluate, "WINDOW_UNITS", 2)
    r3 = evaluate.main(["--data", world["data"], "--pred", f"langevin={tmp_path / 'l'}", "--pred",
                        f"amortized={tmp_path / 'a'}", "--out", str(tmp_path / "eval-w"), "--tracking-uri",
                        world["uri"], "--threshold", "otsu-corpus"])
    assert [(x["method"], x["split"], x["images"]) for x in r3["table"]] == \
        [(x["method"], x["split"], x["images"]) for x in r["table"]]
    assert [x["iou"] for x in r3["table"]] == pytest.approx([x["iou"] for x in r["table"]], abs=1e-4)
    assert pd.read_csv(tmp_path / "eval-w" / "per_image.csv").equals(pd.read_csv(tmp_path / "eval" / "per_image.csv"))


def test_bad_references_fail_with_clear_errors(world, tmp_path):
    with pytest.raises(SystemExit, match="is a langevin model"):
        _segment(world, tmp_path / "x", "--model", world["ckpt"], "--mode", "amortized")
    with pytest.raises(SystemExit, match="no such file"):
        _segment(world, tmp_path / "x", "--model", str(tmp_path / "missing.pt"))
    other = tmp_path / "d64"
    preprocess.main(["--source", "tm-dsprites", "--preset", "cpu-64", "--train", "2", "--test", "0", "--out", str(other)])
    with pytest.raises(SystemExit, match="resolution 64"):
        segment.main(["--model", world["student"], "--input", str(other), "--output", str(tmp_path / "y"), "--quiet"])
    _segment(world, tmp_path / "z", "--model", world["student"])
    with pytest.raises(SystemExit, match="already exists"):
        _segment(world, tmp_path / "z", "--model", world["student"])
    with pytest.raises(SystemExit, match="already a distilled student"):
        distill.main(["--teacher", world["student"], "--tracking-uri", world["uri"]])


class _Oracle:
    """Stands in for the model in the geometry test: π_f = 1 on bright pixels of exactly the
    model input it receives, so any misplacement between photo, model input and full-size mask
    shows up as a misaligned mask."""
    resolution = 32
    kind = "amortized"
    cfg = get_config("cpu-32")                                            # TM-dSprites: no refinement by default

    def segment(self, images, ids, **kw):
        return {"prob": (images.mean(-1) > 127).astype(np.float32), "recon_l1": None}


@pytest.mark.parametrize("crop", ["resize", "center"])
def test_full_size_masks_line_up_with_an_object_in_a_large_non_square_photo(tmp_path, crop):
    from pipelines.segment import SegmentBatch
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 90, (600, 1000, 3), dtype=np.uint8)           # dark noise, 1000 wide, 600 high
    photo[220:400, 560:760] = 230                                          # the object, inside the centre square
    truth = np.zeros((600, 1000), bool)
    truth[220:400, 560:760] = True
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo).save(folder / "wide.png")
    Image.fromarray(photo.transpose(1, 0, 2).copy()).save(folder / "tall.png")
    actor = SegmentBatch.__new__(SegmentBatch)
    actor.seg, actor.steps, actor.seed, actor.batch_size, actor.chains = _Oracle(), 0, 0, 4, None
    actor.png, actor.max_pixels, actor.crop = str(tmp_path / "png"), 10 ** 8, crop
    actor.policy, actor.refine, actor.max_side = ThresholdPolicy.parse("0.5"), False, segment.REFINE_MAX_SIDE
    rows = _rows([{"sample_id": i, "key": k, "split": "", "path": str(folder / f"{k}.png")}
                  for i, k in enumerate(["tall", "wide"])])
    table = actor(rows).to_pandas()
    assert (table["status"] == "ok").all()
    for r, want in zip(table.itertuples(), (truth.T, truth)):
        assert (r.height, r.width) == want.shape
        with Image.open(tmp_path / "png" / "masks" / mask_files.safe_name(r.sample_id, r.key)) as f:
            mask = np.asarray(f)
        assert mask.shape == want.shape
        fg = mask == 255
        iou = (fg & want).sum() / (fg | want).sum()
        # a model pixel is 31 photo pixels along the long side: edges are that coarse, but the
        # mask's centre must sit on the object's (a shift by one model pixel moves it 15-31 px)
        assert iou > 0.85, (r.key, crop, iou)
        centre = np.argwhere(fg).mean(0) - np.argwhere(want).mean(0)
        assert np.abs(centre).max() < 4, (r.key, crop, centre)
        outside = mask == 128
        if crop == "resize":
            assert not outside.any()
        else:                                                               # outside the centred square
            side = min(want.shape)
            assert outside.sum() == want.size - side * side


class _Blurry(_Oracle):
    """A model whose π_f is the object grown by three model pixels (0.7, no pixel sure) around a sure
    core (0.95): the coarse blob a 32² model paints."""

    def segment(self, images, ids, **kw):
        bright = images.mean(-1) > 127
        grown, core = bright.copy(), bright.copy()
        for axis in (1, 2):
            for shift in (-3, -2, -1, 1, 2, 3):
                grown |= np.roll(bright, shift, axis)
                if abs(shift) == 1:
                    core &= np.roll(bright, shift, axis)
        return {"prob": np.where(core, 0.95, np.where(grown, 0.7, 0.0)).astype(np.float32), "recon_l1": None}


def _wide_photo(tmp_path, sample_id: int, crop: str = "resize"):
    """(a 600 × 1000 photo of dark noise with a textured bright object, its true mask, a SegmentBatch
    over the _Blurry model that writes PNGs under tmp_path/png, the photo's one row with `sample_id`)."""
    from pipelines.segment import SegmentBatch
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 90, (600, 1000, 3), dtype=np.uint8)
    photo[200:420, 540:780] = rng.integers(190, 255, (220, 240, 3), dtype=np.uint8)   # a textured object
    truth = np.zeros((600, 1000), bool)
    truth[200:420, 540:780] = True
    (tmp_path / "photos").mkdir()
    Image.fromarray(photo).save(tmp_path / "photos" / "wide.png")
    actor = SegmentBatch.__new__(SegmentBatch)
    actor.seg, actor.steps, actor.seed, actor.batch_size, actor.chains = _Blurry(), 0, 0, 4, None
    actor.png, actor.max_pixels, actor.crop = str(tmp_path / "png"), 10 ** 8, crop
    actor.policy = ThresholdPolicy.parse("0.5")
    rows = _rows([{"sample_id": sample_id, "key": "wide", "split": "",
                   "path": str(tmp_path / "photos" / "wide.png")}])
    return photo, truth, actor, rows


def _iou(mask, truth):
    return (mask & truth).sum() / (mask | truth).sum()


@pytest.mark.parametrize("crop", ["resize", "center"])
@pytest.mark.parametrize("max_side", [2000, 400])
def test_segment_refine_redraws_a_blurred_mask_on_the_object_at_the_photos_size(tmp_path, crop, max_side):
    """--refine grabcut: the blob π_f > ½ (too large) becomes the object's outline at the photo's own
    size, directly or via a copy scaled to --refine-max-side; the `refined` column is the mask --png
    writes; a centre crop leaves the outside not segmented."""
    photo, truth, actor, rows = _wide_photo(tmp_path, 3, crop)

    def iou(mask):
        return _iou(mask, truth)
    actor.refine, actor.max_side = False, max_side
    plain = actor(rows).to_pandas().iloc[0]
    assert plain["refined"] is None
    with Image.open(tmp_path / "png" / "masks" / mask_files.safe_name(3, "wide")) as f:
        blob = np.asarray(f)
    actor.refine = True
    row = actor(rows).to_pandas().iloc[0]
    refined = np.asarray(Image.open(io.BytesIO(row["refined"])))
    with Image.open(tmp_path / "png" / "masks" / mask_files.safe_name(3, "wide")) as f:
        assert np.array_equal(np.asarray(f), refined)                # --png writes the refined mask
    assert refined.shape == truth.shape
    assert iou(blob == 255) < 0.75 < 0.95 < iou(refined == 255), (iou(blob == 255), iou(refined == 255))
    assert np.array_equal(refined == 128, blob == 128)               # the same pixels stay not segmented
    assert (refined == 128).any() == (crop == "center")
    assert row["mask"] == plain["mask"] and row["prob"] == plain["prob"]   # π_f's own outputs unchanged
    assert actor(rows).to_pandas().iloc[0]["refined"] == row["refined"]  # deterministic


def test_the_pyfunc_and_segment_prepare_a_photo_identically_and_return_full_size_masks():
    from pipelines.lib.imaging import model_input
    from pipelines.lib.mlflow_model import DRCSegmenter, _as_images
    photo = np.random.default_rng(1).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    arr, geometry = _as_images(pd.DataFrame({"image": [buf.getvalue()]}), 32)
    expected, region = model_input(photo, 32, "resize")
    assert np.array_equal(arr[0], expected) and np.array_equal(geometry[0].pop("photo"), photo)
    assert geometry == [{"height": 120, "width": 200, "region": region}]
    model = DRCSegmenter()
    model.segmenter = _Oracle()
    out = model.predict(None, pd.DataFrame({"image": [buf.getvalue()]}), params={"threshold": "0.5"})
    with Image.open(io.BytesIO(out["mask_png"][0])) as f:
        assert f.size == (200, 120)


class _PhotoBlurry(_Blurry):
    cfg = get_config("photo-32")                                          # trained on photos: refined by default


def test_the_pyfunc_refines_a_photo_models_mask_with_grabcut_as_segment_does(tmp_path):
    """The pyfunc's `refine` param: 'auto' (default) re-draws a photo model's mask with GrabCut at the
    photo's own size, the very mask `segment --refine grabcut` stores for the same photo and seed;
    'off' keeps π_f's blob; a model trained on TM-dSprites is not refined unless asked."""
    from pipelines.lib.mlflow_model import DRCSegmenter
    photo, truth, actor, rows = _wide_photo(tmp_path, 0)
    actor.seg, actor.refine, actor.max_side = _PhotoBlurry(), True, segment.REFINE_MAX_SIDE
    stored = np.asarray(Image.open(io.BytesIO(actor(rows).to_pandas().iloc[0]["refined"]))) == 255
    frame = pd.DataFrame({"image": [(tmp_path / "photos" / "wide.png").read_bytes()]})
    model = DRCSegmenter()

    def mask(**params):
        with Image.open(io.BytesIO(model.predict(None, frame, params={"threshold": "0.5", **params})["mask_png"][0])) as f:
            return np.asarray(f) == 255
    model.segmenter = _PhotoBlurry()
    refined, blob = mask(), mask(refine="off")
    assert np.array_equal(refined, stored) and refined.shape == truth.shape
    assert _iou(blob, truth) < 0.75 < 0.95 < _iou(refined, truth), (_iou(blob, truth), _iou(refined, truth))
    model.segmenter = _Blurry()                                           # cpu-32, TM-dSprites
    assert np.array_equal(mask(), blob) and np.array_equal(mask(refine="grabcut"), refined)
    with pytest.raises(ValueError, match="--refine 'sometimes'"):
        mask(refine="sometimes")


def test_evaluate_scores_photos_at_their_own_size_as_segment_writes_them(world, tmp_path):
    """A folder of non-square photos with masks at their own size: evaluate --masks scores the π_f that
    segment stored, mapped back onto each photo, and gets exactly the IoU of the full-size PNG masks
    segment wrote; baselines are computed on the full photos."""
    from PIL import Image
    from drc_core.metrics import mean_iou_dice
    photos, truth = tmp_path / "photos", tmp_path / "truth"
    photos.mkdir()
    truth.mkdir()
    train = world["train"]
    sizes = [(48, 80), (90, 60), (64, 64), (33, 101)]
    for i, (h, w) in enumerate(sizes * 2):
        Image.fromarray(train["images"][i]).resize((w, h), Image.BILINEAR).save(photos / f"p{i}.png")
        Image.fromarray((train["masks"][i] > 0).astype(np.uint8) * 255).resize((w, h), Image.NEAREST) \
            .save(truth / f"p{i}.png")
    (truth / "p7.png").unlink()                                  # a photo without a mask is not scored
    small, large = np.zeros(sizes[0], np.uint8), np.zeros(sizes[1], np.uint8)   # a subject of each size class
    small[20:28, 30:40], large[5:85, 4:56] = 255, 255                           # 2 % and 77 % of the photo
    Image.fromarray(small).save(truth / "p0.png")
    Image.fromarray(large).save(truth / "p1.png")
    seg = segment.main(["--input", str(photos), "--output", str(tmp_path / "seg"), "--quiet", "--model",
                        world["student"], "--png", str(tmp_path / "png")])
    assert seg["refine"] is None                                 # auto: a TM-dSprites model is not refined
    segment.main(["--input", str(photos), "--output", str(tmp_path / "seg-r"), "--quiet", "--model", world["student"],
                  "--png", str(tmp_path / "png-r"), "--refine", "grabcut"])
    r = evaluate.main(["--data", str(photos), "--masks", str(truth), "--pred", f"student={tmp_path / 'seg'}",
                       "--pred", f"refined={tmp_path / 'seg-r'}",
                       "--out", str(tmp_path / "eval"), "--tracking-uri", world["uri"]])
    assert r["scored_at"] == "original size" and r["coverage"]["evaluated (covered by every method)"] == 7
    rows = {row["method"]: row for row in r["table"]}
    pred = read_predictions(str(tmp_path / "seg"))
    ious, refined_ious = [], []
    for i in range(7):
        gt = np.asarray(Image.open(truth / f"p{i}.png")) > 127
        sid = pred["sample_id"][pred["key"].index(f"p{i}")]
        with Image.open(tmp_path / "png" / "masks" / mask_files.safe_name(sid, f"p{i}")) as f:
            written = np.asarray(f) == 255
        with Image.open(tmp_path / "png-r" / "masks" / mask_files.safe_name(sid, f"p{i}")) as f:
            refined = np.asarray(f) == 255
        assert written.shape == refined.shape == gt.shape == sizes[i % 4]
        ious.append(mean_iou_dice(written, gt)["iou"])
        refined_ious.append(mean_iou_dice(refined, gt)["iou"])
    assert rows["student"]["iou"] == pytest.approx(np.mean(ious), abs=1e-6)
    # a refined output is scored by the masks GrabCut drew, with π_f's own mask beside them
    assert rows["refined"]["iou"] == pytest.approx(np.mean(refined_ious), abs=1e-6)
    assert rows[f"refined, {BEFORE_REFINE}"]["iou"] == pytest.approx(rows["student"]["iou"])
    assert f"student, {BEFORE_REFINE}" not in rows
    allfg = np.mean([mean_iou_dice(np.ones_like(g), g)["iou"] for g in
                     (np.asarray(Image.open(truth / f"p{i}.png")) > 127 for i in range(7))])
    assert rows["all foreground"]["iou"] == pytest.approx(allfg)
    assert {"GrabCut", f"student, {evaluate.PROTOCOL_LABEL}"} <= set(rows)
    assert any(m.startswith("centred disc") for m in rows)
    # by subject size (the true mask's share of the photo), on GrabCut's images (all 7 here): each
    # photo in its class; all-foreground's IoU is the share itself; wins counted per photo
    per = pq.read_table(tmp_path / "eval" / "per_image.parquet").to_pandas().set_index("key")
    areas = np.array([(np.asarray(Image.open(truth / f"p{i}.png")) > 127).mean() for i in range(7)])
    assert per.loc[[f"p{i}" for i in range(7)], "truth_area"].to_numpy() == pytest.approx(areas, abs=1e-6)
    grab = per.loc[[f"p{i}" for i in range(7)], "iou[GrabCut]"].to_numpy() * 100
    by_size = {r["subset"]: r for r in r["by_subject_size"]}
    assert [by_size[name]["images"] for name, _, _ in SUBJECT_SIZES] == [1, 5, 1]
    for name, lo, hi in SUBJECT_SIZES:
        sel = (areas >= lo) & (areas < hi)
        got = by_size[name]["methods"]
        assert got["all foreground"]["iou"] == pytest.approx(100 * areas[sel].mean(), abs=1e-3)
        assert got["student"]["iou"] == pytest.approx(np.mean(np.array(ious)[sel]), abs=1e-3)
        assert got["student"]["beats_grabcut"] == pytest.approx(np.mean(np.array(ious)[sel] > grab[sel]))
        assert {"GrabCut", "refined"} <= set(got) and any(m.startswith("centred disc (best area") for m in got)


def test_distill_pair_progress_reports_count_rate_and_eta(monkeypatch):
    from pipelines import distill as d
    clock = iter([0.0, 5.0, 20.0, 22.0, 40.0])
    monkeypatch.setattr(d.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    tick = d._progress("posterior pairs", lines.append, every=15.0)
    tick(100, 1000)            # 5 s: too soon after the start
    tick(400, 1000)            # 20 s: 20 images/s, 600 left → 30 s
    tick(450, 1000)            # 22 s: too soon after the last line
    tick(1000, 1000)           # done: the caller's summary line says it
    assert lines == ["posterior pairs: 400/1000 images, 20.0 images/s, eta 30 s"]


def test_distill_keeps_only_pairs_whose_mask_stays_off_the_frame(world, tmp_path):
    import mlflow
    from types import SimpleNamespace
    import torch
    from drc_core.amortized import chain_pairs, prior_pairs
    from drc_core.metrics import border_fraction
    from drc_core.presets import get_config
    from pipelines.lib.models import load
    teacher, train = load(world["ckpt"]), world["train"]
    _, prob = chain_pairs(teacher.net, train["images"], ChainReader(teacher.checkpoint).get(train["sample_id"]))
    frac = border_fraction(DEFAULT.masks(prob))
    limit = float(frac.median())                  # about half the chain pairs stay, whatever the teacher
    args = ["--teacher", world["ckpt"], "--data", world["data"], "--steps", "5", "--prior-images", "32",
            "--tracking-uri", world["uri"], "--no-model", "--quiet"]
    s = distill.main([*args, "--max-border", str(limit), "--out", str(tmp_path / "d")])
    assert s["max_border"] == limit and s["pairs_kept"]["chains"] == [int((frac <= limit).sum()), 48]
    # the prior pairs distill made (seed 0 + 1), drawn again here: the same ones are kept
    _, prior_prob = prior_pairs(teacher.net, teacher.cfg, 32, generator=torch.Generator().manual_seed(1))
    prior_kept = int((border_fraction(DEFAULT.masks(prior_prob)) <= limit).sum())
    assert s["pairs_kept"]["prior"] == [prior_kept, 32]
    run = mlflow.tracking.MlflowClient(world["uri"]).get_run(s["mlflow_run_id"])
    assert float(run.data.params["max_border"]) == limit
    assert run.data.metrics["pairs_kept"] == sum(a for a, _ in s["pairs_kept"].values())
    # 'auto': on for a teacher trained on photos, off for the synthetic benchmarks
    assert distill.resolve_max_border("auto", SimpleNamespace(cfg=get_config("photo-32"))) == distill.AUTO_MAX_BORDER
    assert distill.resolve_max_border("auto", SimpleNamespace(cfg=get_config("cpu-32"))) is None
    for bad in ("2", "-0.1", "half"):
        with pytest.raises(SystemExit, match=f"distill: --max-border '{bad}': expected a fraction in"):
            distill.main([*args, "--max-border", bad, "--out", str(tmp_path / "bad")])


def test_distill_pools_the_pairs_of_several_teachers(world, tmp_path):
    import mlflow
    from drc_core.model import DRCModel
    from drc_core.presets import get_config
    from pipelines.lib.models import save_drc
    cfg = world["cfg"]
    torch.manual_seed(1)
    other = save_drc(tmp_path / "other.pt", cfg, DRCModel(cfg.model, cfg.ablation).state_dict())
    args = ["--data", world["data"], "--steps", "5", "--prior-images", "32", "--tracking-uri", world["uri"],
            "--no-model", "--quiet", "--max-border", "off"]
    s = distill.main(["--teacher", world["ckpt"], "--teacher", str(other), "--pairs", "prior", *args,
                      "--out", str(tmp_path / "pool")])
    assert s["teachers"] == [world["ckpt"], str(other)]
    assert s["pairs_kept"] == {"0:prior": [32, 32], "1:prior": [32, 32]}       # --max-border off keeps all
    run = mlflow.tracking.MlflowClient(world["uri"]).get_run(s["mlflow_run_id"])
    assert run.data.params["teachers"] == "2" and run.data.metrics["pairs_kept"] == 64
    assert run.data.params["teacher"] == f"{world['ckpt']},{other}"
    # chain pairs need every teacher to be a checkpoint folder: the error names the one that is not
    with pytest.raises(SystemExit, match=f"chains needs a training checkpoint folder as --teacher, not {other}"):
        distill.main(["--teacher", world["ckpt"], str(other), "--pairs", "chains", *args, "--out", str(tmp_path / "c")])
    # one resolution: a 64² teacher beside a 32² one is refused before any pair is made
    big = get_config("cpu-64")
    wide = save_drc(tmp_path / "wide.pt", big, DRCModel(big.model, big.ablation).state_dict())
    with pytest.raises(SystemExit, match=f"--teacher {wide} has resolution 64, --teacher {world['ckpt']} 32"):
        distill.main(["--teacher", world["ckpt"], str(wide), "--pairs", "prior", *args, "--out", str(tmp_path / "w")])


def test_distill_refine_grabcut_redraws_the_chain_masks_and_keeps_the_prior_ones(world, tmp_path):
    import mlflow
    from types import SimpleNamespace
    from drc_core.amortized import chain_pairs
    from drc_core.presets import get_config
    from pipelines.lib.grabcut import grabcut_refine
    from pipelines.lib.models import load
    teacher, train = load(world["ckpt"]), world["train"]
    _, prob = chain_pairs(teacher.net, train["images"], ChainReader(teacher.checkpoint).get(train["sample_id"]))
    refined = grabcut_refine(train["images"], prob.numpy(), DEFAULT.masks(prob).numpy())
    assert (refined != DEFAULT.masks(prob).numpy()).any()        # GrabCut moved some of the teacher's masks
    pairs = [(torch.zeros(48, 3, 32, 32), prob), (torch.zeros(32, 3, 32, 32), torch.rand(32, 32, 32))]
    out = distill.refine_pairs(pairs, ["chains", "prior"], train["images"], DEFAULT)
    assert torch.equal(out[0][1].bool(), torch.from_numpy(refined))   # the pool gives the one-process masks
    assert out[1][1] is pairs[1][1]                                   # prior pairs keep their exact masks
    # a 0/1 map passes the threshold policy unchanged, so the student learns GrabCut's masks as drawn
    assert torch.equal(DEFAULT.masks(out[0][1]), out[0][1].bool())
    args = ["--teacher", world["ckpt"], "--data", world["data"], "--steps", "5", "--prior-images", "32",
            "--tracking-uri", world["uri"], "--no-model", "--quiet", "--max-border", "off"]
    s = distill.main([*args, "--refine", "grabcut", "--out", str(tmp_path / "r")])
    assert s["refine"] == "grabcut" and s["pairs_kept"]["chains"] == [48, 48]
    run = mlflow.tracking.MlflowClient(world["uri"]).get_run(s["mlflow_run_id"])
    assert run.data.params["refine"] == "grabcut"
    assert world["distill"]["refine"] == "off"                   # 'auto' on TM-dSprites: off
    assert distill.resolve_refine("auto", SimpleNamespace(cfg=get_config("photo-32"))) is True
    with pytest.raises(SystemExit, match="--refine grabcut re-draws masks: it needs a threshold policy"):
        distill.main([*args, "--refine", "grabcut", "--targets", "soft", "--out", str(tmp_path / "soft")])


def test_grabcut_refine_snaps_a_rough_mask_to_the_object():
    from pipelines.lib.grabcut import grabcut_refine, grabcut_refine_all
    from drc_core.metrics import mean_iou_dice
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(60, 12, (6, 32, 32, 3)), 0, 255).astype(np.uint8)
    truth = np.zeros((6, 32, 32), bool)
    truth[:, 10:22, 8:20] = True
    images[truth] = np.clip(rng.normal(200, 12, (int(truth.sum()), 3)), 0, 255).astype(np.uint8)
    prob = np.zeros((6, 32, 32), np.float32)
    prob[:, 8:26, 6:24] = 0.7                     # a blob too large, no pixel sure
    prob[:, 14:18, 12:16] = 0.95                  # and a sure core
    rough = prob > 0.5
    refined = grabcut_refine(images, prob, rough)
    assert mean_iou_dice(rough, truth)["iou"] < 50 < 90 < mean_iou_dice(refined, truth)["iou"]
    assert np.array_equal(grabcut_refine_all(images, prob, rough, workers=2, chunk=2), refined)


def test_refine_photo_cuts_inside_a_box_around_the_model_mask_and_falls_back_where_that_collapses(monkeypatch):
    """The product's refinement: GrabCut from a box around the model's mask, so a small subject in a
    cluttered photo is cut where the model put it (box-started GrabCut also takes the red thing the
    model left out), and
    from the model's partition where the box's cut comes back (almost) empty."""
    from pipelines.lib import grabcut
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(70, 10, (96, 96, 3)), 0, 255).astype(np.uint8)
    image[:, 60:, :] = np.clip(rng.normal(150, 10, (96, 36, 3)), 0, 255).astype(np.uint8)   # a bright wall
    truth = np.zeros((96, 96), bool)
    truth[30:42, 20:32] = True                                          # a small red subject, 1.6 % of the photo
    other = np.zeros((96, 96), bool)
    other[60:80, 66:86] = True                                          # and a red thing the model left out
    for region in (truth, other):
        image[region] = np.clip(rng.normal((200, 30, 30), 10, (int(region.sum()), 3)), 0, 255).astype(np.uint8)
    prob = np.zeros((96, 96), np.float32)
    prob[26:46, 16:36] = 0.7                                            # the model's blob: right place, too big
    iou = lambda m: (m & truth).sum() / (m | truth).sum()
    refined = grabcut.refine_photo(image, prob, prob > 0.5, seed=3)
    x, y, w, h = grabcut.extent_rect(prob > 0.5, grabcut.EXTENT_MARGIN)
    assert not refined[:y].any() and not refined[y + h:].any() and not refined[:, :x].any() and not refined[:, x + w:].any()
    assert iou(grabcut.grabcut_masks(image[None])[0]) < 0.3 < 0.8 < iou(refined), iou(refined)
    assert np.array_equal(grabcut.refine_at_size(image, prob, 0.5, seed=3), refined)
    # a box cut that loses the subject (under 1 % of the photo) gives way to the partition-started one
    calls = []
    real_cut = grabcut.cut
    def collapsing(img, seed, *, labels=None, rect=None, iterations=5):
        calls.append("rect" if rect is not None else "labels")
        return np.zeros(img.shape[:2], bool) if rect is not None else real_cut(img, seed, labels=labels,
                                                                               iterations=iterations)
    monkeypatch.setattr(grabcut, "cut", collapsing)
    fallback = grabcut.refine_photo(image, prob, prob > 0.5, seed=3)
    assert calls == ["rect", "labels"]
    assert np.array_equal(fallback, grabcut.grabcut_refine(image[None], prob[None], (prob > 0.5)[None], start=3)[0])


def test_evaluate_table_keeps_its_columns_for_long_method_names():
    """A refined output's "<name>, π_f's mask before GrabCut" row is wider than the old fixed column."""
    rows = [{"method": m, "split": "test", "images": 200, "iou": 67.1, "dice": 79.9}
            for m in ("amortized", "amortized, π_f's mask before GrabCut", "GrabCut")]
    lines = format_table(rows).splitlines()
    assert len({line.index("test") for line in lines[1:]}) == 1
    assert all(line.split()[-4:] == ["test", "200", "67.1", "79.9"] for line in lines[1:])
