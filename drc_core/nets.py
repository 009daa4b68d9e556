"""Networks of DRC (paper Table S2), parametrised by resolution and width.

Generators map a latent vector to a 4×4 feature map and then double the resolution per
up-block until `resolution`; heads give an RGB image (tanh) and a mask logit, or a sampling grid.
"""
from __future__ import annotations

import torch
from torch import nn


def orthogonal_init(module: nn.Module, gain: float = 1.0) -> None:
    """Orthogonal initialisation (gain 1.0) of every Conv and Linear, zero biases (appendix B)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _spatial_sums(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, C) sums over H and W, accumulated in at least fp32.

    Large tensors are summed as one batched GEMM against a row of ones: on the dev CPU that is
    2–10× faster than `sum` over the strided H, W dims of a channels-last bf16 tensor (it runs
    on the matrix units) and needs no layout copy; below ~0.5M elements `sum` is faster."""
    n, c, h, w = t.shape
    acc = torch.promote_types(t.dtype, torch.float32)
    if t.numel() < 1 << 19:
        return t.sum((2, 3), dtype=acc)
    ones = t.new_ones(1, 1, h * w)
    with torch.autocast(t.device.type, enabled=False):  # sums in t's own dtype, never lowered
        if t.is_contiguous(memory_format=torch.channels_last):
            s = torch.matmul(ones, t.permute(0, 2, 3, 1).reshape(n, h * w, c))
        else:
            s = torch.matmul(t.reshape(n, c, h * w), ones.transpose(1, 2))
    return s.view(n, c).to(acc)


class _InstanceNormFn(torch.autograd.Function):
    """y = (x − μ)/√(σ² + ε)·w + b per (sample, channel), keeping x's dtype and memory layout.

    Statistics are shifted: x is first centred on its mean rounded to x's own precision (`m0`),
    and mean and variance come from sums of the centred values, so a channel with a large mean and
    a small spread loses no precision (the one-pass Σx² − (Σx)² form would). The backward is the
    closed form dx = a·(g − ḡ − x̂·mean(g·x̂)), a = w/√(σ² + ε), again from two spatial sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n = x.shape[2] * x.shape[3]
        m0 = (_spatial_sums(x) / n).to(x.dtype)[..., None, None]
        xc = x - m0
        d = _spatial_sums(xc) / n                    # μ − m0, in fp32
        var = (_spatial_sums(xc * xc) / n - d * d).clamp_min_(0)
        rstd = torch.rsqrt(var + eps)
        a = rstd * weight
        ctx.save_for_backward(xc, d, rstd, weight)
        return torch.addcmul((bias - d * a)[..., None, None].to(x.dtype), xc, a[..., None, None].to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        xc, d, rstd, weight = ctx.saved_tensors
        n = xc.shape[2] * xc.shape[3]
        sum_g = _spatial_sums(g)
        sum_g_xhat = (_spatial_sums(g * xc) - d * sum_g) * rstd
        dx = None
        if ctx.needs_input_grad[0]:
            a = rstd * weight
            p = -a * rstd * sum_g_xhat / n                # dx = a·g + p·xc + q
            q = -a * sum_g / n - p * d
            dx = torch.addcmul(q[..., None, None].to(xc.dtype), xc, p[..., None, None].to(xc.dtype))
            dx.addcmul_(g, a[..., None, None].to(xc.dtype))
        dw = sum_g_xhat.sum(0) if ctx.needs_input_grad[1] else None
        db = sum_g.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class InstanceNorm2d(nn.InstanceNorm2d):
    """`nn.InstanceNorm2d(affine=True)` (same parameters and state-dict keys) that, on CPU, keeps a
    channels-last input channels-last. PyTorch's CPU kernel returns NCHW, so every up-block paid
    layout copies around it, and its bf16 statistics are slow. On other devices (not measured
    with this version) and for configurations our nets do not use, PyTorch's kernel runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not self.affine or self.track_running_stats or x.dim() != 4:
            return super().forward(x)
        return _InstanceNormFn.apply(x, self.weight, self.bias, self.eps)


class UpBlock(nn.Sequential):
    """Bilinear ×2 → Conv3×3 (no bias) → InstanceNorm(affine) → LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            InstanceNorm2d(out_channels, affine=True),
            nn.LeakyReLU(0.01),
        )


class Generator(nn.Module):
    """Linear(D → C·4·4) + LeakyReLU(0.2), up-blocks to full resolution, a 3×3 conv head.

    `extra_channels` > 0 concatenates a (B, extra, 4, 4) map before the up-blocks (used by the
    re-assignment generator to see the background's 4×4 features).
    """

    def __init__(self, *, latent_dim: int, trunk_channels: int, up_widths: tuple[int, ...],
                 out_channels: int, extra_channels: int = 0):
        super().__init__()
        self.trunk_channels = trunk_channels
        self.fc = nn.Sequential(nn.Linear(latent_dim, trunk_channels * 16), nn.LeakyReLU(0.2))
        widths = (trunk_channels + extra_channels, *up_widths)
        self.blocks = nn.Sequential(*[UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.head = nn.Conv2d(up_widths[-1], out_channels, 3, padding=1)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D) → (B, C, 4, 4) trunk feature map."""
        return self.fc(z).view(z.shape[0], self.trunk_channels, 4, 4)

    def render(self, feat: torch.Tensor) -> torch.Tensor:
        """(B, C', 4, 4) → (B, out, H, W) raw head output."""
        return self.head(self.blocks(feat))


class RegionGenerator(Generator):
    """Foreground or background generator: RGB image in [-1, 1] and a mask logit."""

    def __init__(self, **kwargs):
        super().__init__(out_channels=4, **kwargs)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat = self.features(z)                          # (B, C, 4, 4)
        out = self.render(feat)                          # (B, 4, H, W)
        return torch.tanh(out[:, :3]), out[:, 3:], feat  # image, mask logit, 4×4 features


class ReassignGenerator(Generator):
    """Pixel re-assignment: a sampling grid (B, H, W, 2) in [-1, 1] from z_s and bg features."""

    def __init__(self, *, bg_channels: int, **kwargs):
        super().__init__(out_channels=2, extra_channels=bg_channels, **kwargs)

    def forward(self, z: torch.Tensor, bg_feat: torch.Tensor) -> torch.Tensor:
        feat = torch.cat([self.features(z), bg_feat.detach()], dim=1)
        return torch.tanh(self.render(feat)).permute(0, 2, 3, 1)


def _mlp(sizes: list[int], slope: float = 0.2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class LatentEBM(nn.Module):
    """Latent-space EBM with symbol-vector coupling.

    f_α(z) = logsumexp(fg logits) + logsumexp(bg logits) + s(z_s); the prior is
    p_α(z) ∝ exp(f_α(z))·N(z; 0, I). Higher f means more probable (our one sign convention).
    """

    def __init__(self, *, fg_dim: int, bg_dim: int, reassign_dim: int, fg_classes: int,
                 bg_classes: int, hidden: int, reassign_hidden: int, use_reassign: bool = True):
        super().__init__()
        self.dims = (fg_dim, bg_dim, reassign_dim)
        self.fg = _mlp([fg_dim, hidden, hidden, fg_classes])
        self.bg = _mlp([bg_dim, hidden, hidden, bg_classes])
        self.reassign = (_mlp([reassign_dim, reassign_hidden, reassign_hidden, reassign_hidden, 1])
                         if use_reassign else None)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D) → f_α (B,), fg logits (B, K_f), bg logits (B, K_b)."""
        zf, zb, zs = z.split(self.dims, dim=1)
        fg_logits, bg_logits = self.fg(zf), self.bg(zb)
        f = torch.logsumexp(fg_logits, dim=1) + torch.logsumexp(bg_logits, dim=1)
        if self.reassign is not None:
            f = f + self.reassign(zs).squeeze(1)
        return f, fg_logits, bg_logits


class AuxClassifier(nn.Module):
    """Pseudo-label classifier: n × [Conv4×4 s2 → InstanceNorm → LeakyReLU(0.2)] → conv to K logits."""

    def __init__(self, *, resolution: int, widths: tuple[int, ...], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for w in widths:
            layers += [nn.Conv2d(in_ch, w, 4, stride=2, padding=1, bias=False),
                       InstanceNorm2d(w, affine=True), nn.LeakyReLU(0.2)]
            in_ch = w
        side = resolution >> len(widths)  # 4
        layers.append(nn.Conv2d(in_ch, num_classes, side))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).flatten(1)  # (B, K)


def count_macs(module: nn.Module, run) -> int:
    """Multiply-accumulates of the Conv2d/Linear layers of `module` while `run()` executes."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        per_output = m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()
        total += out.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return total
