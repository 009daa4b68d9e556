"""pipelines.plan against hand arithmetic from the layer sizes of cpu-32 with pixel re-assignment
(drc_core/nets.py)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from drc_core.presets import get_config
from pipelines.plan import PlanError, count_network, main, plan

# ---- cpu-32, written out from its preset (drc_core/presets.py) and the defaults it keeps -------
FG, BG, RE, TRUNK, UP, CLS = 32, 4, 64, 64, (64, 32, 16), (16, 32, 64)
RES, K_FG, K_BG, HIDDEN = 32, 30, 10, 200
D = FG + BG + RE                                         # 100


def linear(a, b):
    return a * b + b


def mlp_params(sizes):
    return sum(linear(a, b) for a, b in zip(sizes, sizes[1:]))


def mlp_macs(sizes):
    return sum(a * b for a, b in zip(sizes, sizes[1:]))


def mlp_outputs(sizes):
    """Output elements of the leaf modules: every Linear, and a LeakyReLU after each hidden one."""
    return sum(sizes[1:]) + sum(sizes[1:-1])


EBM_MLPS = ([FG, HIDDEN, HIDDEN, K_FG], [BG, HIDDEN, HIDDEN, K_BG], [RE, HIDDEN, HIDDEN, HIDDEN, 1])


def generator(latent, out, extra=0):
    """(params, MACs, leaf output elements) of a Generator: Linear(latent → C·4·4) + LeakyReLU,
    up-blocks (Upsample ×2 → Conv3×3 no bias → InstanceNorm affine → LeakyReLU), Conv3×3 head."""
    params, macs, outs = linear(latent, TRUNK * 16), latent * TRUNK * 16, 2 * TRUNK * 16
    chans, side = (TRUNK + extra, *UP), 4
    for a, b in zip(chans, chans[1:]):
        side *= 2
        params += a * b * 9 + 2 * b
        macs += b * side * side * a * 9
        outs += a * side * side + 3 * b * side * side
    params += UP[-1] * out * 9 + out
    macs += out * RES * RES * UP[-1] * 9
    outs += out * RES * RES
    return params, macs, outs


def classifier(k):
    """(params, MACs, leaf outputs) of an AuxClassifier: Conv4×4 s2 (no bias) → IN → LeakyReLU per
    width, then a conv over the remaining side×side map to k logits."""
    params = macs = outs = 0
    chans, side = (3, *CLS), RES
    for a, b in zip(chans, chans[1:]):
        side //= 2
        params += a * b * 16 + 2 * b
        macs += b * side * side * a * 16
        outs += 3 * b * side * side
    return params + CLS[-1] * k * side * side + k, macs + k * CLS[-1] * side * side, outs + k


GENS = [generator(FG, 4), generator(BG, 4), generator(RE, 2, extra=TRUNK)]
CLASSIFIERS = [classifier(K_FG), classifier(K_BG)]
P_EBM = sum(mlp_params(s) for s in EBM_MLPS)
P_GEN = sum(g[0] for g in GENS) + sum(c[0] for c in CLASSIFIERS)
MACS_COMPOSE, MACS_EBM = sum(g[1] for g in GENS), sum(mlp_macs(s) for s in EBM_MLPS)
MACS_CLS = sum(c[1] for c in CLASSIFIERS)


@pytest.fixture(scope="module")
def cfg():
    # the full architecture (the preset switches pixel re-assignment off, which drops its generator)
    return get_config("cpu-32", {"ablation.pixel_reassign": True})


@pytest.fixture(scope="module")
def counts(cfg):
    return count_network(cfg)


def test_counts_match_layer_arithmetic(cfg, counts):
    assert (cfg.model.latent_dim, cfg.model.ebm_hidden, cfg.model.ebm_reassign_hidden) == (D, HIDDEN, HIDDEN)
    assert counts.params_ebm == P_EBM == 189_641
    assert counts.params_generator == P_GEN
    assert counts.macs_ebm == MACS_EBM == 188_200
    assert counts.macs_compose == MACS_COMPOSE
    assert counts.macs_classifiers == MACS_CLS
    ebm_outputs = sum(mlp_outputs(s) for s in EBM_MLPS)
    assert counts.act_prior == ebm_outputs == 2841
    assert counts.act_langevin == sum(g[2] for g in GENS) + ebm_outputs
    assert counts.act_update == sum(g[2] for g in GENS) + sum(c[2] for c in CLASSIFIERS)


def test_plan_matches_hand_arithmetic(cfg, counts):
    n, gpus, batch = 2000, 2, 32
    r = plan(cfg, n, gpus, peak_tflops=1.0, utilisation=1.0, network_gbps=8.0, counts=counts)
    P = P_GEN + P_EBM
    assert r["params"]["total"] == P
    g, h = r["gpu_bytes"], r["host_bytes"]
    assert (g["parameters_fp32"], g["gradients_fp32"], g["adam_state_fp32"]) == (4 * P, 4 * P, 8 * P)
    assert g["allreduce_buffer_fp32"] == 4 * P_GEN
    assert g["activations_update_fp32"] == 4 * batch * counts.act_update
    assert g["activations_langevin_bf16"] == 2 * batch * counts.act_langevin
    # chains: n/gpus × D × 4 bytes; cpu-32 has a shared prior pool of 1000 chains
    assert h["posterior_chains"] == n // gpus * D * 4 == 400_000
    assert h["prior_chains"] == 1000 // gpus * D * 4
    assert h["chain_index"] == (n // gpus + 1000 // gpus) * (8 + 4)
    assert h["images_uint8_and_fp32"] == n // gpus * 3 * RES * RES * 5
    assert r["cluster"]["chain_storage_bytes"] == (n + 1000) * D * 4
    # FLOPs = 2·MACs; Langevin: forward + backward to z (2×); updates: forward + backward (3×)
    k1, k0 = cfg.langevin.posterior_steps, cfg.langevin.prior_steps
    f = r["flops_per_iteration"]
    assert f["posterior_langevin"] == k1 * batch * 2 * 2 * (MACS_COMPOSE + MACS_EBM)
    assert f["prior_langevin"] == k0 * batch * 2 * 2 * MACS_EBM
    assert f["generator_update"] == batch * 2 * (3 * (MACS_COMPOSE + MACS_CLS) + MACS_EBM)
    assert f["ebm_update"] == 2 * batch * 2 * 3 * MACS_EBM
    t = r["time"]
    assert t["compute_s_per_iteration"] == pytest.approx(f["total"] / 1e12)
    # ring all-reduce: 2·(g−1)/g × 4·P bytes; 8 Gbit/s = 1e9 bytes/s
    assert t["allreduce_s_per_iteration"] == pytest.approx(2 * (gpus - 1) / gpus * 4 * P / 1e9)
    assert t["iterations_per_epoch"] == n // (batch * gpus) == 31
    assert t["epoch_s"] == pytest.approx(31 * t["s_per_iteration"])


def test_paper_preset_keeps_a_prior_chain_per_image_and_fp16_halves_chains():
    cfg = get_config("paper-tmds")
    counts = count_network(cfg)
    r = plan(cfg, 1_000_000, 8, counts=counts)
    shard = 1_000_000 // 8
    assert r["host_bytes"]["posterior_chains"] == r["host_bytes"]["prior_chains"] == shard * cfg.model.latent_dim * 4
    half = plan(get_config("paper-tmds", {"langevin.chain_fp16": True}), 1_000_000, 8, counts=counts)
    assert half["host_bytes"]["posterior_chains"] * 2 == r["host_bytes"]["posterior_chains"]
    assert half["cluster"]["chain_storage_bytes"] == 2 * 1_000_000 * cfg.model.latent_dim * 2


def test_doubling_gpus_halves_shard_and_epoch(cfg, counts):
    a, b = (plan(cfg, 64_000, g, counts=counts) for g in (4, 8))
    for key in ("posterior_chains", "prior_chains", "images_uint8_and_fp32"):
        assert b["host_bytes"][key] * 2 == a["host_bytes"][key]
    assert b["time"]["iterations_per_epoch"] * 2 == a["time"]["iterations_per_epoch"]
    assert b["time"]["epoch_compute_s"] == pytest.approx(a["time"]["epoch_compute_s"] / 2)
    # the ring all-reduce grows from 2·3/4 to 2·7/8 of the gradient bytes per iteration; with a fast
    # network the whole epoch halves
    assert b["time"]["allreduce_s_per_iteration"] / a["time"]["allreduce_s_per_iteration"] == pytest.approx(7 / 6)
    fast = [plan(cfg, 64_000, g, counts=counts, network_gbps=1e6)["time"]["epoch_s"] for g in (4, 8)]
    assert fast[1] == pytest.approx(fast[0] / 2, rel=1e-3)
    # per-worker work and GPU memory do not depend on the number of workers (batch is per worker)
    assert b["flops_per_iteration"] == a["flops_per_iteration"]
    assert b["gpu_bytes"]["activations_update_fp32"] == a["gpu_bytes"]["activations_update_fp32"]
    assert b["cluster"]["chain_storage_bytes"] == a["cluster"]["chain_storage_bytes"]


def test_batch_is_clamped_to_the_shard_like_training(cfg, counts):
    r = plan(cfg, 40, 2, batch_size=64, counts=counts)
    assert r["batch_per_worker"] == 20 and r["time"]["iterations_per_epoch"] == 1
    assert math.isclose(r["time"]["epoch_s"], r["time"]["s_per_iteration"])


@pytest.mark.parametrize("kwargs, argument", [({"images": 0}, "images"), ({"gpus": 0}, "gpus"),
                                              ({"gpus": -3}, "gpus"), ({"images": 3, "gpus": 4}, "images"),
                                              ({"batch_size": 0}, "batch_size"), ({"utilisation": 1.5}, "utilisation")])
def test_bad_input_names_the_argument(cfg, counts, kwargs, argument):
    args = {"images": 100, "gpus": 2, **kwargs}
    with pytest.raises(PlanError, match=argument) as err:
        plan(cfg, args.pop("images"), args.pop("gpus"), counts=counts, **args)
    assert err.value.argument == argument


@pytest.mark.parametrize("argv, flag", [(["--preset", "paper-nope", "--images", "10", "--gpus", "1"], "--preset"),
                                        (["--preset", "cpu-32", "--images", "10", "--gpus", "0"], "--gpus"),
                                        (["--preset", "cpu-32", "--images", "-5", "--gpus", "1"], "--images"),
                                        (["--preset", "cpu-32", "--images", "2", "--gpus", "4"], "--images")])
def test_cli_rejects_bad_input_naming_the_flag(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_cli_prints_the_table_and_json(capsys):
    main(["--preset", "cpu-32", "--images", "2_000", "--gpus", "2", "--device-tflops", "10"])
    out = capsys.readouterr().out
    for row in ("parameters", "Adam state (fp32)", "gradients (fp32)", "activations, generator update",
                "activations, posterior Langevin step", "posterior chain shard", "chain storage, all workers",
                "FLOPs per EM iteration per worker", "posterior Langevin", "assumed throughput",
                "iterations per epoch", "epoch"):
        assert row in out, row
    assert "10 TFLOP/s (stated peak) × 30% utilisation" in out
    assert "1,000 × 100 × 4 B" in out
    main(["--preset", "paper-birds", "--images", "10_000_000", "--gpus", "64"])
    out = capsys.readouterr().out                    # the default rate is the measured one, at face value
    assert "23 TFLOP/s (default: achieved by paper-birds on one H100, measured) × 100% utilisation" in out
    iteration = next(x for x in out.splitlines() if x.strip().startswith("compute per iteration"))
    assert abs(float(iteration.split()[3]) - 5.13) < 0.2, iteration      # the H100's measured 5.13 s
    import json
    main(["--preset", "cpu-32", "--images", "2000", "--gpus", "2", "--json", "langevin.chain_fp16=true"])
    r = json.loads(capsys.readouterr().out)
    assert r["host_bytes"]["posterior_chains"] == 1000 * D * 2


def test_cli_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "pipelines.plan", "--preset", "paper-birds", "--images", "10_000_000",
                          "--gpus", "64"], capture_output=True, text=True, timeout=120, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.startswith("paper-birds: 10,000,000 images on 64 GPU workers, batch 48 per worker")
    assert "156,250 × 1024 × 4 B" in out and "iterations per epoch" in out
