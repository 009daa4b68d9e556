"""The entrypoint of test_scale's `ray job submit` job: on a cluster of separate raylets, a corpus
of photos written to object storage by Ray tasks, then preprocess → train → segment → evaluate as
a user runs them, every input and output on s3://. Prints one line `RESULT {json}`: what each
stage reported about where it ran.

    python -m tests.multinode_job --root s3://bucket/prefix --images 2000 --tracking-uri URI
"""
from __future__ import annotations

import argparse
import io
import json

import numpy as np


def _write_photos(root: str, lo: int, hi: int, train: int) -> str:
    import ray
    from PIL import Image

    from drc_core.tmds import render
    from pipelines.lib import locations
    for i in range(lo, hi):
        split = "train" if i < train else "test"
        s = render(split, i, size=32, sprite_size=(0.25, 0.45))
        for sub, arr in (("photos", s.image), ("masks", (s.fg > 0).astype(np.uint8) * 255)):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            locations.write_bytes(locations.join(root, sub, split, f"{i // 250:03d}", f"{i:06d}.png"), buf.getvalue())
    return ray.get_runtime_context().get_node_id()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--tracking-uri", required=True)
    args = p.parse_args()
    import ray

    from pipelines import evaluate, preprocess, segment, train
    from pipelines.lib import checkpoints as ckpt
    from pipelines.lib import locations
    from pipelines.lib.ray_env import init_ray
    import time
    init_ray()                                   # the job's cluster (RAY_ADDRESS)
    seconds, t0 = {}, time.perf_counter()
    workers = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    root = args.root.rstrip("/")
    n, n_train = args.images, int(args.images * 0.9)
    write = ray.remote(num_cpus=1)(_write_photos)
    chunk = -(-n // 8)                           # 8 tasks for the two one-CPU nodes
    corpus_nodes = ray.get([write.remote(root, lo, min(n, lo + chunk), n_train) for lo in range(0, n, chunk)])
    seconds["corpus"], t0 = time.perf_counter() - t0, time.perf_counter()

    data = f"{root}/data"
    rows = str(max(16, n // 4))                  # 4 parts at least: each node gets some
    pre = preprocess.main(["--source", "folder", "--input", f"{root}/photos", "--masks", f"{root}/masks",
                           "--resolution", "32", "--crop", "resize", "--rows-per-file", rows, "--out", data,
                           "--quiet"])
    seconds["preprocess"], t0 = time.perf_counter() - t0, time.perf_counter()
    tr = train.main(["--data", data, "--preset", "cpu-32", "--workers", "2", "--iterations", "4",
                     "--checkpoint-every", "2", "--eval-every", "0", "--grid-every", "0", "--no-model", "--quiet",
                     "--storage", f"{root}/runs", "--name", "multinode", "--tracking-uri", args.tracking_uri,
                     "optim.batch_size=16", "langevin.prior_pool_size=64"])
    _, records = ckpt.records(tr["checkpoint"])
    seconds["train"], t0 = time.perf_counter() - t0, time.perf_counter()
    seg = segment.main(["--model", tr["checkpoint"], "--input", f"{root}/photos", "--output", f"{root}/seg",
                        "--steps", "2", "--actors", "2", "--batch-size", "64", "--rows-per-file", "64",
                        "--quiet"])
    seconds["segment"], t0 = time.perf_counter() - t0, time.perf_counter()
    ev = evaluate.main(["--data", f"{root}/photos", "--masks", f"{root}/masks", "--pred", f"drc={root}/seg",
                        "--out", f"{root}/eval", "--quiet", "--tracking-uri", args.tracking_uri,
                        "--baseline-images", "200"])
    seconds["evaluate"] = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "workers": workers, "corpus_nodes": sorted(set(corpus_nodes)),
        "preprocess": {"nodes": pre["nodes"], "ok": pre["counts"]["ok"]},
        "train": {"nodes": [r["node"] for r in records], "checkpoint": tr["checkpoint"]},
        "segment": {"nodes": seg["nodes"], "ok": seg["counts"]["ok"]},
        "evaluate": {"nodes": ev["nodes"], "report": ev["report"],
                     "evaluated": ev["coverage"]["evaluated (covered by every method)"]},
        "outputs": {k: locations.exists(f"{root}/{k}/_manifest.json") for k in ("data", "seg")},
    }), flush=True)


if __name__ == "__main__":
    main()
