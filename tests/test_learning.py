"""Behavioural test: a tiny real DRC run learns something (marked `learning`, runs in CI).

cpu-32 on 500 TM-dSprites-32 training images for a fixed number of EM iterations (so the result
does not depend on machine speed), then IoU/Dice of fresh-chain segmentation on 100 test images
and of the persistent chains on the training images, against trivial masks; then the student
distilled from that model as `pipelines.distill` does by default (chain + prior pairs, the default
policy's masks as targets), scored on the same test images.
"""
import json

import numpy as np
import pytest
import torch

from drc_core.amortized import StudentConfig, chain_pairs, distill, predict, prior_pairs, training_pairs
from drc_core.fit import fit
from drc_core.inference import decode, evaluate, images_to_tensor
from drc_core.metrics import mean_iou_dice, trivial_baselines
from drc_core.presets import get_config
from drc_core.threshold import DEFAULT
from drc_core.tmds import render_many

ITERATIONS = 250


@pytest.mark.learning
@pytest.mark.slow
def test_cpu32_learns_to_separate_sprites_from_texture():
    cfg = get_config("cpu-32", {"data.train_size": 500})
    d = cfg.data
    train, train_masks = render_many("train", range(d.train_size), size=32, sprite_size=d.sprite_size)
    test, test_masks = render_many("test", range(100), size=32, sprite_size=d.sprite_size)
    # 100 test steps (the preset's 300 cost CI three times as much and gain ~3 points: docs/quality.md)
    before = evaluate(fit(cfg, train, iterations=0).model, test, test_masks, cfg, steps=100)
    state = fit(cfg, train, iterations=ITERATIONS)
    after = evaluate(state.model, test, test_masks, cfg, steps=100)
    chains = decode(state.model, images_to_tensor(train), state.chains.z)
    on_train = mean_iou_dice(chains.mask, torch.as_tensor(train_masks) > 0)
    base, base_train = trivial_baselines(test_masks), trivial_baselines(train_masks)
    print(json.dumps({"before": before, "after": after, "train_chains": on_train, "baselines": base,
                      "train_baselines": base_train}))
    assert np.isfinite([h["gen_loss"] for h in state.history]).all()
    assert state.history[-1]["chains_reset"] == 0
    assert after["recon_l1"] < before["recon_l1"] - 0.05      # measured 0.568 → 0.474 (600 it.), 0.569 → 0.492 (250)
    # What the model earns under the default label-free threshold policy (Otsu per image; the labels
    # only score it): measured in docs/quality.md, 2 seeds of the preset reach 49–56 IoU on held-out
    # images by iteration 130–200 against a best centred disc of 31 and all-foreground of 20, with
    # a predicted area of 23–26 % against 20 % true.
    default = after["policies"][DEFAULT.name]
    assert default["iou"] >= base["centre_ellipse"]["iou"] + 10.0, default
    assert default["iou"] >= base["all_foreground"]["iou"] + 15.0, default
    # At the DRC protocol's π_f > ½ the texture tie (π_f ≈ ½ there: the experts split it by shade,
    # docs/quality.md) leaves the IoU near the best centred disc (28–33 across runs), so no IoU bar is
    # set at ½ (a disc would pass one); what held in every run is the ranking: π_f on sprite pixels
    # far above π_f on texture pixels.
    assert after["pi_fg"] - after["pi_bg"] > 0.25              # measured 0.82 − 0.52 at 250 iterations

    # The distilled student (one forward pass per image) earns at the DRC protocol's ½ what the
    # Langevin posterior earns only under the default policy: trained on the default policy's masks,
    # its π_f is near 0 or 1 and the texture tie is gone. Measured here (2026-12-03): student 70.9 at
    # ½ and 69.6 under the default policy; its teacher 31.6 at ½ and 55.3 under the default policy;
    # best centred disc 31.0; at 250 iterations (2026-12-06): student 70.8 at ½, 69.2 under the default
    # policy, teacher 29.6 / 56.6. 250 iterations, not 600: the default policy's curve is flat after
    # ~130 (docs/log/quality-log.md) and the test costs 2.4× less (852 s → 475 s beside a benchmark).
    # 400 student steps, not 1,500: from one 250-iteration teacher (2026-12-07, one torch thread) 400
    # steps gave 78.3 at ½ / 77.6 under the default policy, 700 gave 76.6 / 74.5, 1,500 gave 73.0 / 71.6
    # (from a 200-iteration teacher: 73.0, 71.6, 67.0 at ½), at 27 CPU-s instead of 97.
    pairs = [chain_pairs(state.model, train, state.chains.z),
             prior_pairs(state.model, cfg, 2000, generator=torch.Generator().manual_seed(1))]
    student = distill(training_pairs(pairs, DEFAULT, max_border=None), StudentConfig(resolution=32), steps=400)
    prob = predict(student, test)
    truth = torch.as_tensor(test_masks) > 0
    half, student_default = mean_iou_dice(prob > 0.5, truth), mean_iou_dice(DEFAULT.masks(prob), truth)
    print(json.dumps({"student_half": half, "student_default": student_default}))
    assert half["iou"] >= base["centre_ellipse"]["iou"] + 10.0, half
    assert half["iou"] >= after["iou"] + 10.0, (half, after)
    assert student_default["iou"] >= default["iou"] - 2.0, (student_default, default)
