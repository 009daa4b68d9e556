import pytest
import torch

from drc_core.presets import get_config


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def tiny_config():
    """cpu-32 narrowed further so model tests run in milliseconds."""
    return get_config("cpu-32", {"model.fg_dim": 8, "model.reassign_dim": 8, "model.trunk_channels": 8,
                                 "model.up_widths": (8, 8, 8), "model.classifier_widths": (4, 4, 4),
                                 "model.ebm_hidden": 16, "model.ebm_reassign_hidden": 16,
                                 "langevin.posterior_steps": 2, "langevin.prior_steps": 2,
                                 "langevin.prior_pool_size": 16, "optim.batch_size": 4})


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session: 2 CPUs, small object store, the dashboard on
    127.0.0.1: Ray Train's PlacementGroupCleaner needs its State API to free the placement group
    of a trainer whose controller was killed (a trial ASHA stopped); without it the group's CPUs
    stay reserved and the next trials wait forever."""
    import os
    for k, v in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                 "RAY_DEDUP_LOGS": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}.items():
        os.environ.setdefault(k, v)
    import ray
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", object_store_memory=300 * 1024 ** 2,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
