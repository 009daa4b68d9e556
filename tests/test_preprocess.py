"""pipelines.preprocess on a real local Ray instance, for every source and a corpus of broken files."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from drc_core.tmds import render
from pipelines import preprocess
from pipelines.lib import listing
from pipelines.lib.imaging import crop_and_resize, crop_box, to_rgb
from pipelines.lib.parquet_store import Store, load_arrays
from pipelines.lib.records import Options
from tests import corpora

pytestmark = pytest.mark.integration


def _run(source, out, *, input=None, masks=None, size=32, crop=None, extra=()):
    argv = ["--source", source, "--out", str(out), "--resolution", str(size), *extra]
    if input is not None:
        argv += ["--input", str(input)]
    if masks is not None:
        argv += ["--masks", str(masks)]
    if crop:
        argv += ["--crop", crop]
    return preprocess.main(argv)


def _direct(path, size, crop="center", box=None, mask=None):
    img = to_rgb(Image.open(path))
    region = crop_box(img.shape[0], img.shape[1], crop, box)
    return crop_and_resize(img, region, size, mask)


def test_tm_dsprites_rows_equal_the_renderer_and_reruns_are_byte_identical(ray_local, tmp_path):
    m1 = _run("tm-dsprites", tmp_path / "a", extra=["--preset", "cpu-32", "--train", "30", "--test", "10",
                                                    "--rows-per-file", "16"])
    m2 = _run("tm-dsprites", tmp_path / "b", extra=["--preset", "cpu-32", "--train", "30", "--test", "10",
                                                    "--rows-per-file", "16"])
    assert m1["counts"]["ok"] == 40 and m1["counts"]["per_split"] == {"test": 10, "train": 30}
    assert m1["files"] == 3 and sorted(p.name for p in (tmp_path / "a").glob("part-*.parquet")) == \
        ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert m1["sample_id_checksum"] == m2["sample_id_checksum"]
    a, b = load_arrays(str(tmp_path / "a")), load_arrays(str(tmp_path / "b"))
    assert a["sample_id"].tolist() == list(range(40))
    assert a["images"].tobytes() == b["images"].tobytes() and a["masks"].tobytes() == b["masks"].tobytes()
    assert a["key"][0] == "train/0000000" and a["key"][30] == "test/0000000"   # train ids first
    for i in (0, 17, 35):
        split, idx = a["key"][i].split("/")
        s = render(split, int(idx), size=32, sprite_size=(0.25, 0.45))
        assert np.array_equal(a["images"][i], s.image) and np.array_equal(a["masks"][i], s.fg)
    schema = pq.read_schema(tmp_path / "a" / "part-00000.parquet")
    assert {"sample_id", "key", "image", "mask", "split", "height", "width"} <= set(schema.names)


def test_folder_of_every_format_matches_direct_pil_decode(ray_local, tmp_path):
    files = corpora.folder_corpus(tmp_path / "in", tmp_path / "masks")
    m = _run("folder", tmp_path / "out", input=tmp_path / "in", masks=tmp_path / "masks")
    assert m["counts"] == {"inputs": 11, "ok": 11, "quarantined": 0, "filtered": 0,
                           "per_split": {"train": 11}, "with_mask": 3}
    data = load_arrays(str(tmp_path / "out"))
    for i, key in enumerate(data["key"]):
        expected, _ = _direct(files[key], 32)
        assert np.array_equal(data["images"][i], expected), key


def test_broken_inputs_are_quarantined_with_reasons_and_the_rest_completes(ray_local, tmp_path):
    broken = corpora.broken_corpus(tmp_path / "in", tmp_path / "masks")
    m = _run("folder", tmp_path / "out", input=tmp_path / "in", masks=tmp_path / "masks",
             extra=["--max-pixels", "4000000"])
    c = m["counts"]
    assert c["ok"] + c["quarantined"] + c["filtered"] == c["inputs"]
    reasons = {q["key"] + ("#dup" if "duplicate" in q["reason"] else ""): q["reason"] for q in m["quarantine"]}
    assert len(broken) >= 10 and set(broken) == set(reasons), (set(broken) ^ set(reasons))
    for key, fragment in broken.items():
        assert fragment in reasons[key], (key, reasons[key])
    assert c["ok"] == 11                      # every good image of the corpus is there
    data = load_arrays(str(tmp_path / "out"))
    for i, key in enumerate(data["key"]):
        src = next(p for p in (tmp_path / "in").rglob("*") if str(p.relative_to(tmp_path / "in").with_suffix("")) == key
                   and not p.is_symlink())
        expected, _ = _direct(src, 32)
        assert np.array_equal(data["images"][i], expected), key
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["quarantine"] == m["quarantine"]


def test_existing_dataset_is_not_overwritten_unless_asked(ray_local, tmp_path):
    args = ["--preset", "cpu-32", "--train", "4", "--test", "0"]
    _run("tm-dsprites", tmp_path / "d", extra=args)
    before = (tmp_path / "d" / "_manifest.json").read_text()
    with pytest.raises(SystemExit, match="already exists"):
        _run("tm-dsprites", tmp_path / "d", extra=args)
    assert (tmp_path / "d" / "_manifest.json").read_text() == before
    import ray
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    m = _run("tm-dsprites", tmp_path / "d", extra=[*args[:3], "6", "--test", "0", "--overwrite", "--quiet"])
    assert not ctx.enable_progress_bars                       # --quiet: Ray Data's bars off for the run
    ctx.enable_progress_bars = False                          # the session's setting (conftest)
    assert m["counts"]["ok"] == 6 and Store(str(tmp_path / "d")).read_manifest()["counts"]["ok"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".d.tmp")]


def test_cub_layout_crops_around_the_box_with_masks(ray_local, tmp_path):
    corpora.cub_corpus(tmp_path / "cub")
    m = _run("cub", tmp_path / "out", input=tmp_path / "cub")
    assert m["counts"]["per_split"] == {"test": 2, "train": 4} and m["counts"]["with_mask"] == 6
    data = load_arrays(str(tmp_path / "out"))
    key = data["key"][0]
    src = tmp_path / "cub" / "images" / f"{key}.jpg"
    seg = np.asarray(Image.open(tmp_path / "cub" / "segmentations" / f"{key}.png")) >= 128
    i = int(key.split("_")[-1])
    img, mask = _direct(src, 32, "box", (10.0 + i, 5.0, 30.0, 40.0), seg.astype(np.uint8))
    assert np.array_equal(data["images"][0], img) and np.array_equal(data["masks"][0], mask)


def test_stanford_dogs_and_cars_layouts(ray_local, tmp_path):
    corpora.dogs_corpus(tmp_path / "dogs")
    m = _run("stanford-dogs", tmp_path / "dogs_out", input=tmp_path / "dogs")
    assert m["counts"]["per_split"] == {"test": 1, "train": 3}
    d = load_arrays(str(tmp_path / "dogs_out"))
    src = tmp_path / "dogs" / "Images" / f"{d['key'][0]}.jpg"
    img, _ = _direct(src, 32, "box", (5.0, 6.0, 55.0, 44.0))
    assert np.array_equal(d["images"][0], img)
    corpora.cars_corpus(tmp_path / "cars")
    m = _run("stanford-cars", tmp_path / "cars_out", input=tmp_path / "cars")
    assert m["counts"]["per_split"] == {"test": 2, "train": 2}
    c = load_arrays(str(tmp_path / "cars_out"))
    assert c["key"][0] == "train/00001"
    img, _ = _direct(tmp_path / "cars" / "cars_train" / "00001.jpg", 32, "box", (3.0, 4.0, 77.0, 46.0))
    assert np.array_equal(c["images"][0], img)


def test_clevr_keeps_3_to_6_objects_with_the_papers_crop(ray_local, tmp_path):
    counts = corpora.clevr_corpus(tmp_path / "clevr")
    m = _run("clevr-masks", tmp_path / "out", input=tmp_path / "clevr")
    kept = sorted(k for k, n in counts.items() if 3 <= n <= 6)
    assert m["counts"]["ok"] == 2 and m["counts"]["filtered"] == 2
    data = load_arrays(str(tmp_path / "out"))
    assert sorted(data["key"].tolist()) == kept
    labels = np.asarray(Image.open(tmp_path / "clevr" / "masks" / f"{kept[0]}.png"))
    img = np.asarray(Image.open(tmp_path / "clevr" / "images" / f"{kept[0]}.png").convert("RGB"))
    exp_img, exp_mask = crop_and_resize(img, (64, 29, 256, 221), 32, (labels != 0).astype(np.uint8))
    assert np.array_equal(data["images"][0], exp_img) and np.array_equal(data["masks"][0], exp_mask)


def test_uri_output_and_the_manifest_last_publish_path(ray_local, tmp_path, monkeypatch):
    """A file:// URI goes through pyarrow's filesystem layer; with rename switched off (as on
    object stores) the parts are written in place and the manifest last."""
    m = _run("tm-dsprites", f"file://{tmp_path}/uri", extra=["--preset", "cpu-32", "--train", "5", "--test", "0"])
    assert m["counts"]["ok"] == 5 and load_arrays(f"file://{tmp_path}/uri")["images"].shape == (5, 32, 32, 3)
    opt = Options(source="tm-dsprites", size=32, sprite_size=(0.25, 0.45))

    class ObjectStoreLike(preprocess.Output):
        def __init__(self, uri):                   # behave like S3/GCS: no atomic rename, written in place
            super().__init__(uri)
            self.folder = self.target.location
            self.staging = Store(self.folder)
            self.target.local = False

    monkeypatch.setattr(preprocess, "Output", ObjectStoreLike)
    m2 = preprocess.run(lambda where: (listing.tm_dsprites(3, 0), None), opt, str(tmp_path / "obj"), progress=False)
    assert m2["counts"]["ok"] == 3 and sorted(p.name for p in (tmp_path / "obj").iterdir()) == \
        ["_manifest.json", "part-00000.parquet"]
    assert not list(tmp_path.glob(".obj*"))


def test_a_listing_written_by_its_tasks_equals_the_one_kept_in_the_object_store(ray_local, tmp_path):
    """list_folder(folder=…) (what preprocess and segment use: nothing per file reaches the driver)
    gives the rows, order, splits and duplicates of the in-memory listing, with parts that span
    directories and a directory that spans parts; its per-directory tables are gone afterwards."""
    root = tmp_path / "tree"
    files = [f"b/{i:03d}.png" for i in range(7)] + ["a.png", "a.jpg", "a/x.png", "a/y/z.png", "a-b.png",
                                                    "test/t1.png", "test/sub/t0.png", "val/v.png", "z.png"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"x")
    kept = listing.list_folder(str(root), rows=3)
    written = listing.list_folder(str(root), rows=3, folder=str(tmp_path / "listed"))

    def rows(lst):
        return [r for p in lst.parts for r in listing.table(p.source, p.first).select(
            ["index", "key", "split", "path"]).to_pylist()]
    assert rows(written) == rows(kept) and written.splits == kept.splits
    assert [r["key"] for r in rows(kept)] == ["a", "a-b", "a/x", "a/y/z", *[f"b/{i:03d}" for i in range(7)], "z",
                                              "val/v", "test/sub/t0", "test/t1"]
    assert [(p.first, p.count, p.lo, p.hi) for p in written.parts] == [(p.first, p.count, p.lo, p.hi) for p in kept.parts]
    assert written.n_duplicates == kept.n_duplicates == 1
    dups = [listing.duplicates_table(d).to_pylist() for d in written.duplicates]
    assert dups == [[{"input": str(root / "a.png"), "key": "a", "reason": "duplicate key 'a'"}]]
    assert not (tmp_path / "listed" / listing.DIRS).exists() and written.saved_in == str(tmp_path / "listed")
    assert listing.save(written, str(tmp_path / "listed")) is written       # already there: nothing rewritten
