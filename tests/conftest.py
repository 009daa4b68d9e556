import pytest
import torch

from drc_core.presets import get_config


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg():
    """cpu-32 narrowed further so model tests run in milliseconds."""
    return get_config("cpu-32", {"model.fg_dim": 8, "model.reassign_dim": 8, "model.trunk_channels": 8,
                                 "model.up_widths": (8, 8, 8), "model.classifier_widths": (4, 4, 4),
                                 "model.ebm_hidden": 16, "model.ebm_reassign_hidden": 16,
                                 "langevin.posterior_steps": 2, "langevin.prior_steps": 2,
                                 "langevin.prior_pool_size": 16, "optim.batch_size": 4})
