"""The whole system in one command, on the embedded default: local Ray, local MLflow, CPU preset,
synthetic data.

    python -m pipelines.quickstart            # ≈ 12 minutes on 2 cores (AVX2 CPU, fp32)
    python -m pipelines.quickstart --tiny     # ≈ 3 minutes: the same stages, smaller
    python -m pipelines.quickstart --tune     # also a tiny Ray Tune study before training

Stages: TM-dSprites rendered and sharded to Parquet with Ray Data → DRC trained with Ray Train
(2 workers, persistent chains sharded between them) → [a tiny Tune study] → the fast segmenter
distilled from the trained model → the test split segmented with Ray Data twice (posterior
Langevin and the distilled segmenter) → evaluated against GrabCut and trivial masks → one HTML
report (sample grids, masks over images, learning curves, the IoU/Dice table). Everything is
tracked in the MLflow store <out>/mlflow.db (experiment "quickstart").
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXPERIMENT = "quickstart"
SIZES = {  # train images, test images, EM iterations, distillation steps, posterior steps at test
    # (tiny: 100 of the preset's 300, a third of the Langevin segment's time for ~3 IoU points)
    "tiny": {"train": 256, "test": 64, "iterations": 30, "distill_steps": 300, "eval_every": 15, "test_steps": 100},
    "full": {"train": 2000, "test": 200, "iterations": 200, "distill_steps": 1500, "eval_every": 50, "test_steps": None},
}


def _stage(n: int, total: int, text: str) -> float:
    print(f"\n[{n}/{total}] {text}", flush=True)
    return time.perf_counter()


def learning_curve(uri: str, run_id: str, path: Path) -> Path:
    """eval IoU (and reconstruction error) over iterations from the training run's MLflow history."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pipelines.lib import tracking
    c = tracking.client(uri)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, keys, label in ((axes[0], {"eval_iou": "default threshold policy", "eval_iou_protocol": "π_f > ½"},
                             "held-out IoU (%)"), (axes[1], {"recon_l1": None}, "reconstruction L1")):
        for key, name in keys.items():
            hist = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
            ax.plot([m.step for m in hist], [m.value for m in hist], marker="o" if name else None, label=name)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("EM iteration")
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a ~3-minute run of every stage")
    p.add_argument("--tune", action="store_true", help="also run a tiny Ray Tune study (tune_spaces/quick.yaml)")
    p.add_argument("--iterations", type=int, default=None, help="EM iterations (default: 200, --tiny 30)")
    p.add_argument("--out", "--output", dest="out", default=None, help="output folder (default: runs/quickstart-<time>)")
    p.add_argument("--quiet", action="store_true", help="only the stage headers and the result table")
    args = p.parse_args(argv)

    from pipelines import distill, evaluate, preprocess, segment, train
    from pipelines.lib.evaluation_output import format_table, track
    from pipelines.lib import report, tracking
    from pipelines.local import save_grid
    from pipelines.lib.models import load
    from pipelines.lib.parquet_store import load_arrays
    from pipelines.lib.ray_env import init_ray

    from pipelines.lib.ray_env import ScratchPathError, check_job_outputs
    try:
        check_job_outputs("quickstart", {"--out": args.out or "runs/quickstart"})
    except ScratchPathError as exc:
        raise SystemExit(str(exc)) from None
    size = SIZES["tiny" if args.tiny else "full"]
    iterations = args.iterations or size["iterations"]
    out = Path(args.out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    common = ["--tracking-uri", uri, "--experiment", EXPERIMENT]
    quiet = ["--quiet"] if args.quiet else []
    total = 6 if args.tune else 5
    timings: dict[str, float] = {}
    start = time.perf_counter()
    init_ray(num_cpus=2, include_dashboard=args.tune)   # Tune frees stopped trials through the dashboard
    n = 1

    t = _stage(n, total, f"Ray Data: rendering {size['train']} + {size['test']} TM-dSprites images to Parquet")
    data = str(out / "data")
    preprocess.main(["--source", "tm-dsprites", "--preset", "cpu-32", "--train", str(size["train"]),
                     "--test", str(size["test"]), "--out", data, "--overwrite", *quiet])
    timings["preprocess"] = time.perf_counter() - t
    n += 1
    if args.tune:
        from pipelines import tune
        t = _stage(n, total, "Ray Tune: a 4-trial study over tune_spaces/quick.yaml")
        tune.main(["--space", "tune_spaces/quick.yaml", "--data", data, "--trials", "4", "--iterations", "6",
                   "--report-every", "3", "--storage", str(out / "tune"), *common, *quiet])
        timings["tune"] = time.perf_counter() - t
        n += 1

    t = _stage(n, total, f"Ray Train: {iterations} EM iterations on 2 workers (chains sharded per worker)")
    summary = train.main(["--data", data, "--preset", "cpu-32", "--workers", "2", "--iterations", str(iterations),
                          "--checkpoint-every", str(max(10, iterations // 4)), "--eval-every", str(size["eval_every"]),
                          "--eval-steps", "100",        # the curve's points; the final table uses the preset's
                          "--grid-every", str(iterations), "--storage", str(out / "ray"), "--name", "drc", *common,
                          *quiet])
    checkpoint = summary["checkpoint"]
    timings["train"] = time.perf_counter() - t
    n += 1

    t = _stage(n, total, "Distilling the fast segmenter from the persistent chains and the prior")
    student = distill.main(["--teacher", checkpoint, "--data", data, "--steps", str(size["distill_steps"]),
                            "--out", str(out / "student"), *common, *quiet])
    timings["distill"] = time.perf_counter() - t
    n += 1

    t = _stage(n, total, "Ray Data: segmenting the test split with posterior Langevin and with the distilled net")
    seg = {}
    for mode, model in (("langevin", checkpoint), ("amortized", str(out / "student" / "student.pt"))):
        steps = ["--steps", str(size["test_steps"])] if mode == "langevin" and size["test_steps"] else []
        seg[mode] = segment.main(["--model", model, "--input", data, "--split", "test", "--actors", "2", *steps,
                                  "--output", str(out / f"seg-{mode}"), "--overwrite", "--quiet"])
    timings["segment"] = time.perf_counter() - t
    n += 1

    t = _stage(n, total, "Evaluating against GrabCut and trivial masks; writing the report")
    teacher = load(checkpoint)
    test = load_arrays(data, "test")
    save_grid(teacher.net, test["images"][:8], test["masks"][:8], teacher.cfg, out / "sample_grid.png")
    curve = learning_curve(uri, summary["mlflow_run_id"], out / "learning_curve.png")
    timings["evaluate"] = 0.0
    stage_rows = "".join(f"<tr><th>{k}</th><td>{v:.0f} s</td></tr>" for k, v in timings.items() if v)
    speed = "".join(f"<li>{m}: {seg[m]['counts']['ok']} images, {seg[m]['images_per_s']:.2f} images/s end to end "
                    f"(Ray start-up and model loading included)</li>" for m in seg)
    sections = [
        ("Pipeline", f"<table>{stage_rows}</table><ul>{speed}</ul>"),
        ("Samples: observed | reconstruction | foreground | background | π_f | ground truth",
         report.img_tag(out / "sample_grid.png", "class=px width=640")),
        ("Learning curves (training run)", report.img_tag(curve)),
    ]
    result = evaluate.evaluate(data, {m: str(out / f"seg-{m}") for m in seg}, out / "report", split="test",
                               title="DRC on Ray — quickstart report", sections=sections)
    result["mlflow_run_id"] = track(result, out / "report", uri, EXPERIMENT, {"data": data, "split": "test"})
    timings["evaluate"] = time.perf_counter() - t

    print("\n" + format_table(result["table"]))
    final = {"out": str(out), "report": result["report"], "tracking_uri": uri, "train_run": summary["mlflow_run_id"],
             "checkpoint": checkpoint, "student": student.get("model_uri"), "seconds": timings,
             "wall_seconds": time.perf_counter() - start}
    (out / "quickstart.json").write_text(json.dumps(final, indent=2))
    print(f"""
done in {final['wall_seconds'] / 60:.1f} min. Everything is under {out}:
  report         {result['report']}
  data           {data}  (Parquet + _manifest.json)
  checkpoint     {checkpoint}
  student        {out / 'student' / 'student.pt'}
  segmentations  {out / 'seg-langevin'}, {out / 'seg-amortized'}
  MLflow         .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1   → http://127.0.0.1:5000
""", flush=True)
    return {**final, "table": result["table"]}


if __name__ == "__main__":
    main()
