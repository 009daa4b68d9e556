"""Threshold policies: parsing, Otsu/GMM on π_f maps of known structure, per-image vs corpus, fallback."""
import pytest
import torch

from drc_core.threshold import DEFAULT, MIN_SEPARATION, PolicyError, ThresholdPolicy


def _bimodal(n=4, size=16, lo=0.55, hi=0.9, fg=0.25, seed=0):
    """π_f maps: a block of `fg` of the area near `hi`, the rest near `lo` (a texture tie above ½)."""
    g = torch.Generator().manual_seed(seed)
    prob = lo + 0.03 * torch.randn(n, size, size, generator=g)
    truth = torch.zeros(n, size, size, dtype=torch.bool)
    side = int(size * fg ** 0.5)
    truth[:, :side, :side] = True
    prob[truth] = hi + 0.03 * torch.randn(int(truth.sum()), generator=g)
    return prob.clamp(0, 1), truth


@pytest.mark.parametrize("text,kind,value,corpus,name", [
    ("0.5", "fixed", 0.5, False, "0.5"), ("half", "fixed", 0.5, False, "0.5"), (0.3, "fixed", 0.3, False, "0.3"),
    ("otsu", "otsu", 0.5, False, "otsu"), ("OTSU-corpus", "otsu", 0.5, True, "otsu-corpus"),
    ("gmm", "gmm", 0.5, False, "gmm"), ("gmm-corpus", "gmm", 0.5, True, "gmm-corpus")])
def test_parse(text, kind, value, corpus, name):
    p = ThresholdPolicy.parse(text)
    assert (p.kind, p.value, p.corpus, p.name) == (kind, value, corpus, name)
    assert ThresholdPolicy.parse(p.name) == p


@pytest.mark.parametrize("bad", ["1.5", "0", "otsu-sometimes", "median", ""])
def test_parse_rejects_with_the_input_named(bad):
    with pytest.raises(PolicyError, match=repr(bad).replace("'", "'")):
        ThresholdPolicy.parse(bad)


@pytest.mark.parametrize("policy", ["otsu", "gmm", "otsu-corpus", "gmm-corpus"])
def test_calibrated_policies_split_a_texture_tie_that_half_cannot(policy):
    prob, truth = _bimodal()
    half = ThresholdPolicy.parse("0.5").masks(prob)
    assert half.float().mean() > 0.9                         # ½ takes the tied texture as foreground
    masks = ThresholdPolicy.parse(policy).masks(prob)
    th = ThresholdPolicy.parse(policy).thresholds(prob)
    assert ((th > 0.55) & (th < 0.85)).all(), th             # between the two modes
    assert torch.equal(masks, truth)


def test_per_image_thresholds_follow_each_image_and_corpus_is_one_value():
    a, _ = _bimodal(n=1, lo=0.2, hi=0.6, seed=1)
    b, _ = _bimodal(n=1, lo=0.55, hi=0.95, seed=2)
    prob = torch.cat([a, b])
    per_image = ThresholdPolicy.parse("otsu").thresholds(prob)
    assert per_image[0] < 0.45 < 0.6 < per_image[1]
    corpus = ThresholdPolicy.parse("otsu-corpus").thresholds(prob)
    assert corpus[0] == corpus[1]


def test_unimodal_image_falls_back_to_the_protocol():
    prob = 0.1 + 0.02 * torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in ("otsu", "gmm"):
        th = ThresholdPolicy.parse(name).thresholds(prob)
        assert torch.equal(th, torch.full((2,), 0.5, dtype=torch.float64)), (name, th, MIN_SEPARATION)
        assert not ThresholdPolicy.parse(name).masks(prob).any()


def test_masks_accept_a_single_map_and_numpy():
    prob, truth = _bimodal(n=1)
    m = DEFAULT.masks(prob[0].numpy())
    assert m.shape == truth[0].shape and torch.equal(m, truth[0])
