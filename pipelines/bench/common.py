"""What the benchmarks share: the CPU's name, peak memory of a run, mean ± half-spread cells."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np


def peak_rss_mb(include_ray_workers: bool) -> float:
    """High-water resident memory (VmHWM) of this process, plus that of every Ray worker process
    (a command line starting `ray::`) when asked: read once at the end, so nothing samples while the
    benchmark runs. The sum over processes is an upper bound on their simultaneous peak."""
    from pipelines.bench.cluster import ray_workers
    from pipelines.bench.peak import high_water_mark
    total = high_water_mark()
    if include_ray_workers:
        total += sum(high_water_mark(pid) for pid in ray_workers())
    return total / 2 ** 20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



def stat(values) -> dict:
    v = np.asarray([x for x in values if x is not None], float)
    return {"mean": float(v.mean()), "spread": float(v.max() - v.min()), "values": v.tolist()} if v.size else {}



def cell(s: dict, digits: int = 1) -> str:
    if not s:
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['spread'] / 2:.{digits}f}" if len(s["values"]) > 1 else f"{s['mean']:.{digits}f}"
