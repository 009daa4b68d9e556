"""Distil a trained DRC model into a fast feed-forward segmenter (the `amortized` mode).

    python -m pipelines.distill --teacher runs/ray/<name>/checkpoint_000300 --data data/tmds-32
    python -m pipelines.distill --teacher runs/<name>/model.pt --data data/tmds-32 --pairs prior,posterior
    python -m pipelines.distill --teacher runs:/<run_id>/model --pairs prior --out runs/distill/mine
    python -m pipelines.distill --teacher runs/ray/a/checkpoint_000150 runs/ray/b/checkpoint_000150 --data data/p-32

Pairs (drc_core/amortized.py): `chains` — the training images with π_f decoded from the
checkpoint's persistent chains (needs a checkpoint folder and --data); `posterior` — training
images with π_f from fresh posterior Langevin at the preset's test steps (any DRC model, costs
the teacher's inference time); `prior` — images the teacher synthesises from its prior.
Default: chains + prior with a checkpoint, posterior + prior otherwise (prior alone without
--data). The student learns the masks the default threshold policy makes of the teacher's π_f
(`--targets`, drc_core/threshold.py), or the soft π_f itself with `--targets soft`. Pairs whose
mask covers more than `--max-border` of the image's frame are dropped (the boundary prior; by
default 0.1 for a teacher trained on photos, off for the synthetic benchmarks: docs/quality.md §3).
`--refine grabcut` (the default for a photo teacher) re-draws each training image's mask with
GrabCut started from the teacher's partition (π_f > 0.9 definite foreground, the frame definite
background, the rest as the mask says) before the student learns it; prior pairs keep their exact
masks. On PASCAL-S it lifts the student by ~2.5 IoU (docs/quality.md §3, stop 30).
Several teachers (`--teacher A B …`, models of one resolution, e.g. the same preset trained with
different seeds) pool their pairs: the student learns from all of them, which on photos beats each
teacher's own student (docs/quality.md §3). Writes <out>/student.pt and logs an MLflow run (params,
loss curve, held-out IoU/Dice when the data has masks, the student as a pyfunc model that segments
images).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from pipelines.lib import devices, tracking
from pipelines.lib.ray_env import ScratchPathError
from pipelines.lib.models import LANGEVIN, REFINE, SYNTHETIC, ModelError, load, resolve_refine, save_student

PAIR_KINDS = ("chains", "posterior", "prior")
AUTO_MAX_BORDER = 0.1                           # measured on PASCAL-S, 5 teacher seeds: docs/quality.md §3


def _progress(what: str, log, every: float = 15.0):
    """An `on_batch(done, total)` callback that logs `what: done/total, ETA` at most every `every` s."""
    t0 = last = time.perf_counter()

    def on_batch(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done < total and now - last >= every:
            last = now
            log(f"{what}: {done}/{total} images, {done / (now - t0):.1f} images/s, "
                f"eta {(total - done) * (now - t0) / done:.0f} s")
    return on_batch


def _train_images(kinds: list[str], resolution: int, args) -> dict | None:
    """The training images the chain / posterior pairs need (None when only prior pairs are made):
    the first --train-images of the training split, read from the parts that hold them only."""
    from pipelines.lib.parquet_store import Store, load_range, split_range
    if not {"chains", "posterior"} & set(kinds):
        return None
    if not args.data:
        raise ModelError(f"--pairs {','.join(kinds)} needs --data (the training images)")
    manifest = Store(args.data).read_manifest()
    if manifest["resolution"] != resolution:
        raise ModelError(f"--data {args.data} has resolution {manifest['resolution']}, the teacher {resolution}")
    lo, hi = split_range(manifest, "train")
    return load_range(args.data, lo, min(hi, lo + args.train_images))


def _pairs(kinds: list[str], teacher, train: dict | None, args, log) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from drc_core.amortized import chain_pairs, posterior_pairs, prior_pairs
    cfg, model = teacher.cfg, teacher.net
    out = []
    for kind in kinds:
        t0 = time.perf_counter()
        if kind == "chains":
            if teacher.checkpoint is None:
                raise ModelError(f"--pairs chains needs a training checkpoint folder as --teacher, "
                                 f"not {teacher.source}")
            from pipelines.lib.chain_reader import ChainReader
            z = ChainReader(teacher.checkpoint).get(train["sample_id"])
            out.append(chain_pairs(model, train["images"], z))
        elif kind == "posterior":
            out.append(posterior_pairs(model, train["images"], cfg, seed=args.seed, sample_ids=train["sample_id"],
                                       on_batch=_progress(f"{kind} pairs", log)))
        else:
            out.append(prior_pairs(model, cfg, args.prior_images, on_batch=_progress(f"{kind} pairs", log),
                                   generator=torch.Generator(teacher.device).manual_seed(args.seed + 1)))
        log(f"{kind} pairs: {out[-1][0].shape[0]} in {time.perf_counter() - t0:.1f} s, "
            f"mean π_f {float(out[-1][1].mean()):.3f}")
    return out


def resolve_max_border(arg: str, teacher) -> float | None:
    """--max-border → the frame share a kept pair's mask may cover, or None (keep every pair)."""
    if arg == "auto":
        return None if teacher.cfg.data.dataset in SYNTHETIC else AUTO_MAX_BORDER
    if arg == "off":
        return None
    try:
        value = float(arg)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ModelError(f"--max-border {arg!r}: expected a fraction in [0, 1], 'auto' or 'off'")
    return value


def refine_pairs(pairs, kinds: list[str], images: np.ndarray, targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The chain / posterior pairs' π_f replaced by GrabCut's masks started from it (prior pairs, whose
    masks are the teacher's own compositions, stay). A 0/1 map passes every threshold policy as it is."""
    from pipelines.lib.grabcut import grabcut_refine_all
    out = []
    for (x, y), kind in zip(pairs, kinds, strict=True):
        if kind != "prior":
            refined = grabcut_refine_all(images, y.numpy(), targets.masks(y).numpy())
            y = torch.from_numpy(refined).float()
        out.append((x, y))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, nargs="+", action="extend",
                   help="checkpoint folder, model.pt, or MLflow model URI of a DRC model; several (one resolution) "
                        "pool their pairs")
    p.add_argument("--data", default=None, help="Parquet dataset the teacher was trained on")
    p.add_argument("--pairs", default=None, help=f"comma-separated of {', '.join(PAIR_KINDS)}")
    p.add_argument("--train-images", type=int, default=20_000,
                   help="use the first N training images (default %(default)s: the student trains in memory)")
    p.add_argument("--prior-images", type=int, default=2000, help="images synthesised from the prior")
    p.add_argument("--targets", default=None, metavar="POLICY",
                   help="what the student learns: 'soft' (the teacher's π_f) or the masks a threshold policy "
                        "makes of it (0.5, a number, otsu, gmm, …; default: drc_core.threshold.DEFAULT)")
    p.add_argument("--max-border", default="auto", metavar="FRACTION",
                   help="keep only pairs whose mask covers at most this share of the image's frame; 'off' keeps "
                        f"all; 'auto' (default): {AUTO_MAX_BORDER} for a teacher trained on photos, off for "
                        f"{', '.join(SYNTHETIC)}")
    p.add_argument("--refine", default="auto", choices=REFINE,
                   help="'grabcut': re-draw the training images' masks with GrabCut started from the teacher's "
                        "partition before the student learns them; 'auto' (default): grabcut for a teacher trained "
                        f"on photos, off for {', '.join(SYNTHETIC)}")
    p.add_argument("--steps", type=int, default=1500, help="student optimiser steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=8, help="student U-Net channels at full resolution")
    p.add_argument("--levels", type=int, default=2, help="student U-Net resolution halvings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    devices.add_argument(p, what="the teacher's sampling and the student's training")
    p.add_argument("--out", "--output", dest="out", default=None, help="output folder (default: runs/distill/<name>)")
    p.add_argument("--eval-images", type=int, default=1000, help="held-out images for IoU (when masked)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=tracking.default_experiment(),
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or %(default)s)")
    p.add_argument("--no-model", action="store_true", help="do not log the pyfunc model")
    p.add_argument("--quiet", action="store_true", help="no progress lines (the summary is printed)")
    return p.parse_args(argv)


def run(args) -> dict:
    from drc_core.amortized import StudentConfig, distill, predict, training_pairs
    from drc_core.metrics import mean_iou_dice
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipelines.lib.ray_env import check_job_outputs
    check_job_outputs("distill", {"--out": args.out or "runs/distill",
                                  "--tracking-uri": tracking.configured_uri(args.tracking_uri)})
    device = devices.resolve(args.device, "distill")
    uri = tracking.tracking_uri(args.tracking_uri)
    if any(t.startswith(("runs:/", "models:/")) for t in args.teacher):
        import mlflow
        mlflow.set_tracking_uri(uri)
    teachers = [load(t, device) for t in args.teacher]
    for t in teachers:
        if t.kind != LANGEVIN:
            raise ModelError(f"--teacher {t.source} is already a distilled student, not a DRC model")
        if t.resolution != teachers[0].resolution:
            raise ModelError(f"--teacher {t.source} has resolution {t.resolution}, --teacher {args.teacher[0]} "
                             f"{teachers[0].resolution}: pooled teachers share one resolution")
    teacher = teachers[0]                # the student keeps the first teacher's config (resolution, test steps)
    from drc_core.threshold import DEFAULT, PolicyError, ThresholdPolicy
    try:
        targets = None if args.targets == "soft" else ThresholdPolicy.parse(args.targets or DEFAULT.name)
    except PolicyError as exc:
        raise ModelError(f"--targets: {exc}") from None
    borders = {resolve_max_border(args.max_border, t) for t in teachers}
    if len(borders) > 1:
        raise ModelError(f"--max-border {args.max_border}: the teachers were trained on different kinds of data "
                         f"({', '.join(sorted({t.cfg.data.dataset for t in teachers}))}); give a fraction or 'off'")
    max_border = borders.pop()
    refines = {resolve_refine(args.refine, t) for t in teachers}
    if len(refines) > 1:
        raise ModelError(f"--refine auto: the teachers were trained on different kinds of data "
                         f"({', '.join(sorted({t.cfg.data.dataset for t in teachers}))}); give grabcut or off")
    refine = refines.pop()
    if refine and targets is None:
        raise ModelError("--refine grabcut re-draws masks: it needs a threshold policy as --targets, not 'soft'")
    checkpoints = all(t.checkpoint is not None for t in teachers)
    default = ["chains" if checkpoints else "posterior", "prior"] if args.data else ["prior"]
    kinds = args.pairs.split(",") if args.pairs else default
    bad = [k for k in kinds if k not in PAIR_KINDS]
    if bad:
        raise ModelError(f"--pairs: unknown kind(s) {bad}; choose from {', '.join(PAIR_KINDS)}")
    name = f"distill-{teacher.cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    out = Path(args.out or f"runs/distill/{name}")
    out.mkdir(parents=True, exist_ok=True)
    scfg = StudentConfig(resolution=teacher.resolution, width=args.width, levels=args.levels).validate()
    params = {"teacher": ",".join(args.teacher), "teachers": len(teachers), "data": args.data, "device": str(device),
              "pairs": ",".join(kinds),
              "targets": "soft" if targets is None else targets.name, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "prior_images": args.prior_images,
              "train_images": args.train_images, "seed": args.seed,
              "max_border": "off" if max_border is None else max_border, "refine": "grabcut" if refine else "off", **{f"student.{k}": v for k, v in scfg.to_dict().items()},
              **{f"teacher.{k}": v for k, v in teacher.cfg.flat().items()}}
    run_id = tracking.start_run(uri, name, params, experiment=args.experiment,
                                tags={"drc.stage": "distill", "drc.preset": teacher.cfg.preset})
    try:
        t0 = time.perf_counter()
        say = (lambda m: None) if args.quiet else (lambda m: print(f"distill: {m}", flush=True))
        train = _train_images(kinds, teacher.resolution, args)
        pairs, names = [], []            # one pair set per (teacher, kind); 'kind' alone with one teacher
        for i, t in enumerate(teachers):
            if len(teachers) > 1:
                say(f"teacher {i + 1}/{len(teachers)}: {t.source}")
            pairs += _pairs(kinds, t, train, args, say)
            names += [k if len(teachers) == 1 else f"{i}:{k}" for k in kinds]
        totals = [x.shape[0] for x, _ in pairs]
        if refine and train is not None:
            t2 = time.perf_counter()
            pairs = refine_pairs(pairs, kinds * len(teachers), train["images"], targets)
            say(f"GrabCut re-drew {len(train['images'])} masks per teacher in {time.perf_counter() - t2:.1f} s")
        try:                             # hard targets; the boundary prior drops pairs whose mask fills the frame
            pairs = training_pairs(pairs, targets, max_border)
        except ValueError as exc:
            raise ModelError(f"--max-border: {exc}") from None
        kept = {k: [x.shape[0], n] for k, (x, _), n in zip(names, pairs, totals)}
        if max_border is not None:
            say(f"pairs kept (mask on ≤ {max_border:g} of the frame): "
                + ", ".join(f"{k} {a}/{n}" for k, (a, n) in kept.items()))
        pair_seconds = time.perf_counter() - t0
        losses: list[float] = []

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            if (step + 1) % 50 == 0 or step + 1 == args.steps:
                tracking.log_metrics(uri, run_id, {"loss": float(np.mean(losses[-50:]))}, step + 1)
            if (step + 1) % 500 == 0:
                rate = (step + 1) / (time.perf_counter() - t1)
                say(f"step {step + 1}/{args.steps} loss {np.mean(losses[-50:]):.4f} "
                    f"{rate:.1f} steps/s eta {(args.steps - step - 1) / rate:.0f} s")

        t1 = time.perf_counter()
        student = distill(pairs, scfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          device=device, on_step=on_step)
        summary = {"name": name, "mlflow_run_id": run_id, "tracking_uri": uri, "out": str(out), "pairs": kinds,
                   "teachers": list(args.teacher),
                   "pairs_kept": kept, "max_border": max_border, "refine": "grabcut" if refine else "off",
                   "pair_seconds": pair_seconds, "train_seconds": time.perf_counter() - t1,
                   "final_loss": float(np.mean(losses[-50:]))}
        x, y = next((x, y) for x, y in pairs if x.shape[0])
        with torch.no_grad():
            agree = torch.sigmoid(student(x[:512].to(device)))[:, 0].cpu() > 0.5
        summary["train_agreement_iou"] = mean_iou_dice(agree, y[:512] > 0.5)["iou"]
        if args.data:
            from pipelines.lib.parquet_store import Store, load_range, split_range
            lo, hi = split_range(Store(args.data).read_manifest(), "test")
            test = load_range(args.data, lo, min(hi, lo + args.eval_images))
            if "masks" in test and len(test["sample_id"]):
                n = len(test["sample_id"])
                prob = predict(student, test["images"])
                truth = test["masks"] > 0
                summary["eval"] = {"images": n, "threshold": DEFAULT.name,
                                   **mean_iou_dice(DEFAULT.masks(prob), truth),
                                   "protocol": mean_iou_dice(prob > 0.5, truth)}
        path = save_student(out / "student.pt", teacher.cfg, student)
        metrics = {"train_agreement_iou": summary["train_agreement_iou"], "pair_seconds": pair_seconds,
                   "train_seconds": summary["train_seconds"], "pairs_kept": sum(a for a, _ in kept.values())}
        if "eval" in summary:
            metrics.update(eval_iou=summary["eval"]["iou"], eval_dice=summary["eval"]["dice"])
        tracking.log_metrics(uri, run_id, metrics, args.steps)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        c = tracking.client(uri)
        c.log_artifact(run_id, str(path))
        c.log_artifact(run_id, str(out / "summary.json"))
        if not args.no_model:
            from pipelines.lib.mlflow_model import log_pyfunc
            with tempfile.TemporaryDirectory() as tmp:
                weights = Path(tmp) / "student.pt"
                weights.write_bytes(path.read_bytes())
                summary["model_uri"] = log_pyfunc(uri, run_id, weights, teacher.cfg.langevin.test_steps)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id)
    return summary


def main(argv=None) -> dict:
    try:
        summary = run(parse_args(argv))
    except (devices.DeviceError, ScratchPathError) as exc:       # each names the stage
        sys.exit(str(exc))
    except ModelError as exc:
        sys.exit(f"distill: {exc}")
    print("done:", json.dumps({k: v for k, v in summary.items()}), flush=True)
    return summary


if __name__ == "__main__":
    main()
