"""Ray Data preprocessing against a single-process loop; Ray Train with 1 and 2 workers."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from drc_core.fit import TrainState
from drc_core.presets import get_config
from pipelines.bench.common import peak_rss_mb
from pipelines.bench.core import _timeit


def preprocess(args) -> dict:
    """Ray Data (2 CPUs) against a plain single-process loop, same 2,000 images, same output."""
    import shutil
    import tempfile

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import preprocess as pp
    from pipelines.lib.ray_env import init_ray
    from pipelines.lib.sources import tm_dsprites

    records = tm_dsprites(args.images, 0)
    opt = pp.Options(source="tm-dsprites", size=args.size, sprite_size=(0.15, 0.30))
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        t0 = time.perf_counter()
        rows = [pp.process_record(r, opt) for r in records]
        frame = pd.DataFrame(rows).drop(columns=["status", "reason"])
        frame.insert(0, "sample_id", range(len(frame)))
        per = args.rows_per_file
        for k in range(0, len(frame), per):
            pq.write_table(pa.Table.from_pandas(frame.iloc[k:k + per], preserve_index=False),
                           work / f"loop-part-{k // per:05d}.parquet")
        t_loop = time.perf_counter() - t0
        loop_mb = peak_rss_mb(include_ray_workers=False)
        init_ray(num_cpus=2)
        import ray
        from pipelines.lib.ray_env import set_progress_bars
        set_progress_bars(ray.data.DataContext.get_current(), False)
        t0 = time.perf_counter()
        manifest = pp.run(records, opt, str(work / "ray"), rows_per_file=args.rows_per_file, progress=False)
        t_ray = time.perf_counter() - t0
        ray_mb = peak_rss_mb(include_ray_workers=True)
        assert manifest["counts"]["ok"] == len(records)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"images": len(records), "size": args.size,
           "loop_images_per_s": len(records) / t_loop, "ray_images_per_s": len(records) / t_ray,
           "speedup": t_loop / t_ray, "loop_peak_rss_mb": loop_mb,
           "ray_peak_rss_mb_upper_bound": ray_mb}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    print(f"Ray Data pipeline (2 CPUs) is {out['speedup']:.2f}× the single-process loop "
          f"({out['ray_images_per_s']:.1f} vs {out['loop_images_per_s']:.1f} images/s, {args.size}², "
          f"Ray start excluded); peak RSS ≤ {ray_mb:.0f} MB (driver + Ray workers) vs {loop_mb:.0f} MB")
    return out


def chain_buffer_cost(num_chains: int, dim: int, batch: int, repeat: int = 200) -> dict:
    """Seconds per iteration spent in the chain buffer (get + set of a batch) at a given size."""
    from drc_core.chains import InMemoryChainBuffer
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        buf = InMemoryChainBuffer.for_range(num_chains, dim, dtype=dtype)
        gen = torch.Generator().manual_seed(0)

        def get_set():
            ids = torch.randint(num_chains, (batch,), generator=gen).unique()
            buf.set(ids, buf.get(ids) + 0.01)
        out[f"{name}_seconds"] = _timeit(get_set, repeat, warmup=5)
        out[f"{name}_mb"] = buf.z.numel() * buf.z.element_size() / 2 ** 20
    return out


def _solo(preset: str, iterations: int, barrier, out) -> None:
    """One single-thread training process without Ray or communication (the hardware control)."""
    torch.set_num_threads(1)
    cfg = get_config(preset)
    b, r = cfg.optim.batch_size, cfg.model.resolution
    state = TrainState.create(cfg, b)
    x, ids = torch.rand(b, 3, r, r) * 2 - 1, torch.arange(b)
    state.step(x, ids)
    state.step(x, ids)
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(iterations):
        state.step(x, ids)
    out.put((time.perf_counter() - t0) / iterations)


def solo_processes(preset: str, iterations: int, n: int) -> float:
    """Mean seconds per iteration of n independent single-thread processes run side by side."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_solo, args=(preset, iterations, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    times = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return sum(times) / n


def train(args) -> dict:
    """pipelines.train with 1 and 2 workers (1 thread each, batch per worker fixed) in one run:
    seconds per iteration, weak-scaling efficiency, the chain buffer's share of the step time and
    the checkpoint write time; plus the chain buffer's cost at paper dimensions."""
    import shutil
    import tempfile
    import uuid

    from pipelines import preprocess as pp
    from pipelines.lib.ray_env import init_ray
    from pipelines.train import build_trainer
    from pipelines.lib.train_worker import TrainJob

    cfg = get_config(args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = []
    try:
        init_ray(num_cpus=2)
        data = str(work / "data")
        pp.main(["--source", "tm-dsprites", "--out", data, "--preset", args.preset,
                 "--train", str(args.images), "--test", "8"])
        for workers in args.workers:
            job = TrainJob(data=data, config=cfg.to_dict(), iterations=args.iterations,
                           checkpoint_every=args.iterations, eval_every=0, grid_every=0, threads=1)
            trainer = build_trainer(job, workers=workers, name=f"bench-{workers}-{uuid.uuid4().hex[:6]}",
                                    storage=str(work / "ray"), cpus_per_worker=1, max_failures=0)
            m = trainer.fit().metrics
            rows.append({"workers": workers, "s_per_iteration": m["mean_seconds"],
                         "images_per_s": workers * cfg.optim.batch_size / m["mean_seconds"],
                         "chain_share": m["chain_share"], "comm_share": m["comm_share"],
                         "checkpoint_write_s": m["checkpoint_write_seconds"],
                         "control_s_per_iteration": solo_processes(args.preset, args.iterations, workers)})
            print(json.dumps({k: round(v, 5) for k, v in rows[-1].items()}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    for r in rows:
        r["scaling_efficiency"] = base["s_per_iteration"] / r["s_per_iteration"]
        r["control_efficiency"] = base["control_s_per_iteration"] / r["control_s_per_iteration"]
    paper = get_config("paper-birds")
    cost = chain_buffer_cost(args.paper_chains, paper.model.latent_dim, paper.optim.batch_size)
    print(f"{args.preset}, batch {cfg.optim.batch_size} per worker, 1 thread per worker, {args.iterations} iterations:")
    for r in rows:
        print(f"  {r['workers']} worker(s): {r['s_per_iteration']:.3f} s/iteration, {r['images_per_s']:.1f} images/s, "
              f"weak-scaling efficiency {100 * r['scaling_efficiency']:.1f} %, chain buffer "
              f"{100 * r['chain_share']:.3f} % of the step, all-reduce (incl. waiting) "
              f"{100 * r['comm_share']:.1f} %, checkpoint write {r['checkpoint_write_s']:.3f} s")
        print(f"     control, {r['workers']} independent process(es) without Ray or communication: "
              f"{r['control_s_per_iteration']:.3f} s/iteration, efficiency {100 * r['control_efficiency']:.1f} %")
    print(f"chain buffer at paper-birds dims ({args.paper_chains} chains × {paper.model.latent_dim}, batch "
          f"{paper.optim.batch_size}): get+set {1e3 * cost['fp32_seconds']:.3f} ms/iteration fp32 "
          f"({cost['fp32_mb']:.0f} MB), {1e3 * cost['fp16_seconds']:.3f} ms fp16 ({cost['fp16_mb']:.0f} MB)")
    return {"rows": rows, "paper_chain_buffer": cost}


def add_parsers(sub) -> None:
    pre = sub.add_parser("preprocess", help="Ray Data preprocessing vs a single-process loop")
    pre.add_argument("--images", type=int, default=2000)
    pre.add_argument("--size", type=int, default=128)
    pre.add_argument("--rows-per-file", type=int, default=500)
    pre.set_defaults(run=preprocess)
    tr = sub.add_parser("train", help="pipelines.train: 1 vs 2 workers, chain buffer share")
    tr.add_argument("--preset", default="cpu-32")
    tr.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    tr.add_argument("--iterations", type=int, default=30)
    tr.add_argument("--images", type=int, default=512, help="TM-dSprites training images")
    tr.add_argument("--paper-chains", type=int, default=200_000, help="chains in the paper-dims buffer test")
    tr.set_defaults(run=train)
