import pytest
import torch

from drc_core.em import Optimizers, em_step, generator_loss
from drc_core.langevin import posterior_energy
from drc_core.model import DRCModel
from drc_core.objective import orthogonal_penalty, region_competition, total_variation
from drc_core.presets import get_config


def _model(cfg):
    torch.manual_seed(0)
    return DRCModel(cfg.model, cfg.ablation)


@pytest.mark.parametrize("resolution, widths", [(32, (8, 8, 8)), (64, (8, 8, 8, 8)), (128, (8, 8, 8, 8, 8))])
def test_shapes_and_pi_sums_to_one_at_every_resolution(tiny_cfg, resolution, widths):
    cfg = get_config("cpu-32", {**{k: v for k, v in tiny_cfg.flat().items() if k.startswith(("model.", "ablation."))},
                                "model.resolution": resolution, "model.up_widths": widths,
                                "model.classifier_widths": widths})
    model = _model(cfg)
    comp = model.compose(torch.randn(3, cfg.model.latent_dim))
    for t in (comp.fg, comp.bg, comp.bg_warped, comp.recon):
        assert t.shape == (3, 3, resolution, resolution)
    assert comp.fg.abs().max() <= 1 and comp.bg_warped.abs().max() <= 1
    pi = comp.log_pi.exp()
    torch.testing.assert_close(pi.sum(1), torch.ones(3, resolution, resolution))
    assert model.fg_classifier(comp.fg).shape == (3, cfg.model.fg_classes)


def test_every_trainable_parameter_gets_a_gradient(tiny_cfg):
    model = _model(tiny_cfg)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    loss, _ = generator_loss(model, x, torch.randn(4, tiny_cfg.model.latent_dim), tiny_cfg)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("ebm."):
            continue                                   # the LEBM has its own loss
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the LEBM's loss reaches every LEBM parameter
    model.zero_grad()
    from drc_core.em import ebm_loss
    e_loss, _ = ebm_loss(model, torch.randn(4, tiny_cfg.model.latent_dim), torch.randn(4, tiny_cfg.model.latent_dim))
    e_loss.backward()
    for name, p in model.ebm.named_parameters():
        if name == "reassign.6.bias":
            continue    # a constant added to f_α cancels in mean f(z⁻) − mean f(z⁺): zero gradient is right
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_region_competition_is_finite_for_huge_reconstruction_errors(tiny_cfg):
    model = _model(tiny_cfg)
    comp = model.compose(torch.randn(2, tiny_cfg.model.latent_dim))
    x = torch.full((2, 3, 32, 32), 1e4)
    x[1] = -1e4
    for mode in ("pixel", "channel"):
        rc = region_competition(x, comp, sigma=0.25, responsibility=mode)
        assert torch.isfinite(rc.q).all() and torch.isfinite(rc.gamma_f).all()
        assert ((rc.gamma_f >= 0) & (rc.gamma_f <= 1)).all()
    # the naive exp(log p) form divides 0 by 0 here; ours keeps the exact answer
    naive = torch.exp(-(comp.fg - x).abs() / 0.125)
    assert (naive == 0).all()
    z = torch.randn(2, tiny_cfg.model.latent_dim, requires_grad=True)
    u = posterior_energy(model, x, z, tiny_cfg, bf16=False).sum()
    (g,) = torch.autograd.grad(u, z)
    assert torch.isfinite(g).all()


def test_responsibility_favours_the_better_expert(tiny_cfg):
    model = _model(tiny_cfg)
    comp = model.compose(torch.randn(1, tiny_cfg.model.latent_dim))
    x = comp.fg.detach().clone()
    x[..., :16] = comp.bg_warped.detach()[..., :16]      # left half matches the background
    rc = region_competition(x, comp, sigma=0.25)
    differs = (comp.fg - comp.bg_warped).abs().sum(1, keepdim=True) > 0.3
    left, right = differs.clone(), differs.clone()
    left[..., 16:], right[..., :16] = False, False
    assert rc.gamma_f[left].mean() < 0.05 and rc.gamma_f[right].mean() > 0.95


def test_total_variation_and_orthogonal_penalty_known_values():
    img = torch.zeros(1, 1, 2, 3)
    img[0, 0, :, 1] = 1.0                                   # a vertical stripe: 2 rows × 2 edges
    assert total_variation(img).item() == 4.0
    conv = torch.nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
    # W Wᵀ = [[1, 2], [2, 4]]: off-diagonal Frobenius norm = sqrt(8)
    torch.testing.assert_close(orthogonal_penalty([conv]), torch.tensor(8.0).sqrt())
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    conv4 = torch.nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        conv4.weight.copy_(q.view(4, 4, 1, 1))
    assert orthogonal_penalty([conv4]).item() < 1e-5


def test_em_step_moves_chains_and_parameters(tiny_cfg):
    model = _model(tiny_cfg)
    opt = Optimizers.create(model, tiny_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    z_pos, z_neg = torch.randn(4, tiny_cfg.model.latent_dim), torch.randn(4, tiny_cfg.model.latent_dim)
    zp, zn, metrics = em_step(model, opt, x, z_pos, z_neg, tiny_cfg, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(zp, z_pos) and not torch.equal(zn, z_neg)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("fg_gen") for k in changed) and any(k.startswith("ebm") for k in changed)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_conv_weights_are_channels_last_and_survive_a_state_dict_round_trip(tiny_cfg):
    # NHWC weights are the fast path of the Langevin loop (pipelines.bench core measures it);
    # a state dict saved from one model must load into another and give the same outputs
    model = _model(tiny_cfg)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    other = DRCModel(tiny_cfg.model, tiny_cfg.ablation)
    other.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in other.parameters() if p.dim() == 4)
    z = torch.randn(2, tiny_cfg.model.latent_dim)
    torch.testing.assert_close(other.compose(z).recon, model.compose(z).recon)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("side", [6, 240])         # 2·5·240² > 2¹⁹ elements: the sums run as GEMMs
def test_instance_norm_matches_pytorch_in_value_gradient_and_layout(layout, side):
    """Our InstanceNorm2d is nn.InstanceNorm2d's maths (exact gradients by finite differences in
    fp64), keeps the input's layout, and stays accurate for channels with a large mean and a tiny
    spread, in fp32 and in bf16."""
    from torch import nn
    from drc_core.nets import InstanceNorm2d, _InstanceNormFn
    torch.manual_seed(0)
    ours, ref = InstanceNorm2d(5, affine=True).double(), nn.InstanceNorm2d(5, affine=True).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.uniform_(-1.0, 1.0)
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(2, 5, side, side + 1, dtype=torch.float64) * 3 + 20).contiguous(memory_format=layout)
    x.requires_grad_(True)
    if side < 10:
        assert torch.autograd.gradcheck(lambda a, w, b: _InstanceNormFn.apply(a, w, b, 1e-5),
                                        (x, ours.weight, ours.bias))
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous(memory_format=layout)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad((y * g).sum(), (x, ours.weight, ours.bias)),
                               torch.autograd.grad((y_ref * g).sum(), (x, ref.weight, ref.bias)))
    # near-constant channels: mean 5, spread 0.01 (variance 1e-4 of the mean's square)
    xs = (torch.randn(2, 5, side, side) * 0.01 + 5).contiguous(memory_format=layout)
    ours, ref = ours.float(), ref.float()
    torch.testing.assert_close(ours(xs), ref(xs), atol=2e-4, rtol=1e-4)
    xb = xs.bfloat16()
    err = (ours(xb).float() - ref(xb.float())).abs().max()
    assert err < 0.04                                  # ≈ one bf16 step of outputs of size ~3


def _striped_composition(h=16, w=16):
    """A grey-level grating x with period 2 px, and a composition whose foreground paints it light
    and background dark, mixing weights ½ everywhere: the shade split of the CPU presets."""
    from drc_core.model import Composition
    x = torch.zeros(1, 3, h, w)
    x[..., ::2] = 0.6
    x[..., 1::2] = -0.6
    fg, bg = torch.full_like(x, 0.6), torch.full_like(x, -0.6)
    half = torch.full((1, 2, h, w), 0.5).log()
    comp = Composition(fg=fg, fg_logit=torch.zeros(1, 1, h, w), bg=bg, bg_logit=torch.zeros(1, 1, h, w),
                       bg_warped=bg, log_pi=half)
    return x, comp


def test_competition_window_removes_the_reward_of_a_shade_split():
    x, comp = _striped_composition()
    per_pixel = region_competition(x, comp, sigma=0.5)
    # per pixel, each expert wins the stripes of its shade outright
    assert per_pixel.gamma_f[..., ::2].min() > 0.99 and per_pixel.gamma_f[..., 1::2].max() < 0.01
    pooled = region_competition(x, comp, sigma=0.5, window=5)
    # over 5×5 neighbourhoods both experts explain about as much (3 stripes against 2): γ_f stays near
    # π_f = ½ instead of 0 / 1, and averages ½ away from the border
    inner = pooled.gamma_f[..., 2:-2, 2:-2]
    assert (inner - 0.5).abs().max() < 0.35 and abs(inner.mean().item() - 0.5) < 0.05
    # and Q no longer rewards the split: it is the mixture paying its log-mixing cost everywhere
    assert pooled.q.item() < per_pixel.q.item() - 0.5 * x[0, 0].numel()
    # window 1 is the paper's responsibilities exactly
    torch.testing.assert_close(region_competition(x, comp, sigma=0.5, window=1).gamma_f, per_pixel.gamma_f)


def test_center_prior_shifts_the_foreground_logit_by_a_fixed_centre_bias(tiny_cfg):
    plain = _model(tiny_cfg)
    cfg = get_config("cpu-32", {**tiny_cfg.flat(), "model.center_prior": 2.0, "model.center_radius": 0.6})
    biased = DRCModel(cfg.model, cfg.ablation)
    biased.load_state_dict(plain.state_dict())          # the prior is no parameter: same weights load
    z = torch.randn(2, tiny_cfg.model.latent_dim)
    with torch.no_grad():
        a, b = plain.compose(z), biased.compose(z)
    shift = (b.log_pi[:, 0] - b.log_pi[:, 1]) - (a.log_pi[:, 0] - a.log_pi[:, 1])   # fg − bg log-odds
    n = cfg.model.resolution
    c = (torch.arange(n) + 0.5) / n * 2 - 1
    r = (c[:, None] ** 2 + c[None, :] ** 2).sqrt()
    expected = 2.0 * (1 - (r / 0.6) ** 2).clamp(min=-1)
    torch.testing.assert_close(shift, expected.expand_as(shift), atol=1e-4, rtol=1e-4)
    assert shift[:, n // 2, n // 2].min() > 1.9 and shift[:, 0, 0].max() < -1.9     # +s centre, −s corners
    torch.testing.assert_close(b.fg, a.fg)                                       # appearance untouched


def test_area_prior_adds_lambda_mean_pi_f_to_the_generator_loss(tiny_cfg):
    model = _model(tiny_cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, tiny_cfg.model.latent_dim)
    with_prior = get_config("cpu-32", {**tiny_cfg.flat(), "loss.area_weight": 0.2})
    base, _ = generator_loss(model, x, z, tiny_cfg)
    loss, parts = generator_loss(model, x, z, with_prior)
    with torch.no_grad():
        area = model.compose(z).pi_f.mean()
    torch.testing.assert_close(parts["area_prior"], area)
    torch.testing.assert_close(loss - base, 0.2 * area, rtol=1e-4, atol=1e-6)


def test_em_steps_on_a_fixed_batch_lower_the_reconstruction_error(tiny_cfg):
    """EM learns: repeated steps on one batch of images (chains carried over, as the persistent
    buffer does) make the posterior reconstruction of that batch clearly better."""
    torch.manual_seed(0)
    model = _model(tiny_cfg)
    opt = Optimizers.create(model, tiny_cfg)
    gen = torch.Generator().manual_seed(0)
    # smooth images (4×4 random colours upsampled): a target the small generators can paint
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1, size=32, mode="bilinear")
    z_pos, z_neg = torch.randn(4, tiny_cfg.model.latent_dim), torch.randn(4, tiny_cfg.model.latent_dim)
    errors = []
    for _ in range(30):
        z_pos, z_neg, metrics = em_step(model, opt, x, z_pos, z_neg, tiny_cfg, generator=gen)
        with torch.no_grad():
            errors.append(float((model.compose(z_pos).recon - x).abs().mean()))
    # measured: 0.377 → 0.269 (first → last step; the last five average 0.78× the first five)
    assert sum(errors[-5:]) / 5 < 0.85 * sum(errors[:5]) / 5, [round(e, 3) for e in errors]


def test_border_fraction_and_keep_off_border_known_values():
    from drc_core.amortized import keep_off_border
    from drc_core.metrics import border_fraction
    m = torch.zeros(4, 32, 32, dtype=torch.bool)       # frame: a band 2 px wide, 32² − 28² = 240 pixels
    m[1, 8:24, 8:24] = True                             # an object inside the frame
    m[2, :16] = True                                    # the top half: 2·32 rows + 2·2·14 side pixels
    m[3] = True
    assert border_fraction(m).tolist() == pytest.approx([0.0, 0.0, (64 + 56) / 240, 1.0])
    assert border_fraction(torch.ones(1, 8, 8)).item() == 1.0          # 1 px band below 32²
    x = torch.arange(4.0)[:, None, None, None].expand(4, 3, 32, 32)
    kept = keep_off_border([(x, m.float()), (x[:2], m[:2].float())], [m, m[:2]], 0.5)
    assert kept[0][0][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0] and kept[1][0].shape[0] == 2
    assert torch.equal(kept[0][1], m[:3].float())
    with pytest.raises(ValueError, match="no pair's mask covers at most 0.1"):
        keep_off_border([(x[3:], m[3:].float())], [m[3:]], 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        keep_off_border([(x, m.float())], [m], 1.5)
