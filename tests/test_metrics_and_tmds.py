import numpy as np
import pytest
import torch

from drc_core.metrics import centre_ellipse_masks, iou_dice, mean_iou_dice, separation, trivial_baselines
from drc_core.tmds import render, render_many, texture_bank


def test_iou_dice_known_values_and_empty_masks():
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    gt = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, :2], gt[0, 1:3] = True, True                    # 4 ∩, 12 ∪ → IoU 1/3, Dice 1/2
    gt[1, 0, 0] = True                                      # empty prediction
    iou, dice = iou_dice(pred, gt)                          # image 2: both empty
    torch.testing.assert_close(iou, torch.tensor([1 / 3, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(dice, torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    assert mean_iou_dice(pred, gt)["iou"] == pytest.approx(100 * (1 / 3 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="shape"):
        iou_dice(pred, gt[:, :3])


def test_separation_known_values():
    gt = torch.zeros(2, 2, 2, dtype=torch.bool)
    gt[0, 0] = True                                         # image 0: top row foreground
    prob = torch.tensor([[[0.9, 0.7], [0.2, 0.4]],          # fg mean 0.8, bg mean 0.3
                         [[0.6, 0.6], [0.6, 0.6]]])         # no foreground: counts for pi_bg only
    s = separation(prob, gt)
    assert s["pi_fg"] == pytest.approx(0.8)
    assert s["pi_bg"] == pytest.approx((0.3 + 0.6) / 2)
    # at 0.5 image 1 is all foreground (IoU 0); at 0.6 both images are exact
    assert mean_iou_dice(prob > 0.5, gt)["iou"] == pytest.approx(50.0)
    assert s["best_threshold_iou"] == pytest.approx(100.0)


def test_centre_ellipse_covers_the_requested_area():
    m = centre_ellipse_masks(1, 64, 0.25)
    assert abs(m.float().mean().item() - 0.25) < 0.02
    base = trivial_baselines(centre_ellipse_masks(1, 64, 0.2))
    assert base["centre_ellipse"]["iou"] == pytest.approx(100.0)


def test_texture_bank_matches_the_spec():
    kx, ky, phase = texture_bank(0)
    assert len(kx) == 20 and len(set(zip(kx, ky))) == 20
    assert sorted(set(kx)) == [-17, -6, -1, 4, 10]             # 21, 32, 37 aliased on period 38
    assert sorted(ky[kx == 10]) == [1, 5, 9, 13] and sorted(ky[kx == -1]) == [4, 8, 12, 16]
    assert np.array_equal(phase, texture_bank(0)[2]) and not np.array_equal(phase, texture_bank(1)[2])


@pytest.mark.parametrize("size, sprite_size", [(32, (0.25, 0.45)), (64, (0.15, 0.30)), (128, (0.15, 0.30))])
def test_render_is_a_pure_function_of_split_and_index(size, sprite_size):
    a = render("train", 7, size=size, sprite_size=sprite_size)
    b = render("train", 7, size=size, sprite_size=sprite_size)
    c = render("test", 7, size=size, sprite_size=sprite_size)
    assert a.image.tobytes() == b.image.tobytes() and a.fg.tobytes() == b.fg.tobytes()
    assert a.image.tobytes() != c.image.tobytes()
    assert a.image.shape == (size, size, 3) and a.image.dtype == np.uint8
    assert set(np.unique(a.fg)) <= {0, 1}


def test_rendered_scenes_follow_the_construction():
    imgs, fgs = render_many("train", range(40), size=64)
    for k in range(40):
        s = render("train", k, size=64)
        assert 2 <= s.num_sprites <= 3
        assert sorted(set(np.unique(s.instances)) - {0}) == list(range(1, s.num_sprites + 1))
        # background pixels far from any sprite are grey (R = G = B)
        far = ~_dilate_bool(s.fg > 0, 2)
        bgpix = s.image[far].astype(int)
        assert np.abs(bgpix[:, 0] - bgpix[:, 1]).max() == 0 and np.abs(bgpix[:, 1] - bgpix[:, 2]).max() == 0
        # sprites never touch: no two instance labels within 2 px of each other
        for i in range(1, s.num_sprites + 1):
            grown = _dilate_bool(s.instances == i, 2)
            assert not (grown & (s.instances > 0) & (s.instances != i)).any()
    area = fgs.mean()
    assert 0.04 < area < 0.25, area   # 2–3 sprites of 15–30 % side each


def _dilate_bool(mask, r):
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= r * r:
                shifted = np.zeros_like(mask)
                shifted[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
                    mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
                out |= shifted
    return out


def test_textures_are_seeded_greys_in_range_and_the_texture_fit_learns():
    from drc_core.tmds import textures
    from pipelines.bench.texture_fit import fit_textures, texture_images
    t = textures(64, size=32, seed=3)
    assert t.shape == (64, 32, 32) and t.min() >= 0 and t.max() <= 1 and t.std() > 0.2
    np.testing.assert_array_equal(t, textures(64, size=32, seed=3))
    assert not np.array_equal(t, textures(64, size=32, seed=4))
    x = texture_images(64, 32, seed=3)
    torch.testing.assert_close(x[:, 0], torch.tensor(t, dtype=torch.float32) * 2 - 1)
    kw = dict(latent_dim=4, trunk_channels=16, widths=(16, 16, 8))
    untrained = fit_textures(x, seconds=0, **kw)
    trained = fit_textures(x, seconds=4, **kw)
    assert untrained["steps"] == 0 and trained["steps"] > 20
    assert trained["l1"] < untrained["l1"] - 0.05


def test_label_free_scores_reward_a_clean_partition_and_flag_trivial_masks():
    from drc_core.metrics import label_free_scores
    clean = torch.zeros(1, 8, 8)
    clean[0, 2:6, 2:6] = 1.0                                  # two levels: a perfect split
    blurred = 0.4 + 0.2 * clean                               # the same layout, close to ½
    noisy = blurred + 0.1 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = torch.full((1, 8, 8), 0.5)
    probs = torch.cat([clean, blurred, noisy, flat])
    masks = (clean > 0.5).expand(4, 8, 8).clone()
    masks[3] = False                                          # flat: an empty mask
    s = label_free_scores(probs, masks, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    sep = s["separability"].tolist()
    assert sep[0] == pytest.approx(1.0) and sep[1] == pytest.approx(1.0)    # η ignores the levels' gap
    assert 0.2 < sep[2] < 0.9                                 # noise within the classes lowers it
    assert sep[3] == 0.0                                      # constant π_f: nothing to separate
    assert s["confidence"].tolist() == pytest.approx([1.0, 0.2, s["confidence"][2].item(), 0.0])
    assert s["nontrivial"].tolist() == [0.0, 0.0, 0.0, -1.0]
    assert s["recon"].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert s["frame"].tolist() == [0.0, 0.0, 0.0, 0.0]       # the square stays off the 1-px frame
    edge = masks.clone()
    edge[0, :4] = True                                        # the top half: 8 + 2·3 of the 28 frame pixels
    assert label_free_scores(probs, edge, torch.zeros(4))["frame"][0].item() == pytest.approx(-14 / 28)
