"""One EM iteration of DRC (Algorithm 1): sample z⁺ and z⁻, update generators, then the LEBM."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from drc_core.config import DRCConfig
from drc_core.langevin import LossWeights, prior_energy, reset_diverged, sample_posterior, sample_prior
from drc_core.model import DRCModel, to_image_layout
from drc_core.objective import (orthogonal_penalty, pseudo_label_loss, region_competition,
                                total_variation)


@dataclass
class Optimizers:
    generator: torch.optim.Optimizer     # generators + re-assignment + classifiers (lr 1e-4)
    ebm: torch.optim.Optimizer           # LEBM (lr 2e-5)

    @classmethod
    def create(cls, model: DRCModel, cfg: DRCConfig) -> "Optimizers":
        o = cfg.optim
        betas = (o.beta1, o.beta2)
        return cls(generator=torch.optim.Adam(model.generator_parameters(), lr=o.gen_lr, betas=betas),
                   ebm=torch.optim.Adam(model.ebm.parameters(), lr=o.ebm_lr, betas=betas))

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "ebm": self.ebm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.ebm.load_state_dict(state["ebm"])


def generator_loss(model: DRCModel, x: torch.Tensor, z_pos: torch.Tensor, cfg: DRCConfig,
                   ebm_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_G = −Q/D + w_TV·TV/D + w_PL·(H_f + H_b) + w_⊥·R_⊥ + λ_A·mean(π_f) (means over the batch)."""
    w = LossWeights.from_config(cfg)
    comp = model.compose(z_pos)
    rc = region_competition(x, comp, sigma=cfg.loss.sigma, responsibility=cfg.loss.responsibility,
                            window=cfg.loss.competition_window)
    num_values = x[0].numel()
    loss = -rc.q.mean() / num_values
    parts = {"q_per_value": rc.q.mean().detach() / num_values}
    if w.tv:
        tv = total_variation(comp.bg_warped).mean() / num_values
        loss = loss + w.tv * tv
        parts["tv"] = tv.detach()
    if w.pseudo_label:
        if ebm_logits is None:
            with torch.no_grad():
                _, fg_logits, bg_logits = model.ebm(z_pos)
        else:
            fg_logits, bg_logits = ebm_logits
        fg_region = comp.fg * torch.sigmoid(comp.fg_logit)       # (B, 3, H, W)
        bg_region = comp.bg * torch.sigmoid(comp.bg_logit)
        pl = (pseudo_label_loss(fg_logits, model.fg_classifier(fg_region))
              + pseudo_label_loss(bg_logits, model.bg_classifier(bg_region)))
        loss = loss + w.pseudo_label * pl
        parts["pseudo_label"] = pl.detach()
    if cfg.loss.area_weight:
        area = comp.pi_f.mean()
        loss = loss + cfg.loss.area_weight * area
        parts["area_prior"] = area.detach()
    if w.ortho:
        ortho = orthogonal_penalty([model.fg_gen, model.bg_gen])
        loss = loss + w.ortho * ortho
        parts["ortho"] = ortho.detach()
    with torch.no_grad():
        parts["recon_l1"] = (comp.recon - x).abs().mean()
        parts["mask_area"] = (comp.log_pi[:, 0] > -0.6931471805599453).float().mean()  # π_f > ½
    return loss, parts


def ebm_loss(model: DRCModel, z_pos: torch.Tensor, z_neg: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Maximum likelihood for the LEBM: raise f at posterior samples, lower it at prior samples."""
    f_pos, fg_logits, bg_logits = model.ebm(z_pos)
    f_neg, _, _ = model.ebm(z_neg)
    loss = f_neg.mean() - f_pos.mean()
    return loss, {"f_pos": f_pos.mean().detach(), "f_neg": f_neg.mean().detach()}


def em_step(model: DRCModel, opt: Optimizers, x: torch.Tensor, z_pos: torch.Tensor,
            z_neg: torch.Tensor, cfg: DRCConfig, *, generator: torch.Generator | None = None,
            sync_grads: Callable[[list[torch.nn.Parameter]], None] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """x (B, 3, H, W) in [-1, 1]; z_pos (B, D) posterior chains; z_neg (B', D) prior chains.

    Returns the advanced chains and scalar metrics. Chains that diverge are reset to N(0, I)
    and counted in `chains_reset`. `sync_grads(params)` runs between each backward pass and its
    optimiser step (data-parallel training averages the gradients across processes there).
    """
    lv = cfg.langevin
    model.train()
    x = to_image_layout(x)                   # once for the E-step's Langevin and the M-step
    z_pos = sample_posterior(model, x, z_pos, cfg, generator=generator)
    z_neg = sample_prior(model, z_neg, cfg, generator=generator)
    z_pos, bad_pos = reset_diverged(z_pos, lv.divergence_threshold, generator)
    z_neg, bad_neg = reset_diverged(z_neg, lv.divergence_threshold, generator)

    opt.generator.zero_grad(set_to_none=True)
    g_loss, parts = generator_loss(model, x, z_pos, cfg)
    g_loss.backward()
    if sync_grads is not None:
        sync_grads(list(model.generator_parameters()))
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.generator_parameters(), cfg.optim.grad_clip)
    opt.generator.step()

    opt.ebm.zero_grad(set_to_none=True)
    e_loss, e_parts = ebm_loss(model, z_pos, z_neg)
    e_loss.backward()
    if sync_grads is not None:
        sync_grads(list(model.ebm.parameters()))
    opt.ebm.step()

    with torch.no_grad():
        prior_u = prior_energy(model, z_neg).mean()
    metrics = {"gen_loss": g_loss.detach(), "ebm_loss": e_loss.detach(), "prior_energy": prior_u,
               **parts, **e_parts}
    out = {k: float(v) for k, v in metrics.items()}
    out["chains_reset"] = float(bad_pos.sum() + bad_neg.sum())
    return z_pos, z_neg, out
