"""pipelines.bench quality end to end on a tiny budget: seeds run as real pipelines.local processes,
the table aggregates their final evaluations, and the baselines are scored on the same images."""
import json

import numpy as np
import pytest

from drc_core.metrics import mean_iou_dice, trivial_baselines
from drc_core.presets import get_config
from drc_core.threshold import DEFAULT
from pipelines import bench
from pipelines.lib.grabcut import grabcut_masks
from pipelines.local import render_test

TINY = ["data.train_size=48", "optim.batch_size=8", "langevin.posterior_steps=2", "langevin.prior_steps=2"]


@pytest.mark.slow
def test_quality_benchmark_aggregates_seeds_beside_baselines(tmp_path, capsys):
    out = tmp_path / "q"
    bench.main(["quality", "--preset", "cpu-32", "--minutes", "0.05", "--seeds", "2", "--eval-images", "8",
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
    bench.main(argv)
    result = json.loads((out / "quality.json").read_text())
    students = [json.loads((out / f"seed{s}" / "student.json").read_text()) for s in (0, 1)]
    assert [st["pairs"] for st in students] == [8 + 2000] * 2          # TM-dSprites: no boundary filter
    rows = {r["method"]: r for r in result["rows"]}
    assert rows[f"student, {DEFAULT.name} (default)"]["iou"]["values"] == [st["default"]["iou"] for st in students]
    assert rows["student, 0.5, DRC protocol"]["dice"]["values"] == [st["protocol"]["dice"] for st in students]
    assert all(0.0 <= st["default"]["area"] <= 100.0 for st in students)
    assert "student, 0.5, DRC protocol" in capsys.readouterr().out
    assert result["diagnostics"]["student_minutes"]["values"] == [st["seconds"] / 60 for st in students]
    assert all(st["seconds"] > 0 for st in students)
    for s in (0, 1):                                                    # --reuse: nothing is distilled again
        (out / f"seed{s}" / "model.pt").unlink()
    bench.main([*argv, "--reuse"])
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
