"""Starting or joining Ray the same way from every entry point."""
from __future__ import annotations

import os
from pathlib import Path

# Quiet, fast defaults for local runs; a cluster's own environment wins (setdefault).
_DEFAULT_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "0",
}


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join `address` (or RAY_ADDRESS, as under `ray job submit`) or start a local instance
    whose dashboard binds to 127.0.0.1."""
    import ray

    for k, v in _DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return ray
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **kwargs)
    else:
        # workers of a local instance import drc_core/pipelines from this checkout wherever the
        # driver was started (under `ray job submit --working-dir` the working dir does this)
        root = str(Path(__file__).resolve().parent.parent)
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        ray.init(num_cpus=num_cpus, **kwargs)
    return ray
