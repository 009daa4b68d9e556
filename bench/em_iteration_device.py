"""Seconds per EM iteration and peak memory of presets on a device (CUDA or CPU), optionally with a
torch.profiler table of the most expensive kernels. Run on a GPU node before sizing a cluster:

    python bench/em_iteration_device.py --device cuda --presets paper-birds:48 paper-tmds:8 [--profile]

Feed the measured rate to the plan: TFLOP per iteration (pipelines.plan) / seconds per iteration
= --device-tflops with --utilisation 1. Measured on one H100 (2026-11-26): paper-birds:48 5.13 s,
paper-tmds:8 0.82 s, paper-tmds:48 5.10 s; 77 % of the birds iteration in bilinear upsampling.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from drc_core.config import parse_override_args  # noqa: E402
from drc_core.fit import TrainState  # noqa: E402
from drc_core.presets import get_config  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_preset(preset: str, batch: int, device: str, iterations: int, overrides: dict, profile: bool) -> dict:
    cfg = get_config(preset, {**overrides, "optim.batch_size": batch})
    size = cfg.model.resolution
    state = TrainState.create(cfg, 2 * batch, device=device)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    ids = torch.arange(batch)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    state.step(x, ids)                                         # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        state.step(x, ids)
    _sync(device)
    out = {"preset": preset, "batch": batch, "device": device,
           "s_per_iter": (time.perf_counter() - start) / iterations,
           "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with prof(activities=acts) as p:
            state.step(x, ids)
            _sync(device)
        key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
        print(p.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=40), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", nargs="+", default=["paper-tmds:8", "paper-birds:48"], help="preset:batch")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--profile", action="store_true", help="also print a kernel table of one iteration")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to every preset")
    args = p.parse_args(argv)
    overrides = parse_override_args(args.overrides)
    for spec in args.presets:
        preset, _, batch = spec.partition(":")
        print(json.dumps(time_preset(preset, int(batch or 8), args.device, args.iterations, overrides,
                                     args.profile)), flush=True)


if __name__ == "__main__":
    main()
