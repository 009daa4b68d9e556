"""Can a preset's background generator reproduce TM-dSprites textures at all? (issue 2 diagnostic)

    python -m pipelines.bench.texture_fit --preset cpu-32 --seconds 150 [--bg-dim 4] [--widths 64,32,16]

Fits the background generator alone to sprite-free backgrounds with one free latent vector per
image, learned by Adam together with the weights ("GLO"). No prior, no Langevin, no foreground
competitor: the reconstruction error it reaches bounds from below what DRC's background expert
can reach in the same number of updates. Prints L1 (images in [-1, 1]) against the flat-grey
baseline (each image predicted by its own mean), side by side in one run.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from drc_core.nets import RegionGenerator
from drc_core.presets import get_config, preset_names
from drc_core.tmds import textures


def texture_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """`tmds.textures` as grey RGB images (n, 3, S, S) in [-1, 1], the generators' range."""
    t = torch.tensor(textures(n, size=size, seed=seed), dtype=torch.float32)
    return t[:, None].expand(-1, 3, -1, -1).mul(2).sub(1).contiguous()


def fit_textures(x: torch.Tensor, *, latent_dim: int, trunk_channels: int, widths: tuple[int, ...],
                 seconds: float, batch: int = 32, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    gen = RegionGenerator(latent_dim=latent_dim, trunk_channels=trunk_channels, up_widths=widths)
    z = torch.nn.Parameter(torch.randn(x.shape[0], latent_dim))
    opt = torch.optim.Adam([{"params": gen.parameters(), "lr": 1e-3}, {"params": [z], "lr": 1e-2}])
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        ids = torch.randint(x.shape[0], (batch,))
        loss = (gen(z[ids])[0] - x[ids]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    with torch.no_grad():
        l1 = torch.cat([(gen(z[i:i + 256])[0] - x[i:i + 256]).abs().flatten(1).mean(1)
                        for i in range(0, x.shape[0], 256)]).mean()
    return {"steps": steps, "l1": float(l1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-32", choices=preset_names())
    p.add_argument("--images", type=int, default=2000, help="sprite-free backgrounds to fit")
    p.add_argument("--seconds", type=float, default=150.0, help="wall-clock budget of the fit")
    p.add_argument("--bg-dim", type=int, default=None, help="latent size (default: the preset's model.bg_dim)")
    p.add_argument("--widths", default=None, help="up-block widths, e.g. 128,64,32 (default: the preset's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m = get_config(args.preset).model
    widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else tuple(m.up_widths)
    if len(widths) != m.num_up_blocks:
        raise SystemExit(f"texture_fit: --widths needs {m.num_up_blocks} values for {m.resolution}², got {widths}")
    x = texture_images(args.images, m.resolution)
    flat = float((x - x.mean((1, 2, 3), keepdim=True)).abs().mean())
    res = fit_textures(x, latent_dim=args.bg_dim or m.bg_dim, trunk_channels=m.trunk_channels,
                       widths=widths, seconds=args.seconds)
    out = {"preset": args.preset, "resolution": m.resolution, "bg_dim": args.bg_dim or m.bg_dim,
           "widths": widths, "images": args.images, "seconds": args.seconds, **res,
           "flat_grey_l1": flat, "l1_over_flat": res["l1"] / flat}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
