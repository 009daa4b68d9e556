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

ITERATIONS = 250


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
    base = trivial_baselines(test_masks)
    print(json.dumps({"before": before, "after": after, "train_chains": on_train, "baselines": base}))
    assert np.isfinite([h["gen_loss"] for h in state.history]).all()
    assert state.history[-1]["chains_reset"] == 0
    # measured on the 2-core dev machine: before 16.1, after 24.4, train chains 26.1, all-foreground
    # 20.1, best centred disc 31.0 — it learns, but does not yet beat the centred disc (issue 2 note)
    assert after["iou"] > before["iou"] + 5.0
    assert after["iou"] > base["all_foreground"]["iou"] + 2.5
    assert on_train["iou"] > base["all_foreground"]["iou"] + 2.5
    # π_f ranks sprite pixels above texture pixels far better than at initialisation (measured:
    # π_f on sprites − π_f on texture −0.01 → +0.12; best-threshold IoU 19.0 → 33.0 against
    # all-foreground 20.1), but on texture that neither expert reconstructs π_f stays just above ½,
    # so the π_f > ½ mask over-segments (README, "What limits learning on CPU"; issue 2 open)
    assert after["pi_fg"] - after["pi_bg"] > before["pi_fg"] - before["pi_bg"] + 0.05
    assert after["best_threshold_iou"] > max(before["best_threshold_iou"], base["all_foreground"]["iou"]) + 5.0
