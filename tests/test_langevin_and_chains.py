import pytest
import torch

from drc_core.chains import InMemoryChainBuffer
from drc_core.langevin import langevin, reset_diverged


def test_langevin_reproduces_a_known_gaussian():
    """Target N(μ, diag(s²)): U(z) = ½ Σ (z−μ)²/s². Unadjusted Langevin with step δ has stationary
    variance s²/(1 − δ²/(4 s²)); the test checks against that exact value. The narrow coordinate
    (s = 0.15, δ²/(4s²) = 0.44) makes the discretisation inflate its std by 34 %, ten times the
    3 % tolerance, so a sampler with the wrong update (or an exact sampler) fails."""
    mu = torch.tensor([1.0, -2.0, 0.5])
    s = torch.tensor([0.15, 1.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=gen)
    delta = 0.2                     # relaxation time of the widest coordinate: 4 / (½δ²) = 200 steps
    z = langevin(lambda v: 0.5 * ((v - mu) / s).pow(2).sum(1), z, steps=3000, step_size=delta, generator=gen)
    torch.testing.assert_close(z.mean(0), mu, atol=0.06, rtol=0)
    expected_std = s / (1 - delta ** 2 / (4 * s ** 2)).sqrt()
    assert expected_std[0] / s[0] > 1.3                              # the effect is far beyond the tolerance
    torch.testing.assert_close(z.std(0), expected_std, rtol=0.03, atol=0)


def test_langevin_is_deterministic_under_a_seed():
    energy = lambda v: v.pow(2).sum(1)
    a = langevin(energy, torch.ones(5, 2), steps=10, step_size=0.3, generator=torch.Generator().manual_seed(3))
    b = langevin(energy, torch.ones(5, 2), steps=10, step_size=0.3, generator=torch.Generator().manual_seed(3))
    c = langevin(energy, torch.ones(5, 2), steps=10, step_size=0.3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reset_diverged_replaces_only_bad_chains():
    z = torch.zeros(4, 3)
    z[1, 0] = float("nan")
    z[2, 2] = 1e9
    fixed, bad = reset_diverged(z, 1e4, torch.Generator().manual_seed(0))
    assert bad.tolist() == [False, True, True, False]
    assert torch.isfinite(fixed).all() and torch.equal(fixed[[0, 3]], z[[0, 3]])


def test_chain_buffer_get_set_visits_and_range_errors():
    buf = InMemoryChainBuffer.for_range(10, 4, offset=100, seed=1)
    ids = torch.tensor([100, 105, 109])
    new = torch.arange(12.0).view(3, 4)
    buf.set(ids, new)
    assert torch.equal(buf.get(ids), new)
    assert buf.visits.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    with pytest.raises(KeyError, match="110"):
        buf.get(torch.tensor([110]))
    half = InMemoryChainBuffer.for_range(10, 4, offset=100, seed=1, dtype=torch.float16)
    assert half.get(ids).dtype == torch.float32 and half.z.element_size() == 2


def test_chain_buffer_reshards_two_shards_into_one_and_back():
    a = InMemoryChainBuffer.for_range(5, 3, offset=0, seed=1)
    b = InMemoryChainBuffer.for_range(6, 3, offset=5, seed=2)
    merged = InMemoryChainBuffer.merge([a.state_dict(), b.state_dict()], torch.arange(11))
    assert torch.equal(merged.z, torch.cat([a.z, b.z]))
    part = InMemoryChainBuffer.merge([merged.state_dict()], torch.arange(3, 7))
    assert torch.equal(part.get(torch.tensor([3, 6])), torch.stack([a.z[3], b.z[1]]))
    with pytest.raises(KeyError, match="covers|cover"):
        InMemoryChainBuffer.merge([a.state_dict()], torch.arange(8))


def test_chain_init_depends_only_on_sample_id_and_sparse_ids_work():
    whole = InMemoryChainBuffer.for_range(3000, 4, seed=7)
    ids = torch.tensor([5, 1500, 2999])
    sparse = InMemoryChainBuffer(ids, 4, seed=7)
    assert torch.equal(sparse.get(ids), whole.get(ids))
    with pytest.raises(KeyError, match="6"):
        sparse.get(torch.tensor([6]))
    with pytest.raises(ValueError, match="sorted"):
        InMemoryChainBuffer(torch.tensor([3, 1]), 4)


def test_shard_bounds_partition_exactly():
    from drc_core.chains import shard_bounds
    for n, w in [(10, 3), (2, 2), (7, 1), (5, 4)]:
        parts = [shard_bounds(n, w, r) for r in range(w)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(h - l for l, h in parts) - min(h - l for l, h in parts) <= 1


def test_test_average_is_the_mean_of_pi_over_the_chains_last_steps(tiny_cfg):
    """langevin.test_average = N: π_f is the mean over the last N of the test steps of the very same
    chain (same noise, same final z) as without averaging."""
    import numpy as np

    from drc_core.config import apply_overrides
    from drc_core.inference import segment
    from drc_core.model import DRCModel
    torch.manual_seed(0)
    model = DRCModel(tiny_cfg.model, tiny_cfg.ablation)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    ids = np.arange(3)
    plain = apply_overrides(tiny_cfg, {"langevin.test_average": 0})
    single = [segment(model, images, plain, steps=s, sample_ids=ids) for s in (4, 5, 6)]
    averaged = segment(model, images, apply_overrides(tiny_cfg, {"langevin.test_average": 3}), steps=6,
                       sample_ids=ids)
    assert torch.equal(averaged.z, single[-1].z)
    expected = sum(s.prob for s in single) / 3
    assert torch.allclose(averaged.prob, expected, atol=1e-6)
    assert not torch.allclose(averaged.prob, single[-1].prob, atol=1e-4)
    assert torch.equal(averaged.mask, averaged.prob > 0.5)
