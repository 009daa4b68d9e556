"""Behavioural test: a tiny real DRC run learns something (marked `learning`, runs in CI).

cpu-32 on 500 TM-dSprites-32 training images for a fixed number of EM iterations (so the result
does not depend on machine speed), then IoU/Dice of fresh-chain segmentation on 100 test images
and of the persistent chains on the training images, against trivial masks.
"""
import json

import numpy as np
import pytest
import torch

from drc_core.fit import fit
from drc_core.inference import decode, evaluate, images_to_tensor
from drc_core.metrics import mean_iou_dice, trivial_baselines
from drc_core.presets import get_config
from drc_core.tmds import render_many

ITERATIONS = 600


@pytest.mark.learning
@pytest.mark.slow
def test_cpu32_learns_to_separate_sprites_from_texture():
    cfg = get_config("cpu-32", {"data.train_size": 500})
    d = cfg.data
    train, train_masks = render_many("train", range(d.train_size), size=32, sprite_size=d.sprite_size)
    test, test_masks = render_many("test", range(100), size=32, sprite_size=d.sprite_size)
    before = evaluate(fit(cfg, train, iterations=0).model, test, test_masks, cfg)
    state = fit(cfg, train, iterations=ITERATIONS)
    after = evaluate(state.model, test, test_masks, cfg)
    chains = decode(state.model, images_to_tensor(train), state.chains.z)
    on_train = mean_iou_dice(chains.mask, torch.as_tensor(train_masks) > 0)
    base, base_train = trivial_baselines(test_masks), trivial_baselines(train_masks)
    print(json.dumps({"before": before, "after": after, "train_chains": on_train, "baselines": base,
                      "train_baselines": base_train}))
    assert np.isfinite([h["gen_loss"] for h in state.history]).all()
    assert state.history[-1]["chains_reset"] == 0
    # measured (cpu-32 preset, issue 2): IoU 18.7 → 32.6 on the dev machine run alone and → 31.2 in the
    # full CI suite (thread scheduling changes the float sums, and the result moves by ~1.5); 31.1 alone
    # after the generators' weights became channels-last (different conv kernels, same maths); the best
    # centred disc (picked with the ground truth from eight sizes) has 31.0, all-foreground 20.1.
    # So the ½-threshold IoU is at the best disc's level, not clearly above it (issue 2 stays open):
    # asserted as "within 2 points of it"; what is clearly above is the ranking (below)
    assert after["iou"] > before["iou"] + 8.0
    assert after["iou"] > base["all_foreground"]["iou"] + 8.0
    assert after["iou"] > base["centre_ellipse"]["iou"] - 2.0
    assert on_train["iou"] > base_train["centre_ellipse"]["iou"] - 2.0
    # π_f ranks sprite pixels far above texture pixels (0.84 vs 0.49-0.50, best-threshold IoU 58.8-59.7):
    # what keeps the ½-threshold IoU low is texture that the two experts split by shade, where π_f
    # sits at ½ (README, "Learning on CPU")
    assert after["pi_fg"] - after["pi_bg"] > 0.25
    assert after["best_threshold_iou"] > base["centre_ellipse"]["iou"] + 20.0
