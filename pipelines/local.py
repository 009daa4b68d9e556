"""Local single-process DRC training with a learning curve (no Ray, no MLflow).

    python -m pipelines.local --preset cpu-32 --minutes 5 --eval-seconds 60 [section.key=value ...]
    python -m pipelines.local --preset photo-64 --data data/pascal-s-64 --minutes 20

Trains on TM-dSprites rendered for the preset, or on a Parquet dataset (`--data`, from
pipelines.preprocess; every split is trained on, unsupervised, and the `--eval-split` images with
masks are scored — all of them by default, transductively). Writes runs/<name>/{config.json,
curve.json, model.pt} and prints IoU/Dice over time: at the DRC protocol's π_f > ½ and under the
label-free threshold policies (drc_core/threshold.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from drc_core.config import merged_overrides, parse_override_args
from drc_core.fit import fit
from drc_core.inference import evaluate, images_to_tensor, segment
from drc_core.metrics import trivial_baselines
from drc_core.presets import get_config, preset_names
from drc_core.tmds import render_many
from drc_core.viz import composition_grid
from pipelines.lib import devices
from pipelines.lib.models import save_drc


def render_test(cfg, n: int):
    """The first n TM-dSprites test images (uint8) and masks for this config."""
    d = cfg.data
    return render_many("test", range(n), size=cfg.model.resolution, bank_seed=d.bank_seed,
                       sprite_size=d.sprite_size)


def dataset_images(cfg, data: str | None, eval_split: str | None, n_eval: int | None):
    """(train images, evaluation images, their masks): TM-dSprites for the preset, or a Parquet
    dataset's images (all splits) and its `eval_split` images with masks."""
    d, size = cfg.data, cfg.model.resolution
    if data is None:
        train, _ = render_many("train", range(d.train_size), size=size, bank_seed=d.bank_seed,
                               sprite_size=d.sprite_size)
        return (train, *render_test(cfg, n_eval or d.test_size))
    from pipelines.lib.parquet_store import load_arrays
    train = load_arrays(data)
    if train["images"].shape[1] != size:
        raise SystemExit(f"local: --data {data} has resolution {train['images'].shape[1]}, preset {cfg.preset} "
                         f"trains at {size}: preprocess the data at {size}")
    test = load_arrays(data, eval_split) if eval_split else train
    if "masks" not in test:
        raise SystemExit(f"local: --data {data}: the evaluation images have no masks to score against")
    n = min(n_eval or len(test["images"]), len(test["images"]))
    return train["images"], test["images"][:n], test["masks"][:n]


def final_evaluation(model, cfg, images, masks, steps, z_init=None) -> dict:
    t0 = time.perf_counter()
    return {"images": len(images), **evaluate(model, images, masks, cfg, steps=steps, z_init=z_init),
            "baselines": trivial_baselines(masks), "seconds": time.perf_counter() - t0}


def save_grid(model, images, masks, cfg, path, steps=None, z_init=None) -> None:
    """Observed / reconstruction / fg / bg / π_f / ground truth for a few images, as a PNG."""
    from PIL import Image
    seg = segment(model, images, cfg, steps=steps, z_init=z_init)
    dev = next(model.parameters()).device
    with torch.no_grad():
        comp = model.compose(seg.z.to(dev))
    grid = composition_grid(images_to_tensor(images).to(dev), comp, torch.as_tensor(masks).to(dev))
    scale = max(1, 256 // images.shape[1])
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-32", choices=preset_names())
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget")
    p.add_argument("--iterations", type=int, default=None, help="stop after this many EM iterations too")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="test evaluation every N EM iterations (as on every stage)")
    p.add_argument("--eval-seconds", type=float, default=None, metavar="S",
                   help="test evaluation every S seconds of training instead (default: 60 without --eval-every)")
    p.add_argument("--quiet", action="store_true", help="no curve lines while training (curve.json keeps them)")
    p.add_argument("--eval-images", type=int, default=None, help="test images (default: data.test_size)")
    p.add_argument("--eval-steps", type=int, default=None, help="posterior steps at test time")
    p.add_argument("--final-eval-images", type=int, default=None,
                   help="test images for the final evaluation (default: data.test_size)")
    p.add_argument("--data", default=None, help="a Parquet dataset to train on instead of TM-dSprites")
    p.add_argument("--eval-split", default=None, choices=("train", "val", "test"),
                   help="with --data: score this split (default: every image with a mask)")
    p.add_argument("--from-chains", action="store_true",
                   help="with --data and no --eval-split (the scored images are training images): segment by "
                        "continuing their persistent chains for --eval-steps (default 10) instead of fresh chains")
    devices.add_argument(p, what="training and evaluation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--out", "--output", dest="out", default="runs", help="output folder")
    p.add_argument("--name", default=None)
    p.add_argument("--evaluate-only", metavar="MODEL_PT", default=None,
                   help="skip training: evaluate a saved runs/<name>/model.pt on --final-eval-images")
    p.add_argument("--config", default=None, metavar="RUN_YAML",
                   help="a YAML file of section.key: value overrides (the command line's overrides win)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    if args.eval_every is not None and args.eval_seconds is not None:
        raise SystemExit("local: give --eval-every (iterations) or --eval-seconds, not both")
    try:
        device = devices.resolve(args.device, "local")
    except devices.DeviceError as exc:
        raise SystemExit(str(exc)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate_only:
        return evaluate_saved(args, device)
    cfg = get_config(args.preset, merged_overrides(args.config, args.overrides))
    d, size = cfg.data, cfg.model.resolution
    name = args.name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=False)
    (out / "config.json").write_text(cfg.to_json())

    t0 = time.perf_counter()
    n_final = args.final_eval_images or (None if args.data else d.test_size)
    n_eval = args.eval_images or (None if args.data else d.test_size)
    train, pool, pool_masks = dataset_images(cfg, args.data, args.eval_split,
                                             None if n_final is None or n_eval is None else max(n_final, n_eval))
    n_final, n_eval = min(n_final or len(pool), len(pool)), min(n_eval or len(pool), len(pool))
    final_test, final_masks = pool[:n_final], pool_masks[:n_final]
    test, test_masks = pool[:n_eval], pool_masks[:n_eval]
    print(f"{'rendered' if args.data is None else 'read'} {len(train)} train / {len(test)} test images at {size}² "
          f"in {time.perf_counter() - t0:.1f} s")
    baselines = trivial_baselines(test_masks)
    print("baselines:", json.dumps(baselines))

    curve: list[dict] = []
    budget = args.minutes * 60
    start = time.perf_counter()
    train_time = 0.0
    next_eval = 0.0

    if args.from_chains and (args.data is None or args.eval_split):
        raise SystemExit("local: --from-chains scores training images: it needs --data without --eval-split")
    eval_steps = args.eval_steps if args.eval_steps is not None or not args.from_chains else 10

    def chains_of(state, n):
        """The persistent chains of the first n training images (the scored ones with --from-chains)."""
        return state.chains.get(torch.arange(n)) if args.from_chains else None

    def record(state, train_seconds):
        res = evaluate(state.model, test, test_masks, cfg, steps=eval_steps, z_init=chains_of(state, len(test)))
        recent = state.history[-20:]
        row = {"iteration": state.iteration, "train_seconds": round(train_seconds, 1), **res,
               "s_per_iter": sum(h["seconds"] for h in recent) / max(len(recent), 1)}
        curve.append(row)
        if not args.quiet:
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    def on_iteration(state, m):
        nonlocal train_time, next_eval
        train_time += m["seconds"]
        if args.eval_every:
            due = state.iteration == 1 or state.iteration % args.eval_every == 0
        else:
            due = train_time >= next_eval
        if due:
            record(state, train_time)
            next_eval += args.eval_seconds or 60.0
        return train_time >= budget

    state = fit(cfg, train, iterations=args.iterations or 10**9, on_iteration=on_iteration, device=device)
    save_drc(out / "model.pt", cfg, state.model.state_dict())
    if n_final != len(test):
        if curve[-1]["iteration"] != state.iteration:     # close the curve on its own image set
            record(state, train_time)
        test, test_masks = final_test, final_masks
    final = final_evaluation(state.model, cfg, test, test_masks, eval_steps, chains_of(state, len(test)))
    if n_final == n_eval and curve[-1]["iteration"] != state.iteration:
        # same images as the curve: the final evaluation is the curve's last point
        curve.append({"iteration": state.iteration, "train_seconds": round(train_time, 1),
                      **{k: v for k, v in final.items() if k not in ("images", "baselines", "seconds")}})
    baselines = final["baselines"]
    print("final evaluation:", json.dumps(final), flush=True)
    save_grid(state.model, test[:8], test_masks[:8], cfg, out / "test_grid.png", steps=eval_steps,
              z_init=chains_of(state, 8))
    result = {"config": cfg.to_dict(), "baselines": baselines, "curve": curve, "final": final,
              "iterations": state.iteration, "train_seconds": train_time,
              "wall_seconds": time.perf_counter() - start}
    (out / "curve.json").write_text(json.dumps(result, indent=2))
    print(f"final: IoU {final['iou']:.1f} Dice {final['dice']:.1f} on {n_final} test images after "
          f"{state.iteration} iterations ({train_time / 60:.1f} min of training); results in {out}")
    return result


def evaluate_saved(args, device) -> dict:
    """Evaluate a saved model (runs/<name>/model.pt) on the first N test images."""
    from drc_core.config import DRCConfig, apply_overrides
    from drc_core.model import DRCModel
    from pipelines.lib.checkpoints import CheckpointError, safe_load
    try:
        saved = safe_load(args.evaluate_only)
    except CheckpointError as exc:
        raise SystemExit(f"local: --evaluate-only {exc}") from None
    cfg = apply_overrides(DRCConfig.from_dict(saved["config"]), parse_override_args(args.overrides))
    model = DRCModel(cfg.model, cfg.ablation)
    model.load_state_dict(saved["model"])
    model.to(device)
    test, masks = render_test(cfg, args.final_eval_images or cfg.data.test_size)
    res = final_evaluation(model, cfg, test, masks, args.eval_steps)
    print("evaluation:", json.dumps(res))
    return res


if __name__ == "__main__":
    main()
