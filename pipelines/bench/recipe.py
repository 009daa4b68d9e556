"""The photo recipe as a benchmark (`python -m pipelines.bench quality --recipe photos`): the README's
"Segment your own photos" commands, run as a user runs them, for several sets of teachers, and one
table of what they give beside GrabCut, the best centred ellipse and all-foreground.

    python -m pipelines.bench quality --recipe photos --photos ../shared/data/pascal-s/images \\
        --masks ../shared/data/pascal-s/masks --sets 2

Each command is a `python -m pipelines.<stage>` subprocess with the README's arguments (its log in
<out>/logs/): `preprocess --source folder --crop resize` once; per set k = 1, 2, … (seeds
(k−1)·T+1 … k·T, so set 1 is the README's seeds 1–4) T × `train --preset P --workers 2 --iterations I
--eval-every 0 seed=S`, one `distill` of the T teachers, `segment --png` of the photos with the student (its default GrabCut
refinement for a model trained on photos); then one `evaluate --masks` of every set's output,
which scores them at each photo's own size beside the baselines on the same photos. Training is
unsupervised: `--masks` only reaches `evaluate`.

Reported: IoU / Dice per method as mean ± half-spread over the sets (the product's mask = the
refined one; the student's π_f mask before GrabCut; the same π_f at the DRC protocol's ½), the
baselines, and each command's minutes with the CPU they ran on (<out>/recipe.json). A command that
finished (recorded in <out>/steps.json, its output present) is not run again: an interrupted
benchmark continues, and `--reuse` only aggregates.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # the checkout: `python -m pipelines.<stage>` runs from it

# evaluate's row suffix → this table's method, for each set's output (scoring.BEFORE_REFINE, PROTOCOL_LABEL)
STUDENT_ROWS = (("", "student + GrabCut refinement (segment's default)"),
                (", π_f's mask before GrabCut", "student, π_f's own mask (Otsu per image)"),
                (", π_f > ½, DRC protocol", "student, π_f > ½ (DRC protocol)"))


class Recipe:
    """The recipe's commands for one benchmark folder; each runs once (see the module doc)."""

    def __init__(self, args, out: Path):
        self.args, self.out = args, out
        self.data = out / "data"
        self.tracking = f"sqlite:///{out}/mlflow.db"
        self.steps_file = out / "steps.json"
        self.steps = json.loads(self.steps_file.read_text()) if self.steps_file.exists() else {}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, stage: str, argv: list[str], done: Path) -> float:
        """`python -m pipelines.<stage> argv` unless step `name` is recorded and `done` exists; its seconds."""
        if name in self.steps and done.exists():
            return self.steps[name]["seconds"]
        if self.args.reuse:
            raise SystemExit(f"bench quality --reuse: step {name} has not run in {self.out} ({done} missing)")
        cmd = [sys.executable, "-m", f"pipelines.{stage}", *argv]
        print(f"bench quality: {name}: drc {stage} {shlex.join(argv)}", flush=True)
        t0 = time.perf_counter()
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        seconds = time.perf_counter() - t0
        if code or not done.exists():
            tail = (self.out / "logs" / f"{name}.log").read_text().strip().splitlines()[-5:]
            raise SystemExit(f"bench quality: {name} failed (exit {code}); {self.out / 'logs' / (name + '.log')}:\n  "
                             + "\n  ".join(tail))
        self.steps[name] = {"seconds": seconds, "command": f"drc {stage} {shlex.join(argv)}"}
        self.steps_file.write_text(json.dumps(self.steps, indent=2))
        return seconds

    def teacher(self, seed: int) -> Path:
        return self.out / "ray" / f"photos-s{seed}" / f"checkpoint_{self.args.iterations:08d}"

    def one_set(self, k: int) -> dict:
        a = self.args
        seeds = [k * a.teachers + t + 1 for t in range(a.teachers)]
        train = [self.run(f"train-s{s}", "train",
                          ["--data", str(self.data), "--preset", a.preset, "--workers", str(a.workers),
                           "--iterations", str(a.iterations), "--eval-every", "0", "--name", f"photos-s{s}", "--storage",
                           str(self.out / "ray"), "--tracking-uri", self.tracking, "--quiet", f"seed={s}",
                           *a.overrides], self.teacher(s)) for s in seeds]
        student = self.out / "distill" / f"set{k + 1}"
        distill = self.run(f"distill-set{k + 1}", "distill",
                           ["--teacher", *[str(self.teacher(s)) for s in seeds], "--data", str(self.data),
                            "--out", str(student), "--steps", str(a.student_steps), "--tracking-uri",
                            self.tracking, "--quiet"], student / "student.pt")
        png = self.out / "png" / f"set{k + 1}"
        segment = self.run(f"segment-set{k + 1}", "segment",
                           ["--model", str(student / "student.pt"), "--input", a.photos, "--png", str(png),
                            "--tracking-uri", self.tracking, "--quiet"], png / "segmentation" / "_manifest.json")
        return {"seeds": seeds, "train_seconds": train, "distill_seconds": distill, "segment_seconds": segment,
                "segmentation": str(png / "segmentation")}


def _evaluate_rows(metrics: dict, sets: list[str]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """evaluate's metrics.json → ({this table's student method: [row per set]}, {baseline: row}), on
    the 'all' split where the photos have several, else the one split."""
    table = metrics["table"]
    split = "all" if any(r["split"] == "all" for r in table) else table[0]["split"]
    rows = {r["method"]: r for r in table if r["split"] == split}
    students = {label: [rows[f"{s}{suffix}"] for s in sets] for suffix, label in STUDENT_ROWS
                if all(f"{s}{suffix}" in rows for s in sets)}
    own = {f"{s}{suffix}" for s in sets for suffix, _ in STUDENT_ROWS}
    baselines = {m: r for m, r in rows.items() if m not in own and not any(m.startswith(f"{s}, ") for s in sets)}
    return students, baselines


def run(args) -> dict:
    from pipelines.bench.common import cell as _cell, cpu_name as _cpu_name, stat as _stat
    from drc_core.config import parse_override_args
    from drc_core.presets import get_config
    if not args.photos or not args.masks:
        raise SystemExit("bench quality --recipe photos: give --photos DIR (the photos) and --masks DIR (their masks, "
                         "used only to score)")
    for flag, path in (("--photos", args.photos), ("--masks", args.masks)):
        if "://" not in path and not Path(path).is_dir():
            raise SystemExit(f"bench quality: {flag} {path}: no such folder")
    cfg = get_config(args.preset, parse_override_args(args.overrides))          # fail fast on a bad override
    if args.sets < 1 or args.teachers < 1 or args.iterations < 1:
        raise SystemExit("bench quality: --sets, --teachers and --iterations must be at least 1")
    args.photos = args.photos if "://" in args.photos else str(Path(args.photos).resolve())
    args.masks = args.masks if "://" in args.masks else str(Path(args.masks).resolve())
    out = Path(args.out or f"runs/quality/recipe-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(args, out)
    t0 = time.perf_counter()
    resolution = args.resolution or cfg.model.resolution
    prep = recipe.run("preprocess", "preprocess",
                      ["--source", "folder", "--input", args.photos, "--resolution", str(resolution), "--crop", "resize",
                       "--out", str(recipe.data), "--quiet"], recipe.data / "_manifest.json")
    sets = [recipe.one_set(k) for k in range(args.sets)]
    names = [f"set{k + 1}" for k in range(args.sets)]
    evaluate = recipe.run("evaluate", "evaluate",
                          ["--data", args.photos, "--masks", args.masks,
                           *[a for n, s in zip(names, sets) for a in ("--pred", f"{n}={s['segmentation']}")],
                           "--out", str(out / "eval"), "--tracking-uri", recipe.tracking, "--quiet"],
                          out / "eval" / "metrics.json")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    students, baselines = _evaluate_rows(metrics, names)
    rows = [{"method": m, "iou": _stat([r["iou"] for r in rs]), "dice": _stat([r["dice"] for r in rs])}
            for m, rs in students.items()]
    rows += [{"method": m, "iou": _stat([row["iou"]]), "dice": _stat([row["dice"]])} for m, row in baselines.items()]
    wins = metrics.get("wins_vs_grabcut", {})
    per_photo = {label: _stat([100 * wins[f"{n}{suffix}"]["share"] for n in names])
                 for suffix, label in STUDENT_ROWS if all(f"{n}{suffix}" in wins for n in names)}
    minutes = {"preprocess": prep / 60, "evaluate": evaluate / 60,
               "train (each set)": _stat([sum(s["train_seconds"]) / 60 for s in sets]),
               "train (each teacher)": _stat([t / 60 for s in sets for t in s["train_seconds"]]),
               "distill": _stat([s["distill_seconds"] / 60 for s in sets]),
               "segment": _stat([s["segment_seconds"] / 60 for s in sets]),
               "recipe (each set, all five commands)": _stat(
                   [(prep + sum(s["train_seconds"]) + s["distill_seconds"] + s["segment_seconds"]) / 60
                    + evaluate / 60 / len(sets) for s in sets])}
    result = {"recipe": "photos", "preset": args.preset, "photos": args.photos, "overrides": args.overrides,
              "sets": [{"name": n, **s} for n, s in zip(names, sets)], "teachers": args.teachers,
              "iterations": args.iterations, "resolution": resolution, "rows": rows, "minutes": minutes,
              "beats_grabcut_per_photo": per_photo, "by_subject_size": metrics.get("by_subject_size", []),
              "images": metrics["coverage"].get("evaluated (covered by every method)"),
              "scored_at": metrics.get("scored_at"), "cpu": _cpu_name(), "cores": os.cpu_count(),
              "wall_seconds": time.perf_counter() - t0, "steps": recipe.steps, "command": " ".join(sys.argv)}
    (out / "recipe.json").write_text(json.dumps(result, indent=2))
    print(format_result(result, _cell))
    print(f"json: {out / 'recipe.json'}   report: {out / 'eval' / 'report.html'}   commands: {recipe.steps_file}")
    return result


def format_result(r: dict, cell) -> str:
    from pipelines.lib.evaluation_output import format_subject_sizes
    m = r["minutes"]
    lines = [f"quality: the photo recipe ({r['preset']} {' '.join(r['overrides'])}".rstrip()
             + f", {len(r['sets'])} set(s) of {r['teachers']} teachers × {r['iterations']} EM iterations, "
             f"{r['resolution']}²) on {r['photos']}",
             f"  {r['images']} photos scored at their {r['scored_at']}; {r['cpu']}, {r['cores']} cores",
             f"{'method':<52}{'IoU':>14}{'Dice':>14}"]
    lines += [f"{row['method']:<52}{cell(row['iou']):>14}{cell(row['dice']):>14}" for row in r["rows"]]
    lines += [f"{m:<52}{cell(share):>14}  % of the photos better than GrabCut"
              for m, share in r["beats_grabcut_per_photo"].items()]
    sizes = format_subject_sizes(r["by_subject_size"])
    if sizes:
        lines += ["", sizes]
    lines.append(f"minutes: preprocess {m['preprocess']:.1f}; each set: train {cell(m['train (each set)'])} "
                 f"({cell(m['train (each teacher)'])} a teacher), distill {cell(m['distill'])}, segment "
                 f"{cell(m['segment'])}; evaluate (all sets) {m['evaluate']:.1f}; the recipe for one set "
                 f"{cell(m['recipe (each set, all five commands)'])}")
    return "\n".join(lines)
