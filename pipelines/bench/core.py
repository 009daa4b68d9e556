"""`python -m pipelines.bench core`: EM-iteration and Langevin speed of drc_core on one device.

    python -m pipelines.bench core [--presets paper-tmds:8 cpu-64:32] [--iterations 1]
    python -m pipelines.bench core --device cuda --presets paper-birds:48 cpu-32:32 --iterations 3 --profile

Per preset and batch size: seconds per EM iteration, seconds per posterior Langevin step per image,
images/s, peak device memory, and the achieved FLOP/s of the Langevin loop against the GEMM and
conv peaks measured on the same device in the same process — for our fast path (bf16 autocast in
Langevin where the device runs it natively), for the same code in plain fp32, and for variants that
undo our layer choices (`VARIANTS`). `--profile` adds a table of the most expensive kernels of one
EM iteration of each preset's fast path. Feed a measured rate to `pipelines.plan --device-tflops`.
"""
from __future__ import annotations

import json
import platform
import time

import torch
import torch.nn.functional as F

from drc_core.fit import TrainState
from drc_core.langevin import posterior_energy, prior_energy
from drc_core.nets import InstanceNorm2d, count_macs
from drc_core.presets import get_config


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timeit(fn, repeat: int, warmup: int = 1, device: str = "cpu") -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def _gflops(flops: float, fn, seconds: float, device: str) -> float:
    n = max(1, int(seconds / max(_timeit(fn, 1, device=device), 1e-4)))
    return flops / _timeit(fn, n, device=device) / 1e9


def _peak(flops, run, sizes, seconds: float, device: str) -> float:
    """GFLOP/s of `run(size)` at the largest of `sizes` (ascending) whose one call, at the rate
    measured on the size before it, takes under `seconds`: a path the device only emulates (bf16 on
    a CPU without native bf16 runs at < 1 GFLOP/s) is measured on a small problem in seconds instead
    of a large one in minutes, a fast path on the full-size problem."""
    rate = None
    for size in sizes:
        if rate is not None and flops(size) / (rate * 1e9) > seconds:
            break
        rate = _gflops(flops(size), run(size), seconds, device)
    return rate


def measure_peaks(seconds: float = 2.0, device: str = "cpu") -> dict[str, float]:
    """GFLOP/s of a large GEMM (fp32, bf16) and of a generator-sized 3×3 conv (fp32, bf16) on `device`.

    The conv peak (`conv_<dtype>`) is the faster of the NCHW and NHWC layouts (both also reported):
    the bar our Langevin loop is measured against is the best this device does on such a conv.
    Problem sizes grow while a call stays under `seconds` (`_peak`): 2048² GEMM and a batch of 8
    64×64 maps on a CPU (8192², 64 maps on CUDA) wherever the device runs them at full speed."""
    out = {}
    cuda = device.startswith("cuda")
    gemm_sizes = (2048, 4096, 8192) if cuda else (256, 512, 1024, 2048)
    conv_sizes = ((8, 64), (64, 64)) if cuda else ((1, 16), (1, 32), (2, 64), (8, 64))     # (batch, side)
    w = torch.randn(128, 256, 3, 3, device=device)

    def gemm_flops(n):
        return 2 * n ** 3

    def conv_flops(size):
        batch, side = size
        return 2 * batch * 128 * side * side * 256 * 9

    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        def gemm(n, dtype=dtype):
            a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
            return lambda: a @ b
        out[f"gemm_{name}"] = _peak(gemm_flops, gemm, gemm_sizes, seconds, device)
        for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            ww = w.to(dtype, memory_format=fmt)

            def conv(size, dtype=dtype, fmt=fmt, ww=ww):
                xx = torch.randn(size[0], 256, size[1], size[1], device=device).to(dtype, memory_format=fmt)
                return lambda: F.conv2d(xx, ww, padding=1)
            out[f"conv_{name}_{layout}"] = _peak(conv_flops, conv, conv_sizes, seconds, device)
        out[f"conv_{name}"] = max(out[f"conv_{name}_nchw"], out[f"conv_{name}_nhwc"])
    return out


def langevin_flops_per_image(state: TrainState) -> float:
    """FLOPs of one posterior Langevin step for one image: generator forward (counted MACs × 2)
    plus the input-gradient backward (same MACs again); the LEBM MLPs are included."""
    model, dim = state.model, state.cfg.model.latent_dim
    z = torch.randn(1, dim, device=state.device)
    macs = count_macs(model, lambda: (model.compose(z), model.ebm(z)))
    return 2.0 * 2.0 * macs


# Variants timed beside our fast path, each undoing one of its measured choices: PyTorch's own
# InstanceNorm2d (which returns NCHW, so every up-block pays layout copies around it), and that plus
# NCHW conv weights (the model as it was before either change).
VARIANTS = {"ours": "our InstanceNorm2d, NHWC weights",
            "torch-norm": "nn.InstanceNorm2d, NHWC weights",
            "torch-norm-nchw": "nn.InstanceNorm2d, NCHW weights"}


def _with_torch_instance_norm(model: torch.nn.Module) -> None:
    """Swap every `drc_core.nets.InstanceNorm2d` for `nn.InstanceNorm2d` with the same parameters."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, InstanceNorm2d):
                stock = torch.nn.InstanceNorm2d(child.num_features, eps=child.eps, affine=True)
                stock.load_state_dict(child.state_dict())
                setattr(module, name, stock.to(next(child.parameters()).device))


def _kernel_table(state: TrainState, x: torch.Tensor, ids: torch.Tensor, device: str, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        state.step(x, ids)
        _sync(device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40)


def bench_preset(preset: str, batch: int, iterations: int, *, bf16: bool, step_repeat: int,
                 variant: str = "ours", device: str = "cpu", profile: bool = False) -> dict:
    """`variant` (one of VARIANTS) undoes our layer choices for a side-by-side measurement."""
    cfg = get_config(preset, {"optim.batch_size": batch, "langevin.bf16": bf16})
    state = TrainState.create(cfg, batch, device=device)
    if variant != "ours":
        _with_torch_instance_norm(state.model)
    if variant == "torch-norm-nchw":
        state.model.to(memory_format=torch.contiguous_format)
    res = cfg.model.resolution
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    ids = torch.arange(batch)
    z = torch.randn(batch, cfg.model.latent_dim, device=device)

    def posterior_step():
        v = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(posterior_energy(state.model, x, v, cfg).sum(), v)
        return g

    def prior_step():
        v = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(prior_energy(state.model, v).sum(), v)
        return g

    t_post = _timeit(posterior_step, step_repeat, device=device)
    t_prior = _timeit(prior_step, step_repeat * 5, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    state.step(x, ids)                                      # warm-up (allocator, kernel selection)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        state.step(x, ids)
    _sync(device)
    t_iter = (time.perf_counter() - t0) / iterations
    flops_step = langevin_flops_per_image(state) * batch
    langevin_s = cfg.langevin.posterior_steps * t_post
    row = {
        "preset": preset, "batch": batch, "device": device,
        "precision": "bf16-langevin" if bf16 else "fp32", "variant": variant,
        "s_per_iteration": t_iter,
        "s_per_posterior_step_per_image": t_post / batch,
        "images_per_s": batch / t_iter,
        "langevin_share_of_iteration": langevin_s / t_iter,
        "prior_langevin_s": cfg.langevin.prior_steps * t_prior,
        "langevin_gflops": flops_step / t_post / 1e9,
        "gflop_per_posterior_step_per_image": flops_step / batch / 1e9,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.startswith("cuda") else None,
    }
    if profile:
        print(f"{preset}:{batch} on {device}, one EM iteration, top kernels:\n"
              + _kernel_table(state, x, ids, device), flush=True)
    return row


def core(args) -> list[dict]:
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench core: --device {device}, but this torch ({torch.__version__}) sees no CUDA device "
                         f"(CPU build, or no GPU here); cluster/README.md says how to install the CUDA build")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else (platform.processor()
                                                                                 or platform.machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}: {name}")
    peaks = measure_peaks(args.peak_seconds, device=device)
    print("peaks (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    rows = []
    for spec in args.presets:
        preset, _, batch = spec.partition(":")
        for bf16, variant in ((True, "ours"), (True, "torch-norm"), (True, "torch-norm-nchw"), (False, "ours")):
            r = bench_preset(preset, int(batch or 8), args.iterations, bf16=bf16, step_repeat=args.step_repeat,
                             variant=variant, device=device, profile=args.profile and bf16 and variant == "ours")
            peak = peaks["conv_bf16" if bf16 else "conv_fp32"]
            r["fraction_of_conv_peak"] = r["langevin_gflops"] / peak
            r["fraction_of_bf16_conv_peak"] = r["langevin_gflops"] / peaks["conv_bf16"]
            r["fraction_of_bf16_gemm_peak"] = r["langevin_gflops"] / peaks["gemm_bf16"]
            rows.append(r)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
        fast, *others, slow = rows[-4:]

        def ratio(r, key):
            return r[key] / fast[key]
        print(f"{preset} batch {batch} on {device}: bf16 fast path ({VARIANTS['ours']}) is "
              f"{ratio(slow, 's_per_iteration'):.2f}× the fp32 path per EM iteration; "
              + "; ".join(f"{ratio(r, 's_per_iteration'):.2f}× faster per EM iteration "
                          f"({ratio(r, 's_per_posterior_step_per_image'):.2f}× per posterior step) than with "
                          f"{VARIANTS[r['variant']]}" for r in others)
              + f"; Langevin at {fast['langevin_gflops'] / 1e3:.2f} TFLOP/s = "
              f"{fast['fraction_of_bf16_conv_peak']:.0%} of the bf16 conv peak, "
              f"{fast['fraction_of_bf16_gemm_peak']:.0%} of the bf16 GEMM peak measured here; "
              f"{1000 * fast['s_per_iteration'] / 3600:.2f} h per 1,000 iterations")
        if preset == "paper-tmds":
            # the authors' script is not run here, and its time depends on the CPU as much as ours
            # does: a ratio against a figure from another machine would be meaningless
            print("  the paper's reference implementation is not measured by this benchmark: compare it with "
                  "these figures only when both ran on one machine (spec/drc-algorithm.md)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "device_name": name, "peaks": peaks, "rows": rows}, f, indent=2)
    return rows


def add_parser(sub) -> None:
    c = sub.add_parser("core", help="drc_core EM iteration / Langevin step speed on one device")
    c.set_defaults(run=core)
    c.add_argument("--presets", nargs="+", default=["paper-tmds:8", "cpu-64:32"], help="preset:batch")
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    c.add_argument("--iterations", type=int, default=1, help="full EM iterations timed per preset (after a warm-up)")
    c.add_argument("--step-repeat", type=int, default=3, help="posterior steps timed per preset")
    c.add_argument("--peak-seconds", type=float, default=2.0,
                   help="time per peak measurement (longer: steadier peaks; default %(default)s)")
    c.add_argument("--profile", action="store_true", help="also print the top kernels of one EM iteration")
    c.add_argument("--json", default=None, help="also write the results here")
