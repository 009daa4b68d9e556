"""Run a module as `python -m MODULE ARGS…` would, then write this process's peak resident memory
(VmHWM: the high-water mark, so nothing has to sample it) to a JSON file at exit — how the scale
benchmark measures a stage's driver.

    python -m pipelines.bench.peak OUT.json pipelines.segment --model … --input …
"""
from __future__ import annotations

import atexit
import json
import runpy
import sys
import time


def memory(pid: int | str = "self", field: str = "VmHWM") -> int:
    """A process's memory figure from /proc/PID/status in bytes (0 when it is gone): VmHWM, its
    peak resident memory; VmRSS, its resident memory now."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return 0


def high_water_mark(pid: int | str = "self") -> int:
    """Peak resident bytes of a process (0 when it is gone)."""
    return memory(pid, "VmHWM")


def main() -> None:
    out, module, *args = sys.argv[1:]
    t0 = time.perf_counter()

    def report() -> None:
        with open(out, "w") as f:
            json.dump({"peak_rss_bytes": high_water_mark(), "seconds": time.perf_counter() - t0}, f)
    atexit.register(report)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
