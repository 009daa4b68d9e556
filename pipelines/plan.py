"""Capacity planning for data-parallel DRC training: memory per worker, chain storage, FLOPs per
EM iteration, iteration and epoch time.

    python -m pipelines.plan --preset paper-birds --images 10_000_000 --gpus 64
    python -m pipelines.plan --preset paper-birds --images 10_000_000 --gpus 64 --batch-size 32 --device-tflops 125
    python -m pipelines.plan --preset cpu-32 --images 2000 --gpus 2 --measure --json
    python -m pipelines.plan --preset paper-birds --images 10_000_000 --gpus 64 langevin.chain_fp16=true

Counted from the real networks, not from formulas that can drift from them: `DRCModel` is built
on the meta device (shapes only, no memory, no initialisation), its parameters are counted, the
MACs of its Conv/Linear layers come from `drc_core.nets.count_macs`, and activations from
forward hooks that add up the output elements of every leaf module in one forward pass at a
small batch, scaled linearly to the batch size. The rest is arithmetic (`plan`), in the layout
pipelines.train uses: `optim.batch_size` per worker, worker r owns the posterior chains (and
prior chains) of its contiguous share of the images, in host memory.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch

from drc_core.config import ConfigError, DRCConfig, parse_override_args
from drc_core.em import generator_loss
from drc_core.model import DRCModel
from drc_core.nets import count_macs
from drc_core.presets import get_config, preset_names

# Default rate: what was measured, not a share of a datasheet peak. One H100 ran a paper-birds EM
# iteration at batch 48 in 5.13 s = 23 TFLOP/s achieved (then bench/em_iteration_device.py, now `pipelines.bench core --device cuda`; issue 18);
# the former default, 30 % of an A100's 312 TFLOP/s bf16 peak, was ~4× optimistic against it.
# Small presets are launch-bound and reach less. --device-tflops (a peak, × --utilisation) or
# --measure (this machine's GEMM peak) replace it.
MEASURED_TFLOPS = 23.0
MEASURED_SOURCE = "default: achieved by paper-birds on one H100, measured"
DEFAULT_PEAK_TFLOPS = MEASURED_TFLOPS
DEFAULT_UTILISATION = 1.0                 # of the measured rate; 0.3 of a stated or measured peak
PEAK_UTILISATION = 0.3
DEFAULT_NETWORK_GBPS = 100.0            # per worker, for the gradient all-reduce
CHAIN_INDEX_BYTES = 8 + 4               # per chain: sample id (int64) + visit count (int32)
_PROBE_BATCH = 2


@dataclass(frozen=True)
class NetworkCounts:
    """What one image costs in the real networks of a config (parameters: whole model)."""
    params_generator: int               # generators + re-assignment + classifiers (Adam, gen_lr)
    params_ebm: int                     # LEBM (Adam, ebm_lr)
    macs_compose: int                   # fg/bg/re-assignment generators, one image
    macs_ebm: int                       # LEBM on one latent
    macs_classifiers: int               # both auxiliary classifiers, one image
    act_update: int                     # module output elements, generator update, one image
    act_langevin: int                   # module output elements, posterior energy, one image
    act_prior: int                      # module output elements, prior energy (LEBM), one image


def _leaf_output_elements(modules, run) -> int:
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        total += sum(t.numel() for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t))

    handles = [m.register_forward_hook(hook) for mod in modules for m in mod.modules()
               if not any(True for _ in m.children())]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total


def count_network(cfg: DRCConfig) -> NetworkCounts:
    """Count parameters, MACs and activation elements of `cfg`'s DRCModel on the meta device."""
    with torch.device("meta"):
        model = DRCModel(cfg.model, cfg.ablation)
        b, r = _PROBE_BATCH, cfg.model.resolution
        z1, zb = torch.zeros(1, cfg.model.latent_dim), torch.zeros(b, cfg.model.latent_dim)
        x = torch.zeros(b, 3, r, r)
        classifiers = [m for m in (model.fg_classifier, model.bg_classifier) if m is not None]
        macs_cls = sum(count_macs(c, lambda c=c: c(torch.zeros(1, 3, r, r))) for c in classifiers)
        gens = [m for m in (model.fg_gen, model.bg_gen, model.reassign_gen) if m is not None]
        # the update keeps what its backward needs: generators + classifiers (the LEBM logits of
        # the pseudo-label loss are computed without grad)
        act_update = _leaf_output_elements(model.generator_modules(), lambda: generator_loss(model, x, zb, cfg))
        act_langevin = _leaf_output_elements([*gens, model.ebm], lambda: (model.compose(zb), model.ebm(zb)))
        act_prior = _leaf_output_elements([model.ebm], lambda: model.ebm(zb))
        return NetworkCounts(
            params_generator=sum(p.numel() for p in model.generator_parameters()),
            params_ebm=sum(p.numel() for p in model.ebm.parameters()),
            macs_compose=count_macs(model, lambda: model.compose(z1)),
            macs_ebm=count_macs(model.ebm, lambda: model.ebm(z1)), macs_classifiers=macs_cls,
            act_update=act_update // b, act_langevin=act_langevin // b, act_prior=act_prior // b)


def measure_tflops(dtype: torch.dtype, seconds: float = 1.0, n: int = 1024) -> float:
    """Sustained TFLOP/s of an n×n GEMM on this machine's CPU: an upper bound for DRC's convolutions."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b                                                   # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


class PlanError(ValueError):
    """An impossible planning input; `argument` names it (the CLI reports it as --argument)."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def _check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise PlanError(name, f"{name} must be {rule}, got {value!r}")


def plan(cfg: DRCConfig, images: int, gpus: int, *, batch_size: int | None = None,
         peak_tflops: float = DEFAULT_PEAK_TFLOPS, utilisation: float = DEFAULT_UTILISATION,
         network_gbps: float = DEFAULT_NETWORK_GBPS, counts: NetworkCounts | None = None,
         throughput_source: str = "stated peak") -> dict:
    """The capacity plan of training `cfg` on `images` images with `gpus` data-parallel workers.
    Bytes, FLOPs and seconds; per worker unless a key says cluster. Raises PlanError naming the
    argument for impossible inputs."""
    _check("images", images, isinstance(images, int) and images > 0, "a positive integer")
    _check("gpus", gpus, isinstance(gpus, int) and gpus > 0, "a positive integer")
    _check("images", images, images >= gpus, f"at least gpus ({gpus}): every worker needs a shard")
    _check("batch_size", batch_size, batch_size is None or batch_size > 0, "a positive integer")
    for name, v in (("peak_tflops", peak_tflops), ("network_gbps", network_gbps)):
        _check(name, v, v > 0, "> 0")
    _check("utilisation", utilisation, 0 < utilisation <= 1, "in (0, 1]")
    c = counts or count_network(cfg)
    lv, D = cfg.langevin, cfg.model.latent_dim
    shard = math.ceil(images / gpus)                        # the largest worker share
    batch = min(batch_size or cfg.optim.batch_size, images // gpus)   # as train_worker clamps it
    iters_per_epoch = max(1, (images // gpus) // batch)
    P = c.params_generator + c.params_ebm
    zb = 2 if lv.chain_fp16 else 4
    prior_chains = shard if lv.prior_pool_size == 0 else math.ceil(lv.prior_pool_size / gpus)
    prior_total = images if lv.prior_pool_size == 0 else lv.prior_pool_size
    pixels = 3 * cfg.model.resolution ** 2
    langevin_bytes = 2 if lv.bf16 else 4
    act = {"update_fp32": 4 * c.act_update * batch, "update_bf16": 2 * c.act_update * batch,
           "langevin_fp32": 4 * c.act_langevin * batch, "langevin_bf16": 2 * c.act_langevin * batch,
           "prior_fp32": 4 * c.act_prior * batch}
    static = {"parameters_fp32": 4 * P, "gradients_fp32": 4 * P, "adam_state_fp32": 8 * P,
              "allreduce_buffer_fp32": 4 * c.params_generator if gpus > 1 else 0}
    gpu = {**static, **{f"activations_{k}": v for k, v in act.items()},
           "peak_estimate": sum(static.values()) + max(act["update_fp32"], langevin_bytes * c.act_langevin * batch)}
    host = {"posterior_chains": shard * D * zb, "prior_chains": prior_chains * D * zb,
            "chain_index": (shard + prior_chains) * CHAIN_INDEX_BYTES,
            "images_uint8_and_fp32": shard * pixels * (1 + 4)}
    host["total"] = sum(host.values())
    chains_total = (images + prior_total) * D * zb
    cluster = {"chain_storage_bytes": chains_total,
               "chain_index_bytes": (images + prior_total) * CHAIN_INDEX_BYTES,
               "checkpoint_bytes": chains_total + (images + prior_total) * CHAIN_INDEX_BYTES + 12 * P}
    # FLOPs = 2·MACs. Langevin: forward + backward to z only (parameters are frozen: no weight
    # gradients) ≈ 2× forward. Parameter updates: forward + backward to inputs and weights ≈ 3×.
    pl = 1 if cfg.ablation.pseudo_label else 0
    flops = {"posterior_langevin": lv.posterior_steps * batch * 2 * 2 * (c.macs_compose + c.macs_ebm),
             "prior_langevin": lv.prior_steps * batch * 2 * 2 * c.macs_ebm,
             "generator_update": batch * 2 * (3 * (c.macs_compose + c.macs_classifiers) + pl * c.macs_ebm),
             "ebm_update": 2 * batch * 2 * 3 * c.macs_ebm}
    flops["total"] = sum(flops.values())
    effective = peak_tflops * utilisation * 1e12
    compute_s = flops["total"] / effective
    allreduce_bytes = 2 * (gpus - 1) / gpus * 4 * P            # ring all-reduce, both optimisers
    comm_s = allreduce_bytes * 8 / (network_gbps * 1e9)
    iter_s = compute_s + comm_s
    return {
        "preset": cfg.preset, "images": images, "gpus": gpus, "batch_per_worker": batch,
        "latent_dim": D, "chain_bytes_per_value": zb, "shard_images": shard, "prior_chains_per_worker": prior_chains,
        "params": {"generator": c.params_generator, "ebm": c.params_ebm, "total": P},
        "counts": asdict(c), "gpu_bytes": gpu, "host_bytes": host, "cluster": cluster,
        "flops_per_iteration": flops, "cluster_flops_per_iteration": flops["total"] * gpus,
        "assumptions": {"peak_tflops": peak_tflops, "utilisation": utilisation, "throughput_source": throughput_source,
                        "effective_tflops": effective / 1e12, "network_gbps": network_gbps,
                        "langevin_precision": "bf16" if lv.bf16 else "fp32"},
        "time": {"compute_s_per_iteration": compute_s, "allreduce_bytes_per_iteration": allreduce_bytes,
                 "allreduce_s_per_iteration": comm_s, "s_per_iteration": iter_s,
                 "iterations_per_epoch": iters_per_epoch, "epoch_compute_s": iters_per_epoch * compute_s,
                 "epoch_s": iters_per_epoch * iter_s, "configured_iterations": cfg.optim.iterations,
                 "configured_run_s": cfg.optim.iterations * iter_s,
                 "configured_epochs": cfg.optim.iterations / iters_per_epoch},
    }


def _b(n: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _t(s: float) -> str:
    return f"{s:.3g} s" if s < 120 else f"{s / 60:.3g} min" if s < 7200 else f"{s / 3600:.3g} h"


def format_table(r: dict) -> str:
    g, h, f, t = r["gpu_bytes"], r["host_bytes"], r["flops_per_iteration"], r["time"]
    a, cl, p = r["assumptions"], r["cluster"], r["params"]
    B, lp = r["batch_per_worker"], a["langevin_precision"]
    per_chain = f"× {r['latent_dim']} × {r['chain_bytes_per_value']} B"
    head = f"{r['preset']}: {r['images']:,} images on {r['gpus']} GPU workers, batch {B} per worker"
    rows = [
        ("parameters", f"{p['total']:,}", f"generators+classifiers {p['generator']:,}, LEBM {p['ebm']:,}"),
        ("GPU memory per worker", "", ""),
        ("  parameters (fp32)", _b(g["parameters_fp32"]), "4 B × parameters"),
        ("  gradients (fp32)", _b(g["gradients_fp32"]), "4 B × parameters"),
        ("  Adam state (fp32)", _b(g["adam_state_fp32"]), "exp_avg + exp_avg_sq: 8 B × parameters"),
        ("  all-reduce buffer", _b(g["allreduce_buffer_fp32"]), "flat copy of the generator gradients"),
        ("  activations, generator update", f"{_b(g['activations_update_fp32'])} fp32",
         f"(bf16: {_b(g['activations_update_bf16'])}); runs in fp32"),
        ("  activations, posterior Langevin step", f"{_b(g['activations_langevin_fp32'])} fp32",
         f"(bf16: {_b(g['activations_langevin_bf16'])}); runs in {lp}"),
        ("  activations, prior Langevin step", f"{_b(g['activations_prior_fp32'])} fp32", "LEBM only"),
        ("  peak estimate", _b(g["peak_estimate"]), "static + the larger activation set, as run"),
        ("host memory per worker", "", ""),
        ("  posterior chain shard", _b(h["posterior_chains"]), f"{r['shard_images']:,} {per_chain}"),
        ("  prior chains", _b(h["prior_chains"]), f"{r['prior_chains_per_worker']:,} {per_chain}"),
        ("  chain index", _b(h["chain_index"]), "sample id int64 + visit count int32 per chain"),
        ("  image shard", _b(h["images_uint8_and_fp32"]), "uint8 rows + float32 tensor, as train_worker holds them"),
        ("  total", _b(h["total"]), ""),
        ("cluster", "", ""),
        ("  chain storage, all workers", _b(cl["chain_storage_bytes"]), "posterior + prior chains"),
        ("  checkpoint size", _b(cl["checkpoint_bytes"]), "chains + index + model + Adam state"),
        ("FLOPs per EM iteration per worker", f"{f['total'] / 1e12:.3f} TFLOP",
         f"cluster: {r['cluster_flops_per_iteration'] / 1e15:.3f} PFLOP"),
        ("  posterior Langevin", f"{f['posterior_langevin'] / 1e12:.3f} TFLOP",
         "K₁ × B × 2 × 2·MACs(generators + LEBM): forward + backward to z"),
        ("  prior Langevin", f"{f['prior_langevin'] / 1e12:.4f} TFLOP", "K₀ × B × 2 × 2·MACs(LEBM)"),
        ("  generator update", f"{f['generator_update'] / 1e12:.4f} TFLOP",
         "B × 3 × 2·MACs(generators + classifiers) + pseudo-label LEBM forward"),
        ("  LEBM update", f"{f['ebm_update'] / 1e12:.5f} TFLOP", "2B × 3 × 2·MACs(LEBM)"),
        ("time", "", ""),
        ("  assumed throughput", f"{a['effective_tflops']:.3g} TFLOP/s",
         f"{a['peak_tflops']:.4g} TFLOP/s ({a['throughput_source']}) × {a['utilisation']:.0%} utilisation"),
        ("  compute per iteration", _t(t["compute_s_per_iteration"]), ""),
        ("  gradient all-reduce per iteration", _t(t["allreduce_s_per_iteration"]),
         f"{_b(t['allreduce_bytes_per_iteration'])} per worker (ring) at {a['network_gbps']:g} Gbit/s"),
        ("  iteration", _t(t["s_per_iteration"]), "no data loading, checkpoints or evaluation"),
        ("  iterations per epoch", f"{t['iterations_per_epoch']:,}", "images / (batch × gpus)"),
        ("  epoch", _t(t["epoch_s"]), ""),
        (f"  optim.iterations = {t['configured_iterations']:,}", _t(t["configured_run_s"]),
         f"{t['configured_epochs']:.2f} epochs"),
    ]
    w0, w1 = max(len(x[0]) for x in rows), max(len(x[1]) for x in rows)
    return "\n".join([head, *(f"{a0:<{w0}}  {a1:>{w1}}  {a2}".rstrip() for a0, a1, a2 in rows)])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=preset_names())
    p.add_argument("--images", type=_positive_int, required=True, help="training images (10_000_000 is fine)")
    p.add_argument("--gpus", type=_positive_int, required=True, help="data-parallel workers, one GPU each")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="per worker (default: the preset's optim.batch_size)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--device-tflops", type=float, default=None,
                     help=f"peak TFLOP/s of one device (default: the {MEASURED_TFLOPS:g} TFLOP/s paper-birds "
                          f"achieved on one H100, at utilisation 1)")
    src.add_argument("--measure", action="store_true", help="use this machine's measured GEMM TFLOP/s as the peak")
    p.add_argument("--utilisation", type=float, default=None,
                   help=f"fraction of the peak reached (default {PEAK_UTILISATION:g} of --device-tflops / --measure; "
                        f"1 of the default measured rate)")
    p.add_argument("--network-gbps", type=float, default=DEFAULT_NETWORK_GBPS, help="per-worker bandwidth, Gbit/s")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = get_config(args.preset, parse_override_args(args.overrides))
    except ConfigError as exc:
        parser.error(f"overrides: {exc}")
    peak, source, share = MEASURED_TFLOPS, MEASURED_SOURCE, DEFAULT_UTILISATION
    if args.device_tflops is not None:
        peak, source, share = args.device_tflops, "stated peak", PEAK_UTILISATION
    elif args.measure:
        dtype = torch.bfloat16 if cfg.langevin.bf16 else torch.float32
        peak, source = measure_tflops(dtype), f"measured {str(dtype).split('.')[-1]} GEMM on this machine"
        share = PEAK_UTILISATION
    if args.utilisation is not None:
        share = args.utilisation
    try:
        result = plan(cfg, args.images, args.gpus, batch_size=args.batch_size, peak_tflops=peak,
                      utilisation=share, network_gbps=args.network_gbps, throughput_source=source)
    except PlanError as exc:
        flag = {"peak_tflops": "device-tflops"}.get(exc.argument, exc.argument.replace("_", "-"))
        parser.error(f"argument --{flag}: {exc}")
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return result


if __name__ == "__main__":
    main()
