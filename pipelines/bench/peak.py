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


def high_water_mark(pid: int | str = "self") -> int:
    """Peak resident bytes of a process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


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
