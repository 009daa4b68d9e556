"""Quality benchmark (`python -m pipelines.bench quality`): train a preset for a wall-clock budget
with several seeds, evaluate on held-out images under both threshold policies, and print one table
beside GrabCut, the best centred disc and all-foreground on the same images.

    python -m pipelines.bench quality --preset cpu-32 --minutes 20 --seeds 2
    python -m pipelines.bench quality --preset cpu-32 --minutes 20 --seeds 2 loss.area_weight=0.05
    python -m pipelines.bench quality --preset photo-64 --data data/pascal-s-64 --minutes 30 --seeds 2
    python -m pipelines.bench quality --preset cpu-64 --minutes 20 --seeds 2 --parallel 1 --student data.train_size=1000
    python -m pipelines.bench quality --recipe photos --photos photos/ --masks masks/ --sets 2

Each seed is one `pipelines.local` run (a subprocess; `--parallel` of them at a time, the cores
split between them), so every figure here can be reproduced run by run. `--data tmds` (default)
trains on the preset's TM-dSprites training split and scores its held-out test split; a Parquet
dataset (pipelines.preprocess, with masks) is trained on whole, unsupervised, and scored on
`--eval-split` (default: every image). Reported, mean ± spread (max − min over seeds): IoU / Dice
under the default label-free threshold policy and at the DRC protocol's π_f > ½ (and the other
policies), predicted vs true foreground area, mean π_f on true foreground / background pixels,
the best-threshold IoU (a diagnostic that peeks at the labels, never a result), and the learning
curve (`<out>/curve.png`, `<out>/quality.json`). Nothing but the scoring looks at the masks.

`--student` also distils each seed's model as `drc distill` does by default for a model without
chains — fresh posterior pairs of `--student-images` training images plus 2,000 prior pairs, the
default policy's masks as targets, the boundary prior for a model trained on photos — and scores
the student on the same held-out images (its rows: `student, …`).

`--recipe photos` runs the README's photo recipe instead — its five `drc` commands, several teachers
per set, scored at each photo's own size — for `--sets` sets of teachers (pipelines/bench/recipe.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.bench.common import cell, cpu_name, stat


def add_parser(sub) -> None:
    q = sub.add_parser("quality", help="train with several seeds, IoU/Dice under both threshold policies vs GrabCut")
    q.set_defaults(run=run)
    q.add_argument("--preset", default=None, help="default: cpu-32, or photo-32 with --recipe photos")
    q.add_argument("--data", default="tmds", help="'tmds' (the preset's TM-dSprites) or a Parquet dataset with masks")
    q.add_argument("--eval-split", default=None, choices=("train", "val", "test"), help="with a Parquet --data")
    q.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per seed")
    q.add_argument("--seeds", type=int, default=2, help="seeds 0..S−1")
    q.add_argument("--parallel", type=int, default=None, help="seeds run at once (default: min(seeds, cores))")
    q.add_argument("--eval-seconds", type=float, default=None, help="seconds of training between curve points "
                   "(default: minutes·6, i.e. ten points)")
    q.add_argument("--eval-images", type=int, default=200, help="images per curve point")
    q.add_argument("--test-images", type=int, default=None, help="images of the final evaluation "
                   "(default: the preset's test split, or every --data image)")
    q.add_argument("--eval-steps", type=int, default=None, help="posterior steps at test time (default: preset)")
    q.add_argument("--out", "--output", dest="out", default=None, help="folder for the runs, quality.json, curve.png")
    q.add_argument("--reuse", action="store_true", help="aggregate runs already in --out instead of training")
    q.add_argument("--student", action="store_true", help="distil a student from each seed's model and score it")
    q.add_argument("--student-images", type=int, default=250,
                   help="training images whose fresh posterior chains teach the student (default %(default)s)")
    q.add_argument("--student-steps", type=int, default=1500, help="student optimiser steps (drc distill's default)")
    r = q.add_argument_group("the photo recipe (--recipe photos; pipelines/bench/recipe.py)")
    r.add_argument("--recipe", default=None, choices=("photos",),
                   help="run the README's photo recipe (preprocess → train × T → distill → segment → evaluate) "
                        "for --sets sets of teachers instead of one pipelines.local run per seed")
    r.add_argument("--photos", default=None, metavar="DIR", help="the photo folder (--recipe photos)")
    r.add_argument("--masks", default=None, metavar="DIR", help="their masks, only to score (--recipe photos)")
    r.add_argument("--sets", type=int, default=2, help="sets of teachers; set k = 1, 2, … trains seeds (k−1)·T+1 … k·T")
    r.add_argument("--teachers", type=int, default=4, help="teachers per set, distilled into one student")
    r.add_argument("--iterations", type=int, default=150, help="EM iterations per teacher")
    r.add_argument("--workers", type=int, default=2, help="Ray Train workers per teacher")
    r.add_argument("--resolution", type=int, default=None, help="preprocess resolution (default: the preset's)")
    q.add_argument("overrides", nargs="*", help="section.key=value, applied to every seed (every teacher)")


def _run_seed(args, seed: int, out: Path, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.local", "--preset", args.preset, "--minutes", str(args.minutes),
           "--eval-seconds", str(args.eval_seconds or args.minutes * 6), "--eval-images", str(args.eval_images),
           "--threads", str(threads), "--out", str(out), "--name", f"seed{seed}"]
    if args.test_images:
        cmd += ["--final-eval-images", str(args.test_images)]
    if args.eval_steps:
        cmd += ["--eval-steps", str(args.eval_steps)]
    if args.data != "tmds":
        cmd += ["--data", args.data] + (["--eval-split", args.eval_split] if args.eval_split else [])
    cmd += [f"seed={seed}", *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = open(out / f"seed{seed}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parents[2])


def _images(args, cfg):
    """(training images, the images the final evaluations scored, their masks): the same for every seed."""
    from pipelines.local import dataset_images
    n = args.test_images or (None if args.data != "tmds" else cfg.data.test_size)
    return dataset_images(cfg, None if args.data == "tmds" else args.data, args.eval_split, n)


def _student(args, run_dir: Path, train, images, truth) -> dict:
    """Distil the seed's model as `drc distill` does by default (posterior + prior pairs, default-policy
    targets, the boundary prior and GrabCut's re-drawn masks where `--max-border auto` / `--refine auto`
    turn them on) and score the student on `images`.
    Cached in <run>/student.json for --reuse."""
    cache = run_dir / "student.json"
    if args.reuse and cache.exists():
        return json.loads(cache.read_text())
    import torch
    from drc_core.amortized import StudentConfig, distill, posterior_pairs, predict, prior_pairs, training_pairs
    from drc_core.metrics import mean_iou_dice
    from drc_core.threshold import DEFAULT
    from pipelines.distill import refine_pairs, resolve_max_border
    from pipelines.lib.models import load, resolve_refine
    teacher = load(str(run_dir / "model.pt"))
    t0 = time.perf_counter()
    n = min(args.student_images, len(train))
    pairs = [posterior_pairs(teacher.net, train[:n], teacher.cfg, sample_ids=np.arange(n)),
             prior_pairs(teacher.net, teacher.cfg, 2000, generator=torch.Generator().manual_seed(1))]
    if resolve_refine("auto", teacher):
        pairs = refine_pairs(pairs, ["posterior", "prior"], train[:n], DEFAULT)
    pairs = training_pairs(pairs, DEFAULT, resolve_max_border("auto", teacher))
    student = distill(pairs, StudentConfig(resolution=teacher.resolution), steps=args.student_steps)
    seconds = time.perf_counter() - t0                   # pairs + training: what a user waits for after training
    prob = predict(student, images)
    masks = DEFAULT.masks(prob)
    r = {"default": {**mean_iou_dice(masks, truth), "area": 100 * float(masks.float().mean())},
         "protocol": {**mean_iou_dice(prob > 0.5, truth), "area": 100 * float((prob > 0.5).float().mean())},
         "pairs": sum(int(x.shape[0]) for x, _ in pairs), "seconds": seconds}
    cache.write_text(json.dumps(r, indent=2))
    return r


def _plot(curves: dict[int, list[dict]], policy: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for seed, rows in curves.items():
        t = [r["train_seconds"] / 60 for r in rows]
        ax.plot(t, [r["policies"][policy]["iou"] if "policies" in r else np.nan for r in rows], marker="o",
                color=f"C{seed}", label=f"seed {seed}, {policy}")
        ax.plot(t, [r["iou"] for r in rows], linestyle="--", color=f"C{seed}", label=f"seed {seed}, π_f > ½")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("held-out IoU (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> dict:
    from drc_core.config import parse_override_args
    from drc_core.inference import POLICIES_REPORTED
    from drc_core.metrics import mean_iou_dice, trivial_baselines
    from drc_core.presets import get_config
    from drc_core.threshold import DEFAULT
    from pipelines.lib.grabcut import grabcut_masks
    import torch

    if args.recipe:
        from pipelines.bench import recipe as bench_recipe
        args.preset = args.preset or "photo-32"
        return bench_recipe.run(args)
    args.preset = args.preset or "cpu-32"
    cfg = get_config(args.preset, parse_override_args(args.overrides))       # fail fast on a bad override
    if args.data != "tmds" and not Path(args.data).exists() and "://" not in args.data:
        raise SystemExit(f"bench quality: --data {args.data}: no such dataset")
    out = Path(args.out or f"runs/quality/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    parallel = max(1, min(args.parallel or min(args.seeds, cores), args.seeds))
    threads = max(1, cores // parallel)
    t0 = time.perf_counter()
    if not args.reuse:
        pending, running = list(range(args.seeds)), []
        while pending or running:
            while pending and len(running) < parallel:
                seed = pending.pop(0)
                print(f"bench quality: seed {seed} → {out / f'seed{seed}'} ({threads} threads)", flush=True)
                running.append((seed, _run_seed(args, seed, out, threads)))
            time.sleep(2)
            for seed, proc in list(running):
                if proc.poll() is not None:
                    running.remove((seed, proc))
                    if proc.returncode:
                        raise SystemExit(f"bench quality: seed {seed} failed (exit {proc.returncode}); see "
                                         f"{out / f'seed{seed}.log'}")
    runs = {s: json.loads((out / f"seed{s}" / "curve.json").read_text()) for s in range(args.seeds)}

    train, images, masks = _images(args, cfg)
    truth = masks > 0
    students = {}
    for seed in range(args.seeds if args.student else 0):
        print(f"bench quality: distilling seed {seed}'s model", flush=True)
        students[seed] = _student(args, out / f"seed{seed}", train, images, torch.as_tensor(truth))
    gc = grabcut_masks(images)
    baselines = {"GrabCut": mean_iou_dice(gc, truth), **trivial_baselines(truth)}
    finals = {s: r["final"] for s, r in runs.items()}
    policies = [DEFAULT.name, "0.5", *[p for p in POLICIES_REPORTED if p != DEFAULT.name]]

    def policystat(p, key):
        if p == "0.5":
            return stat([f[key] if key != "area" else 100 * f["mask_area"] for f in finals.values()])
        return stat([f["policies"][p][key] for f in finals.values()])
    rows = [{"method": f"DRC, {p}" + (" (default)" if p == DEFAULT.name else ", DRC protocol" if p == "0.5" else ""),
             "iou": policystat(p, "iou"), "dice": policystat(p, "dice"), "area": policystat(p, "area")}
            for p in policies]
    if students:
        rows += [{"method": name, **{k: stat([st[key][k] for st in students.values()]) for k in ("iou", "dice", "area")}}
                 for key, name in (("default", f"student, {DEFAULT.name} (default)"),
                                   ("protocol", "student, 0.5, DRC protocol"))]
    true_area = 100 * float(truth.mean())
    rows += [{"method": "GrabCut (OpenCV, 5 % margin box)", "iou": stat([baselines["GrabCut"]["iou"]]),
              "dice": stat([baselines["GrabCut"]["dice"]]), "area": stat([100 * gc.mean()])},
             {"method": "best centred disc (area picked with labels)",
              "iou": stat([baselines["centre_ellipse"]["iou"]]), "dice": stat([baselines["centre_ellipse"]["dice"]]),
              "area": {}},
             {"method": "all foreground", "iou": stat([baselines["all_foreground"]["iou"]]),
              "dice": stat([baselines["all_foreground"]["dice"]]), "area": stat([100.0])}]
    diag = {"pi_fg": stat([f["pi_fg"] for f in finals.values()]), "pi_bg": stat([f["pi_bg"] for f in finals.values()]),
            "best_threshold_iou": stat([f["best_threshold_iou"] for f in finals.values()]),
            "iterations": stat([r["iterations"] for r in runs.values()]),
            "train_minutes": stat([r["train_seconds"] / 60 for r in runs.values()]),
            "student_minutes": stat([st["seconds"] / 60 for st in students.values()])}
    _plot({s: r["curve"] for s, r in runs.items()}, DEFAULT.name, out / "curve.png")
    cpu = cpu_name()
    result = {"preset": args.preset, "data": args.data, "overrides": args.overrides, "seeds": args.seeds,
              "minutes": args.minutes, "test_images": int(len(images)), "true_area": true_area, "rows": rows,
              "diagnostics": diag, "cpu": cpu, "threads_per_seed": None if args.reuse else threads,
              "parallel": None if args.reuse else parallel,
              "wall_seconds": time.perf_counter() - t0,
              "curves": {s: r["curve"] for s, r in runs.items()}, "students": students,
              "command": " ".join(sys.argv)}
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    print(format_result(result))
    print(f"curve: {out / 'curve.png'}   json: {out / 'quality.json'}")
    return result


def format_result(r: dict) -> str:
    d = r["diagnostics"]
    lines = [f"quality: {r['preset']} on {r['data']} {' '.join(r['overrides'])}".rstrip(),
             f"  {r['seeds']} seed(s) × {r['minutes']:g} min ({cell(d['iterations'], 0)} EM iterations, "
             + (f"{r['threads_per_seed']} thread(s) each, {r['parallel']} at a time, " if r["parallel"] else
                "runs reused from --out, ")
             + f"{r['cpu']}); "
             f"{r['test_images']} held-out images, true foreground area {r['true_area']:.1f} %",
             f"{'method':<46}{'IoU':>14}{'Dice':>14}{'area %':>14}"]
    for row in r["rows"]:
        lines.append(f"{row['method']:<46}{cell(row['iou']):>14}{cell(row['dice']):>14}{cell(row['area']):>14}")
    if d.get("student_minutes"):
        lines.append(f"each student: {cell(d['student_minutes'])} min of pairs + training after "
                     f"{cell(d['train_minutes'])} min of training")
    lines.append(f"π_f on true foreground {cell(d['pi_fg'], 2)}, on background {cell(d['pi_bg'], 2)}; "
                 f"best-threshold IoU (peeks at labels) {cell(d['best_threshold_iou'])}")
    return "\n".join(lines)
