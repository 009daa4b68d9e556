"""Segmentation benchmark (`python -m pipelines.bench segment`): the paper's posterior Langevin
against the distilled amortised segmenter, GrabCut and trivial masks, on the same TM-dSprites
test images, measured side by side in one process.

    python -m pipelines.bench segment --preset cpu-32 --train-iterations 300
    python -m pipelines.bench segment --preset cpu-64 --teacher runs/<name>/model.pt --student student.pt

Without --teacher a DRC model is trained here first (drc_core.fit, the preset, the first
--train-images training images); without --student one is distilled from that model's
persistent chains plus prior samples. Reported: images/s and IoU/Dice per method, the
amortised/Langevin speed ratio and IoU gap, and on training images fresh Langevin chains
against continuing the persistent chains (--from-chains).
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(args) -> dict:
    from drc_core.amortized import StudentConfig, chain_pairs, distill, predict, prior_pairs
    from drc_core.fit import fit
    from drc_core.inference import decode, images_to_tensor, segment
    from drc_core.metrics import mean_iou_dice, trivial_baselines
    from drc_core.presets import get_config
    from drc_core.tmds import render_many
    from pipelines.lib.grabcut import grabcut_masks
    from pipelines.lib.models import load

    torch.set_num_threads(args.threads)
    cfg = get_config(args.preset)
    size, d = cfg.model.resolution, cfg.data
    n_test = args.images or d.test_size
    test_x, test_m = render_many("test", range(n_test), size=size, bank_seed=d.bank_seed, sprite_size=d.sprite_size)
    info: dict = {"preset": args.preset, "test_images": n_test, "test_steps": cfg.langevin.test_steps,
                  "threads": args.threads}
    chains = None
    if args.teacher:
        teacher = load(args.teacher)
        model, cfg = teacher.net, teacher.cfg
        info["teacher"] = args.teacher
    else:
        n_train = args.train_images or d.train_size
        train_x, train_m = render_many("train", range(n_train), size=size, bank_seed=d.bank_seed,
                                       sprite_size=d.sprite_size)
        state, secs = _timed(lambda: fit(cfg, train_x, iterations=args.train_iterations))
        model, chains = state.model.eval(), state.chains
        info.update(teacher=f"trained here: {args.train_iterations} iterations on {n_train} images",
                    teacher_train_seconds=secs)
        print(f"teacher: {args.train_iterations} EM iterations in {secs:.0f} s", flush=True)
    if args.student:
        student = load(args.student).net
        info["student"] = args.student
    else:
        if chains is None:
            raise SystemExit("bench segment: distilling needs the teacher's chains: pass --student, or no --teacher")
        ids = torch.arange(len(train_x))
        pairs = [chain_pairs(model, train_x, chains.get(ids)),
                 prior_pairs(model, cfg, args.prior_images, generator=torch.Generator().manual_seed(1))]
        scfg = StudentConfig(resolution=size, width=args.width, levels=args.levels)
        student, secs = _timed(lambda: distill(pairs, scfg, steps=args.distill_steps, batch_size=64))
        info.update(student=f"distilled here: {args.distill_steps} steps, width {args.width}, levels {args.levels}",
                    distill_seconds=secs)
        print(f"student: {args.distill_steps} steps in {secs:.0f} s", flush=True)

    rows = []
    seg, secs = _timed(lambda: segment(model, test_x, cfg, batch_size=64, sample_ids=np.arange(n_test)))
    rows.append({"method": f"langevin ({cfg.langevin.test_steps} steps)", "images_per_s": n_test / secs,
                 **mean_iou_dice(seg.mask, test_m > 0)})
    predict(student, test_x[:256])                                      # warm-up
    best = min(_timed(lambda: predict(student, test_x))[1] for _ in range(3))
    prob = predict(student, test_x)
    rows.append({"method": "amortized (distilled U-Net)", "images_per_s": n_test / best,
                 **mean_iou_dice(prob > 0.5, test_m > 0)})
    gc, secs = _timed(lambda: grabcut_masks(test_x))
    rows.append({"method": "GrabCut (box = image − 5 %)", "images_per_s": n_test / secs, **mean_iou_dice(gc, test_m > 0)})
    for name, r in trivial_baselines(test_m).items():
        rows.append({"method": name.replace("_", " ") + " (trivial)", "images_per_s": float("nan"), **r})
    lang, amort = rows[0], rows[1]
    info["speed_ratio_amortized_vs_langevin"] = amort["images_per_s"] / lang["images_per_s"]
    info["iou_gap_amortized_minus_langevin"] = amort["iou"] - lang["iou"]

    if chains is not None:                      # training images: fresh chains vs the persistent ones
        k = min(args.chain_images, len(train_x))
        ids = np.arange(k)
        fresh, t_fresh = _timed(lambda: segment(model, train_x[:k], cfg, batch_size=64, sample_ids=ids))
        cont, t_cont = _timed(lambda: segment(model, train_x[:k], cfg, steps=args.refine_steps, batch_size=64,
                                              sample_ids=ids, z_init=chains.get(torch.from_numpy(ids))))
        raw = decode(model, images_to_tensor(train_x[:k]), chains.get(torch.from_numpy(ids)))
        info["training_images"] = {
            "images": k,
            "fresh_langevin": {"images_per_s": k / t_fresh, **mean_iou_dice(fresh.mask, train_m[:k] > 0)},
            f"from_chains_{args.refine_steps}_steps": {"images_per_s": k / t_cont,
                                                       **mean_iou_dice(cont.mask, train_m[:k] > 0)},
            "chains_decoded_as_is": mean_iou_dice(raw.mask, train_m[:k] > 0),
            "amortized": mean_iou_dice(predict(student, train_x[:k]) > 0.5, train_m[:k] > 0)}
    print(f"\nsegmentation on {n_test} TM-dSprites test images ({args.preset}, {args.threads} threads)")
    print(f"{'method':<36}{'images/s':>12}{'IoU':>8}{'Dice':>8}")
    for r in rows:
        print(f"{r['method']:<36}{r['images_per_s']:>12.2f}{r['iou']:>8.1f}{r['dice']:>8.1f}")
    print(f"amortized / langevin speed: {info['speed_ratio_amortized_vs_langevin']:.0f}×; "
          f"IoU gap (amortized − langevin): {info['iou_gap_amortized_minus_langevin']:+.1f}")
    if "training_images" in info:
        print("training images (persistent chains exist):", json.dumps(info["training_images"]))
    result = {**info, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def add_parser(sub) -> None:
    s = sub.add_parser("segment", help="Langevin vs amortised segmentation vs GrabCut: images/s and IoU")
    s.set_defaults(run=run)
    s.add_argument("--preset", default="cpu-32")
    s.add_argument("--images", type=int, default=None, help="test images (default: the preset's test split)")
    s.add_argument("--teacher", default=None, help="a DRC model (checkpoint or model.pt); default: train one here")
    s.add_argument("--student", default=None, help="a distilled student.pt; default: distil one here")
    s.add_argument("--train-images", type=int, default=None)
    s.add_argument("--train-iterations", type=int, default=300)
    s.add_argument("--distill-steps", type=int, default=1500)
    s.add_argument("--prior-images", type=int, default=1000)
    s.add_argument("--width", type=int, default=8)
    s.add_argument("--levels", type=int, default=2)
    s.add_argument("--chain-images", type=int, default=200)
    s.add_argument("--refine-steps", type=int, default=10)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--json", default=None)
