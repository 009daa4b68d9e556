"""Every stage as the corpus grows: time, images/s and memory per process, and kill-and-resume drills.

    python -m pipelines.bench scale --images 10000 100000 1000000 [--skip train:1000000] [--drill 100000]

For each size N it writes (once, cached under --cache) an image folder of N 32² TM-dSprites photos
with their masks, in folders of 1,000 files (train/ 90 %, test/ 10 %; the scenes are drawn from a
pool of 10,000 renders, so writing 10⁶ files costs minutes, not hours of rendering), starts one Ray
cluster (`ray start`, --cpus CPUs) and runs, each as its own `python -m pipelines.<stage>` joining
it, exactly what a user runs:

    preprocess --source folder --input images/ --masks masks/ --resolution 32 --crop resize
    train --preset cpu-32 --workers 2, --train-iterations with one checkpoint, then --resume to
          twice as many (a second checkpoint and one restore)
    segment the image folder with a student distilled once from the smallest size's model
    evaluate --data images/ --masks masks/ (GrabCut on its default sample)

and prints per stage and size: wall seconds, images/s, the driver's peak RSS (VmHWM, written by
pipelines/bench/peak.py at exit), the largest Ray worker's peak RSS and the object store's peak
(sampled every 0.5 s / 2 s), bytes written; for train, seconds per EM iteration and per worker the
checkpoint write, the restore time and the bytes each rank read. Then the growth between the
smallest and largest size of each (driver bytes per image, images/s ratio), the targets of
docs/scale.md with pass/fail, and a projection to --project images on --nodes nodes from the
measured slopes. `--drill N`: at size N, SIGKILL preprocess and segment half-way, rerun with
--resume, and check that every input is there exactly once, the share the resumed run processed,
and that its output equals the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from pipelines.bench.cluster import LocalCluster
from pipelines.bench.common import cpu_name
from pipelines.bench.peak import high_water_mark, memory
from pipelines.bench.scale_corpus import corpus
from pipelines.bench.scale_report import format_result, growth, projection



def add_parser(sub) -> None:
    s = sub.add_parser("scale", help="every stage's time and memory per process from 10⁴ to 10⁶ images; "
                                     "kill-and-resume drills")
    s.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    s.add_argument("--stages", default="preprocess,train,segment,evaluate")
    s.add_argument("--skip", action="append", default=[], metavar="STAGE:N",
                   help="leave out one stage at one size (its cost per image makes it hours on this machine)")
    s.add_argument("--drill", type=int, default=100_000, help="kill-and-resume drills at this size (0: none)")
    s.add_argument("--cpus", type=int, default=2, help="CPUs of the benchmark's Ray cluster")
    s.add_argument("--train-iterations", type=int, default=20)
    s.add_argument("--out", default="runs/bench/scale")
    s.add_argument("--cache", default="runs/bench/cache", help="where the image folders are written once")
    s.add_argument("--project", type=int, default=10_000_000, help="projection: images")
    s.add_argument("--nodes", type=int, default=64, help="projection: nodes")
    s.set_defaults(run=run)


# ---- measuring one stage -------------------------------------------------------------------------
class Sampler(threading.Thread):
    """The largest peak RSS of any Ray worker process of the cluster, and the object store's peak."""

    def __init__(self, cluster: LocalCluster):
        super().__init__(daemon=True)
        self.cluster, self.stop_event = cluster, threading.Event()
        self.worker_peak, self.store_peak, self.spilled = 0, None, 0
        # which task the largest resident worker was running when sampled (a worker's high-water mark
        # spans its whole life, and Ray reuses task workers across tasks)
        self.worker_rss, self.worker_task = 0, None

    def _store(self) -> tuple[int, int] | None:
        try:
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address
            reply = get_memory_info_reply(get_state_from_address(self.cluster.address), timeout_seconds=10)
            return reply.store_stats.object_store_bytes_used, reply.store_stats.spilled_bytes_total
        except Exception:                      # an internal API that may change: the column says n/a
            return None

    def run(self) -> None:
        last_store = 0.0
        while not self.stop_event.is_set():
            for pid, title in self.cluster.worker_processes().items():
                self.worker_peak = max(self.worker_peak, high_water_mark(pid))
                rss = memory(pid, "VmRSS")
                if rss > self.worker_rss:
                    self.worker_rss, self.worker_task = rss, title
            if time.monotonic() - last_store > 2:
                last_store = time.monotonic()
                got = self._store()
                if got is not None:
                    self.store_peak = max(self.store_peak or 0, got[0])
                    self.spilled = max(self.spilled, got[1])
            self.stop_event.wait(0.5)

    def finish(self) -> dict:
        self.stop_event.set()
        self.join()
        return {"worker_peak": self.worker_peak, "store_peak": self.store_peak, "spilled": self.spilled,
                "worker_rss": self.worker_rss, "worker_task": self.worker_task}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def run_stage(cluster: LocalCluster, out: Path, name: str, module: str, argv: list[str],
              kill_when=None) -> dict:
    """One `python -m module argv` joining the cluster, measured. `kill_when()`: polled every 0.5 s;
    when it returns True the driver is SIGKILLed (the drills)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    peak = out / "logs" / f"{name}.peak.json"
    peak.unlink(missing_ok=True)
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    sampler = Sampler(cluster)
    sampler.start()
    t0 = time.perf_counter()
    with open(out / "logs" / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.bench.peak", str(peak), module, *argv],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        killed, rss = False, []
        try:
            while proc.poll() is None:
                if kill_when is not None and not killed and kill_when():
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                rss.append((time.perf_counter() - t0, memory(proc.pid, "VmRSS")))
                time.sleep(0.5)
        finally:
            if proc.poll() is None:       # the benchmark is being stopped: the stage (its own session) too
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.perf_counter() - t0
    got = sampler.finish()
    text = (out / "logs" / f"{name}.log").read_text()
    if proc.returncode != 0 and not killed:
        raise RuntimeError(f"{name}: {module} exited with {proc.returncode}:\n{text[-3000:]}")
    driver = json.loads(peak.read_text())["peak_rss_bytes"] if peak.exists() else None
    return {"stage": name, "seconds": seconds, "driver_peak": driver, **got, "killed": killed,
            "driver_curve": driver_curve(rss, seconds)}


def driver_curve(samples: list[tuple[float, int]], seconds: float, points: int = 10) -> list[int]:
    """The driver's highest resident memory up to each tenth of the run's wall time (sampled every
    0.5 s): how it grows while the stage streams, where the peak alone also holds the end of the run
    (a report, the manifest)."""
    out, high, i = [], 0, 0
    for k in range(1, points + 1):
        while i < len(samples) and samples[i][0] <= seconds * k / points:
            high = max(high, samples[i][1])
            i += 1
        out.append(high)
    return out


# ---- the stages ----------------------------------------------------------------------------------
def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _train(cluster, out: Path, data: str, n: int, iterations: int, mlflow: str) -> dict:
    name = f"scale-{n}"
    common = ["--data", data, "--preset", "cpu-32", "--workers", "2", "--cpus-per-worker", "1",
              "--checkpoint-every", str(iterations), "--eval-every", "0", "--grid-every", "0", "--no-model",
              "--quiet", "--storage", str(out / "ray"), "--tracking-uri", mlflow, "--max-failures", "0"]
    first = run_stage(cluster, out, f"train-{n}", "pipelines.train",
                      [*common, "--name", name, "--iterations", str(iterations)])
    second = run_stage(cluster, out, f"train-resume-{n}", "pipelines.train",
                       [*common, "--resume", name, "--iterations", str(2 * iterations)])
    events = _events(out / "ray" / name)
    ckpts = [e for e in events if e["event"] == "checkpointed"]
    restored = [e for e in events if e["event"] == "restored"]
    rows = max(e["rows"] for e in ckpts)
    return {**first, "seconds": first["seconds"] + second["seconds"],
            "driver_peak": max(first["driver_peak"] or 0, second["driver_peak"] or 0),
            "worker_peak": max(first["worker_peak"], second["worker_peak"]),
            "store_peak": max(first["store_peak"] or 0, second["store_peak"] or 0) or None,
            # both runs' timed iterations (each run leaves its first two out): one run's first
            # iterations after loading a large shard vary more than the corpus size moves them
            "s_per_iteration": float(np.mean([e["s_per_iteration"] for e in ckpts])),
            "s_per_iteration_runs": [float(np.mean([e["s_per_iteration"] for e in ckpts if e["iteration"] == k]))
                                     for k in (iterations, 2 * iterations)],
            "shard_rows": rows,
            "checkpoint_s": {e["rank"]: round(e["seconds"], 3) for e in ckpts if e["iteration"] == iterations},
            "checkpoint_chain_bytes": {e["rank"]: e["chain_bytes"] for e in ckpts if e["iteration"] == iterations},
            "second_checkpoint_chain_bytes": {e["rank"]: e["chain_bytes"] for e in ckpts
                                              if e["iteration"] == 2 * iterations},
            "restore_s": {e["rank"]: round(e["seconds"], 3) for e in restored},
            "restore_bytes": {e["rank"]: e["bytes_read"] for e in restored},
            "bytes": du(out / "ray" / name), "images_per_s": None}


def _distill(out: Path, n: int, mlflow: str) -> str:
    student = out / "student" / "student.pt"
    if student.exists():
        return str(student)
    ckpt = sorted(p for p in (out / "ray" / f"scale-{n}").glob("checkpoint_0*") if p.is_dir())[-1]
    subprocess.run([sys.executable, "-m", "pipelines.distill", "--teacher", str(ckpt), "--data",
                    str(out / f"data-{n}"), "--steps", "300", "--out", str(out / "student"), "--no-model", "--quiet",
                    "--tracking-uri", mlflow], check=True, capture_output=True, env={**os.environ, "RAY_ADDRESS": ""})
    return str(student)


def _segment_argv(student: str, images: str, output: str) -> list[str]:
    return ["--model", student, "--input", images, "--output", output, "--refine", "off", "--actors", "2",
            "--batch-size", "128", "--rows-per-file", "5000", "--quiet"]


def written_rows(folder: Path) -> int:
    """Rows in the complete Parquet files of a stage's staging folder (what a kill would keep)."""
    import pyarrow.parquet as pq
    total = 0
    for p in folder.glob("part-*.parquet"):
        try:
            total += pq.ParquetFile(p).metadata.num_rows
        except Exception:
            pass
    return total


def _staging(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def drill_segment(cluster, out: Path, n: int, student: str, images: str) -> dict:
    """SIGKILL segment once half the rows are written, --resume, compare with the uninterrupted run."""
    import shutil
    target = out / f"drill-seg-{n}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(_staging(target), ignore_errors=True)
    argv = _segment_argv(student, images, str(target))
    killed = run_stage(cluster, out, f"drill-segment-kill-{n}", "pipelines.segment", argv,
                       kill_when=lambda: written_rows(_staging(target)) >= n // 2)
    kept = written_rows(_staging(target))
    resumed = run_stage(cluster, out, f"drill-segment-resume-{n}", "pipelines.segment", [*argv, "--resume"])
    manifest = json.loads((target / "_manifest.json").read_text())
    check = _same_segmentation(target, out / f"seg-{n}", n)
    return {"stage": "segment drill", "n": n, "killed": killed["killed"], "rows_kept": kept,
            "resumed_processed": manifest["run"]["inputs_processed"] if "run" in manifest else None,
            "resume_seconds": resumed["seconds"], **check}


def _same_segmentation(a: Path, b: Path, n: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(folder: Path) -> pa.Table:
        t = pa.concat_tables([pq.read_table(p, columns=["sample_id", "key", "mask", "prob"])
                              for p in sorted(folder.glob("part-*.parquet"))])
        return t.sort_by("sample_id")
    ta, tb = table(a), table(b)
    ids = ta["sample_id"].to_numpy()
    return {"rows": ta.num_rows, "unique_ids": int(len(np.unique(ids))), "every_input_once": bool(
        ta.num_rows == n and len(np.unique(ids)) == n),
            "identical_to_uninterrupted": bool(ta.num_rows == tb.num_rows and ta.equals(tb))}


def drill_preprocess(cluster, out: Path, n: int, root: Path) -> dict:
    """SIGKILL preprocess once half its parts are written, --resume, compare with the uninterrupted run."""
    import shutil
    target = out / f"drill-data-{n}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(_staging(target), ignore_errors=True)
    argv = _preprocess_argv(root, str(target))
    killed = run_stage(cluster, out, f"drill-preprocess-kill-{n}", "pipelines.preprocess", argv,
                       kill_when=lambda: written_rows(_staging(target)) >= n // 2)
    kept = written_rows(_staging(target))
    resumed = run_stage(cluster, out, f"drill-preprocess-resume-{n}", "pipelines.preprocess", [*argv, "--resume"])
    mine, theirs = (json.loads((d / "_manifest.json").read_text()) for d in (target, out / f"data-{n}"))
    same = mine["sample_id_checksum"] == theirs["sample_id_checksum"] and _image_digest(target) == _image_digest(
        out / f"data-{n}")
    return {"stage": "preprocess drill", "n": n, "killed": killed["killed"], "rows_kept": kept,
            "resumed_processed": mine["run"]["inputs_processed"] if "run" in mine else None,
            "resume_seconds": resumed["seconds"], "rows": mine["counts"]["ok"],
            "every_input_once": mine["counts"]["ok"] == n and mine["parts"][-1]["id_max"] == n - 1,
            "identical_to_uninterrupted": bool(same)}


def _image_digest(folder: Path) -> str:
    import hashlib

    import pyarrow.parquet as pq
    h = hashlib.sha256()
    manifest = json.loads((folder / "_manifest.json").read_text())
    for part in manifest["parts"]:
        t = pq.read_table(folder / part["name"], columns=["sample_id", "image", "mask"])
        for col in ("sample_id", "image", "mask"):
            for chunk in t[col].chunks:
                for buf in chunk.buffers():
                    if buf is not None:
                        h.update(buf)
    return h.hexdigest()


def _preprocess_argv(root: Path, output: str) -> list[str]:
    return ["--source", "folder", "--input", str(root / "images"), "--masks", str(root / "masks"),
            "--resolution", "32", "--crop", "resize", "--out", output, "--quiet"]


# ---- the run -------------------------------------------------------------------------------------
def run(args) -> dict:
    import shutil

    import ray
    out, cache = Path(args.out).resolve(), Path(args.cache).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    skip = {tuple(s.split(":")) for s in args.skip}
    mlflow = f"sqlite:///{out / 'mlflow.db'}"
    rows, drills = [], []
    with LocalCluster(head_cpus=args.cpus, object_store_mb=1024) as cluster:
        ray.init(address=cluster.address, log_to_driver=False)
        roots = {}
        for n in sorted(args.images):
            t0 = time.perf_counter()
            roots[n] = corpus(n, cache)
            print(f"corpus of {n} photos: {roots[n]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        ray.shutdown()
        student = None
        for n in sorted(args.images):
            root = roots[n]
            for name in ("data", "seg", "eval"):          # and the staging of a run that was stopped
                for folder in (f"{name}-{n}", f".{name}-{n}.partial"):
                    shutil.rmtree(out / folder, ignore_errors=True)
            shutil.rmtree(out / "ray" / f"scale-{n}", ignore_errors=True)
            for stage in stages:
                if (stage, str(n)) in skip:
                    print(f"{stage} at {n}: skipped (--skip)", flush=True)
                    continue
                if stage == "preprocess":
                    r = run_stage(cluster, out, f"preprocess-{n}", "pipelines.preprocess",
                                  _preprocess_argv(root, str(out / f"data-{n}")))
                    r["bytes"] = du(out / f"data-{n}")
                elif stage == "train":
                    r = _train(cluster, out, str(out / f"data-{n}"), n, args.train_iterations, mlflow)
                elif stage == "segment":
                    student = student or _distill(out, min(args.images), mlflow)
                    r = run_stage(cluster, out, f"segment-{n}", "pipelines.segment",
                                  _segment_argv(student, str(root / "images"), str(out / f"seg-{n}")))
                    r["bytes"] = du(out / f"seg-{n}")
                else:
                    r = run_stage(cluster, out, f"evaluate-{n}", "pipelines.evaluate",
                                  ["--data", str(root / "images"), "--masks", str(root / "masks"), "--pred",
                                   f"student={out / f'seg-{n}'}", "--out", str(out / f"eval-{n}"), "--quiet",
                                   "--tracking-uri", mlflow])
                    r["bytes"] = du(out / f"eval-{n}")
                r.update(stage=stage, images=n)
                if r.get("images_per_s", 0) is not None:
                    r["images_per_s"] = n / r["seconds"]
                rows.append(r)
                print(json.dumps(r), flush=True)
                (out / "scale.json").write_text(json.dumps({"rows": rows, "drills": drills}, indent=1))
            if n == args.drill:
                if "preprocess" in stages:
                    drills.append(drill_preprocess(cluster, out, n, root))
                    print(json.dumps(drills[-1]), flush=True)
                if "segment" in stages and student:
                    drills.append(drill_segment(cluster, out, n, student, str(root / "images")))
                    print(json.dumps(drills[-1]), flush=True)
        result = {"cpu": cpu_name(), "cpus": args.cpus, "rows": rows, "drills": drills,
                  "growth": growth(rows), "command": " ".join(sys.argv)}
        result["projection"] = projection(result, args.project, args.nodes, args.cpus)
        result["projected"] = {"images": args.project, "nodes": args.nodes, "cpus_per_node": args.cpus}
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    print(format_result(result))
    return result
