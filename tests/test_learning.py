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
    # measured (cpu-32 preset, issue 2), same settings, runs differing only in float kernels: IoU at
    # π_f > ½ 18.7 → 32.6 (dev machine, alone), 31.2 (full CI suite), 31.1 (channels-last weights),
    # 29.0 (our InstanceNorm2d; best-threshold 59.4, training chains 32.8). All-foreground 20.1; the
    # best centred disc (picked with the ground truth from eight sizes) 31.0. Clearly above
    # all-foreground, but against the disc the ½-threshold IoU is a coin toss: π_f on texture settles
    # at 0.50–0.51 (the experts split the texture by shade; README, "Learning on CPU"), so where ½ cuts
    # it moves this number by ±2 from run to run. Asserted: the margins that held in every run.
    assert after["iou"] > before["iou"] + 8.0
    assert after["iou"] > base["all_foreground"]["iou"] + 6.0
    assert on_train["iou"] > base_train["all_foreground"]["iou"] + 6.0
    assert after["recon_l1"] < before["recon_l1"] - 0.05      # measured 0.568 → 0.474
    # π_f ranks sprite pixels far above texture pixels (0.84 vs 0.49–0.51, best-threshold IoU 57.5–59.7):
    # that ranking is what is clearly above the disc
    assert after["pi_fg"] - after["pi_bg"] > 0.25
    assert after["best_threshold_iou"] > base["centre_ellipse"]["iou"] + 20.0
