"""pipelines.bench quality end to end on a tiny budget: seeds run as real pipelines.local processes,
the table aggregates their final evaluations, and the baselines are scored on the same images."""
import json

import numpy as np
import pytest

from drc_core.metrics import mean_iou_dice, trivial_baselines
from drc_core.presets import get_config
from drc_core.threshold import DEFAULT
from pipelines.bench.__main__ import main as bench_main
from pipelines.lib.grabcut import grabcut_masks
from pipelines.local import render_test

TINY = ["data.train_size=48", "optim.batch_size=8", "langevin.posterior_steps=2", "langevin.prior_steps=2"]


@pytest.mark.slow
def test_quality_benchmark_aggregates_seeds_beside_baselines(tmp_path, capsys):
    out = tmp_path / "q"
    bench_main(["quality", "--preset", "cpu-32", "--minutes", "0.05", "--seeds", "2", "--eval-images", "8",
                "--test-images", "16", "--eval-steps", "2", "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    result = json.loads((out / "quality.json").read_text())
    assert (out / "curve.png").stat().st_size > 1000
    finals = [json.loads((out / f"seed{s}" / "curve.json").read_text())["final"] for s in (0, 1)]
    rows = {r["method"]: r for r in result["rows"]}
    default = rows[f"DRC, {DEFAULT.name} (default)"]
    assert default["iou"]["values"] == [f["policies"][DEFAULT.name]["iou"] for f in finals]
    protocol = rows["DRC, 0.5, DRC protocol"]
    assert protocol["iou"]["values"] == [f["iou"] for f in finals]
    assert protocol["iou"]["mean"] == pytest.approx(np.mean([f["iou"] for f in finals]))
    # the baselines are computed on the very images the seeds were scored on
    cfg = get_config("cpu-32", dict(o.split("=") for o in TINY))
    images, masks = render_test(cfg, 16)
    assert rows["GrabCut (OpenCV, 5 % margin box)"]["iou"]["mean"] == pytest.approx(
        mean_iou_dice(grabcut_masks(images), masks > 0)["iou"])
    assert rows["all foreground"]["iou"]["mean"] == pytest.approx(trivial_baselines(masks)["all_foreground"]["iou"])
    assert result["test_images"] == 16 and all(f["images"] == 16 for f in finals)
    assert "GrabCut" in printed and "DRC protocol" in printed and result["cpu"]


@pytest.mark.slow
def test_quality_benchmark_distils_a_student_per_seed(tmp_path, capsys):
    """--student: each seed's model is distilled (posterior pairs of --student-images training images +
    2,000 prior pairs, as `drc distill` does) and scored on the same held-out images; --reuse reads
    the students back instead of distilling again."""
    out = tmp_path / "q"
    argv = ["quality", "--preset", "cpu-32", "--minutes", "0.05", "--seeds", "2", "--eval-images", "8",
            "--test-images", "16", "--eval-steps", "2", "--out", str(out), "--student", "--student-images", "8",
            "--student-steps", "20", *TINY, "langevin.test_steps=4", "langevin.test_average=2"]
    bench_main(argv)
    result = json.loads((out / "quality.json").read_text())
    students = [json.loads((out / f"seed{s}" / "student.json").read_text()) for s in (0, 1)]
    assert [st["pairs"] for st in students] == [8 + 2000] * 2          # TM-dSprites: no boundary filter
    rows = {r["method"]: r for r in result["rows"]}
    assert rows[f"student, {DEFAULT.name} (default)"]["iou"]["values"] == [st["default"]["iou"] for st in students]
    assert rows["student, 0.5, DRC protocol"]["dice"]["values"] == [st["protocol"]["dice"] for st in students]
    assert rows[f"student, {DEFAULT.name} (default)"]["area"]["values"] == [st["default"]["area"] for st in students]
    assert "student, 0.5, DRC protocol" in capsys.readouterr().out
    assert result["diagnostics"]["student_minutes"]["values"] == [st["seconds"] / 60 for st in students]
    assert all(st["seconds"] > 0 for st in students)
    for s in (0, 1):                                                    # --reuse: nothing is distilled again
        (out / f"seed{s}" / "model.pt").unlink()
    bench_main([*argv, "--reuse"])
    again = json.loads((out / "quality.json").read_text())
    assert [r["iou"] for r in again["rows"]] == [r["iou"] for r in result["rows"]]
    assert "each student: " in capsys.readouterr().out                 # the time a user waits after training


def test_grabcut_in_a_process_pool_gives_the_single_process_masks():
    from pipelines.lib.grabcut import grabcut_all
    rng = np.random.default_rng(3)
    images = rng.integers(0, 60, (40, 48, 48, 3), dtype=np.uint8)      # dark noise
    for i, im in enumerate(images):
        im[10 + i % 8:30 + i % 8, 12:34] = rng.integers(180, 255, 3)   # a bright square, moving
    one = grabcut_masks(images)
    pooled = grabcut_all(images, workers=2, quiet=True)
    assert len(pooled) == 40 and all((a == b).all() for a, b in zip(one, pooled))
    assert 0 < np.mean(one) < 1                                        # GrabCut did cut something


def _photos(root, n: int = 12):
    """n photos of dark noise, each with a bright textured object, of a few sizes, and their masks."""
    from PIL import Image
    rng = np.random.default_rng(5)
    (root / "photos").mkdir()
    (root / "masks").mkdir()
    for i in range(n):
        h, w = (48, 64) if i % 2 else (60, 40)
        photo = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        y, x = rng.integers(h // 6, h // 3), rng.integers(w // 6, w // 3)
        photo[y:y + h // 2, x:x + w // 2] = rng.integers(170, 255, (h // 2, w // 2, 3), dtype=np.uint8)
        mask[y:y + h // 2, x:x + w // 2] = 255
        Image.fromarray(photo).save(root / "photos" / f"p{i:02d}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"p{i:02d}.png")
    return root / "photos", root / "masks"


@pytest.mark.integration
@pytest.mark.slow
def test_recipe_benchmark_runs_the_readme_commands_and_tabulates_what_evaluate_scored(tmp_path, capsys):
    """--recipe photos: the README's photo commands run as subprocesses (preprocess; the set's teachers'
    seeds, a distill of them, a segment --png; evaluate --masks); the table's student rows are evaluate's
    rows of the set, the baselines evaluate's own; a second run with --reuse runs nothing and reads the
    same figures; a missing step is named."""
    photos, masks = _photos(tmp_path)
    out = tmp_path / "recipe"
    argv = ["quality", "--recipe", "photos", "--photos", str(photos), "--masks", str(masks), "--sets", "1",
            "--teachers", "1", "--iterations", "2", "--student-steps", "10", "--out", str(out),
            "optim.batch_size=4"]
    bench_main(argv)
    printed = capsys.readouterr().out
    result = json.loads((out / "recipe.json").read_text())
    steps = json.loads((out / "steps.json").read_text())
    # one teacher (each costs a Ray Train job; distilling several is test_distill_pools_the_pairs_of_several_teachers)
    assert list(steps) == ["preprocess", "train-s1", "distill-set1", "segment-set1", "evaluate"]
    assert steps["train-s1"]["command"].startswith("drc train ") and "--preset photo-32" in steps["train-s1"]["command"]
    assert "seed=1" in steps["train-s1"]["command"] and "--iterations 2" in steps["train-s1"]["command"]
    assert "--crop resize" in steps["preprocess"]["command"] and "--masks" not in steps["preprocess"]["command"]
    assert "--teacher " in steps["distill-set1"]["command"] and "photos-s1/checkpoint_00000002" in steps["distill-set1"]["command"]
    assert all(s["seconds"] > 0 for s in steps.values())
    scored = {r["method"]: r for r in json.loads((out / "eval" / "metrics.json").read_text())["table"]}
    assert json.loads((out / "png" / "set1" / "segmentation" / "_manifest.json").read_text())["refine"]  # photo model
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["student + GrabCut refinement (segment's default)"]["iou"]["values"] == [scored["set1"]["iou"]]
    assert rows["student, π_f's own mask (Otsu per image)"]["dice"]["values"] == [
        scored["set1, π_f's mask before GrabCut"]["dice"]]
    assert rows["student, π_f > ½ (DRC protocol)"]["iou"]["values"] == [scored["set1, π_f > ½, DRC protocol"]["iou"]]
    for name in ("GrabCut", "all foreground"):
        assert rows[name]["iou"]["values"] == [scored[name]["iou"]]
    assert any(m.startswith("centred disc") for m in rows) and len(rows) == 6
    # per photo against GrabCut, and by subject size: evaluate's own figures, printed
    wins = json.loads((out / "eval" / "metrics.json").read_text())["wins_vs_grabcut"]
    assert result["beats_grabcut_per_photo"]["student + GrabCut refinement (segment's default)"]["values"] == [
        100 * wins["set1"]["share"]]
    assert result["by_subject_size"] == json.loads((out / "eval" / "metrics.json").read_text())["by_subject_size"]
    assert sum(r["images"] for r in result["by_subject_size"]) == 12
    assert "% of the photos better than GrabCut" in printed and "IoU by subject size" in printed
    assert result["images"] == 12 and result["scored_at"] == "original size"
    assert "GrabCut" in printed and "minutes: preprocess" in printed and result["cpu"]
    assert (out / "mlflow.db").exists()
    bench_main([*argv, "--reuse"])                                      # nothing runs again
    assert json.loads((out / "steps.json").read_text()) == steps
    assert json.loads((out / "recipe.json").read_text())["rows"] == result["rows"]
    (out / "eval" / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="step evaluate has not run"):
        bench_main([*argv, "--reuse"])


def test_recipe_rows_gather_each_sets_rows_on_the_all_split():
    """Several sets: each student row holds one value per set (from evaluate's 'all' split when the
    photos have several); the baselines are evaluate's own rows; other policies' rows are left out."""
    from pipelines.bench.recipe import _evaluate_rows
    table = [{"method": m, "split": sp, "iou": v + (sp == "all"), "dice": 2 * v}
             for sp in ("test", "train", "all")
             for m, v in (("set1", 40), ("set1, π_f's mask before GrabCut", 35), ("set1, π_f > ½, DRC protocol", 34),
                          ("set2", 42), ("set2, π_f's mask before GrabCut", 37), ("set2, π_f > ½, DRC protocol", 36),
                          ("set2, threshold gmm", 30), ("GrabCut", 39), ("all foreground", 20))]
    students, baselines = _evaluate_rows({"table": table}, ["set1", "set2"])
    assert [[r["iou"] for r in rs] for rs in students.values()] == [[41, 43], [36, 38], [35, 37]]
    assert {m: r["iou"] for m, r in baselines.items()} == {"GrabCut": 40, "all foreground": 21}


def test_recipe_benchmark_needs_photos_and_masks(tmp_path):
    with pytest.raises(SystemExit, match="--masks DIR"):
        bench_main(["quality", "--recipe", "photos", "--photos", str(tmp_path)])
    with pytest.raises(SystemExit, match="--photos .*nowhere: no such folder"):
        bench_main(["quality", "--recipe", "photos", "--photos", str(tmp_path / "nowhere"), "--masks", str(tmp_path)])


def test_refine_benchmark_scores_every_variant_per_photo_on_a_segment_output(tmp_path, capsys):
    """bench refine on a hand-made segment output (π_f and keys as segment stores them): the box row is
    GrabCut's own mask, `default` is what segment writes (refine_at_size), the subsets partition the
    photos, and the oracle is the better of box and model per photo."""
    import io
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from pipelines.lib.grabcut import refine_at_size
    from pipelines.lib.imaging import quantised, to_original

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    photos, masks, seg = (tmp_path / d for d in ("photos", "masks", "seg"))
    for d in (photos, masks, seg):
        d.mkdir()
    rows, sizes = [], [(48, 64, 0.05), (60, 60, 0.25), (40, 56, 0.6)]      # (h, w, subject share)
    for i, (h, w, share) in enumerate(sizes):
        image = np.clip(rng.normal(70, 15, (h, w, 3)), 0, 255).astype(np.uint8)
        side = int(np.sqrt(share * h * w))
        truth = np.zeros((h, w), bool)
        truth[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2] = True
        image[truth] = np.clip(rng.normal(190, 15, (int(truth.sum()), 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(photos / f"p{i}.jpg", quality=95)
        Image.fromarray(truth.astype(np.uint8) * 255).save(masks / f"p{i}.png")
        prob = np.clip(rng.random((32, 32)) * 0.4 + 0.5 * np.asarray(Image.fromarray(truth.astype(np.uint8) * 255)
                       .resize((32, 32))) / 255, 0, 1)
        rows.append({"sample_id": i, "key": f"p{i}", "prob": png(np.rint(prob * 255).astype(np.uint8)),
                     "threshold": 0.5, "region": [0, 0, w, h]})
    pq.write_table(pa.Table.from_pylist(rows), seg / "part-00000.parquet")
    bench_main(["refine", "--segmentation", str(seg), "--photos", str(photos), "--masks", str(masks),
                "--out", str(tmp_path / "out"), "--workers", "1"])
    result = json.loads((tmp_path / "out" / "refine.json").read_text())
    per = pd.read_parquet(tmp_path / "out" / "per_photo.parquet").set_index("key")
    assert result["photos"] == 3 and set(per.index) == {"p0", "p1", "p2"}
    from pipelines.lib.imaging import read_photo
    for r in rows:
        image, truth = read_photo(str(photos / f"{r['key']}.jpg")), np.asarray(Image.open(masks / f"{r['key']}.png")) > 127
        prob = to_original(quantised(np.asarray(Image.open(io.BytesIO(r["prob"]))) / 255.0), tuple(r["region"]), *truth.shape)
        box = grabcut_masks(image[None], start=r["sample_id"])[0]
        default = refine_at_size(image, prob, 0.5, seed=r["sample_id"])
        iou = lambda m: 100 * (m & truth).sum() / (m | truth).sum()
        assert per.loc[r["key"], "iou:box"] == pytest.approx(iou(box))
        assert per.loc[r["key"], "iou:default"] == pytest.approx(iou(default))
    m = result["methods"]
    assert [s["photos"] for s in m["box"]["subsets"].values()] == [1, 1, 1]
    assert m["oracle"]["iou"] == pytest.approx(np.maximum(per["iou:box"], per["iou:model"]).mean())
    assert m["box"]["ties_box"] == 1.0
    assert "default" in capsys.readouterr().out
