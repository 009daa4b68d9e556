"""Placement-group drill, run in its own process by tests/test_ray_env.py (it needs a Ray
instance of its own while another one runs on the machine).

    python -m tests.pg_cleanup_drill WORKDIR

Starts a local instance the way pipelines.tune does (pipelines.lib.ray_env.init_ray, dashboard on),
runs a one-worker Ray Train job with 1 CPU inside an actor (as a Tune trial does), kills the
actor once the worker runs (as Tune does to a trial ASHA stops: the controller dies with its
owner), and prints one JSON line: whether and how fast the worker group's placement group was
freed, and how many Ray instances were running on the machine.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _loop(config: dict) -> None:
    import ray.train
    Path(config["marker"]).touch()
    for i in range(1200):
        time.sleep(0.5)
        ray.train.report({"i": i})


def main(workdir: str) -> None:
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}.items():
        os.environ.setdefault(k, v)
    import ray
    from ray._private.services import find_gcs_addresses

    from pipelines.lib.ray_env import init_ray
    init_ray(num_cpus=2, include_dashboard=True, log_to_driver=False)
    marker = Path(workdir) / "worker-started"

    @ray.remote(num_cpus=0)
    class Trial:
        def fit(self) -> None:
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer
            TorchTrainer(_loop, train_loop_config={"marker": str(marker)},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name="drill", storage_path=str(Path(workdir) / "ray"))).fit()

    trial = Trial.remote()
    running = trial.fit.remote()
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    out: dict = {"worker_started": marker.exists(), "ray_instances": len(find_gcs_addresses()),
                 "api_server": os.environ.get("RAY_API_SERVER_ADDRESS")}
    groups = [k for k, v in ray.util.placement_group_table().items()
              if v["state"] == "CREATED" and v["bundles"][0].get("CPU") == 1.0]
    out["worker_groups"] = len(groups)
    ray.kill(trial)
    t0 = time.monotonic()
    state = None
    while time.monotonic() - t0 < 60:
        state = {k: ray.util.placement_group_table().get(k, {}).get("state") for k in groups}
        if all(s == "REMOVED" for s in state.values()):
            break
        time.sleep(0.2)
    out.update(states=state, freed_after_s=round(time.monotonic() - t0, 1))
    while ray.available_resources().get("CPU", 0.0) < 2 and time.monotonic() - t0 < 70:
        time.sleep(0.2)                        # the resource view follows the removal shortly
    out["cpus_free"] = ray.available_resources().get("CPU", 0.0)
    del running
    print("DRILL " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
