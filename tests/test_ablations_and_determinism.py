import numpy as np
import torch

from drc_core.config import apply_overrides
from drc_core.fit import TrainState, fit
from drc_core.inference import segment
from drc_core.langevin import posterior_energy


def _images(n=8, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_fit_is_deterministic_under_a_seed(tiny_cfg):
    imgs = _images()
    a = fit(tiny_cfg, imgs, iterations=3)
    b = fit(tiny_cfg, imgs, iterations=3)
    c = fit(apply_overrides(tiny_cfg, {"seed": 1}), imgs, iterations=3)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert torch.equal(a.chains.z, b.chains.z) and torch.equal(a.prior_chains.z, b.prior_chains.z)
    assert not torch.equal(a.chains.z, c.chains.z)
    assert [h["gen_loss"] for h in a.history] == [h["gen_loss"] for h in b.history]


def test_segment_is_deterministic_under_a_seed(tiny_cfg):
    state = TrainState.create(tiny_cfg, 4)
    imgs = _images(4)
    s1 = segment(state.model, imgs, tiny_cfg, steps=3, seed=5)
    s2 = segment(state.model, imgs, tiny_cfg, steps=3, seed=5)
    assert torch.equal(s1.prob, s2.prob) and torch.equal(s1.mask, s2.mask)
    assert s1.mask.shape == (4, 32, 32) and torch.equal(s1.mask, s1.prob > 0.5)


def test_persistent_chains_advance_only_for_visited_samples(tiny_cfg):
    imgs = _images(8)
    state = TrainState.create(tiny_cfg, 8)
    before = state.chains.z.clone()
    fit(tiny_cfg, imgs, iterations=1, state=state)
    visited = state.chains.visits > 0
    assert visited.sum() == tiny_cfg.optim.batch_size
    assert not torch.equal(state.chains.z[visited], before[visited])
    assert torch.equal(state.chains.z[~visited], before[~visited])


def test_short_run_ablation_never_touches_the_buffers(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, {"langevin.persistent": False})
    state = TrainState.create(cfg, 8)
    before, prior_before = state.chains.z.clone(), state.prior_chains.z.clone()
    fit(cfg, _images(8), iterations=2, state=state)
    assert torch.equal(state.chains.z, before) and torch.equal(state.prior_chains.z, prior_before)


def test_pixel_reassign_switch_removes_the_reassignment_network(tiny_cfg):
    on = TrainState.create(tiny_cfg, 4).model
    off = TrainState.create(apply_overrides(tiny_cfg, {"ablation.pixel_reassign": False}), 4).model
    assert on.reassign_gen is not None and on.ebm.reassign is not None
    assert off.reassign_gen is None and off.ebm.reassign is None
    comp = off.compose(torch.randn(2, tiny_cfg.model.latent_dim))
    assert torch.equal(comp.bg_warped, comp.bg)
    comp_on = on.compose(torch.randn(2, tiny_cfg.model.latent_dim))
    assert not torch.equal(comp_on.bg_warped, comp_on.bg)


def test_pseudo_label_tv_and_ortho_switches_drop_their_terms(tiny_cfg):
    imgs = _images(4)
    full = fit(tiny_cfg, imgs, iterations=1).history[-1]
    assert {"pseudo_label", "tv", "ortho"} <= set(full)
    for switch, term in (("pseudo_label", "pseudo_label"), ("tv", "tv"), ("ortho", "ortho")):
        cfg = apply_overrides(tiny_cfg, {f"ablation.{switch}": False})
        m = fit(cfg, imgs, iterations=1).history[-1]
        assert term not in m, switch
    no_pl = TrainState.create(apply_overrides(tiny_cfg, {"ablation.pseudo_label": False}), 4).model
    assert no_pl.fg_classifier is None and no_pl.bg_classifier is None


def test_pseudo_label_and_ortho_switches_change_the_generator_loss_by_exactly_their_term(tiny_cfg):
    from drc_core.em import generator_loss
    model = TrainState.create(tiny_cfg, 4).model
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, tiny_cfg.model.latent_dim)
    full, parts = generator_loss(model, x, z, tiny_cfg)
    for switch, weight in (("pseudo_label", tiny_cfg.loss.pseudo_label_weight),
                           ("ortho", tiny_cfg.loss.ortho_weight)):
        assert weight > 0 and parts[switch] > 0, switch
        without, _ = generator_loss(model, x, z, apply_overrides(tiny_cfg, {f"ablation.{switch}": False}))
        torch.testing.assert_close(full - without, weight * parts[switch], atol=1e-5, rtol=1e-4)


def test_tv_switch_changes_the_posterior_energy_by_exactly_the_tv_term(tiny_cfg):
    from drc_core.objective import total_variation
    model = TrainState.create(tiny_cfg, 4).model
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, tiny_cfg.model.latent_dim)
    with_tv = posterior_energy(model, x, z, tiny_cfg, bf16=False)
    without = posterior_energy(model, x, z, apply_overrides(tiny_cfg, {"ablation.tv": False}), bf16=False)
    tv = total_variation(model.compose(z).bg_warped)
    # energies are ~1e4, so fp32 rounding of the difference is ~1e-3
    torch.testing.assert_close(with_tv - without, tiny_cfg.loss.tv_weight * tv, atol=2e-3, rtol=1e-4)
