"""Typed configuration for DRC: one dataclass per component, composed by `DRCConfig`.

Defaults are the paper's (Yu et al. 2021, appendix B, Tables S1/S2); presets in
`drc_core.presets` override them. Overrides use dotted keys (`langevin.posterior_steps=20`);
an unknown key or a value that cannot work is an error naming the field.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value that is unknown or cannot work; the message names the field."""


@dataclass
class ModelConfig:
    resolution: int = 128                      # square images, a power of two ≥ 8
    fg_dim: int = 256                          # D_f (Table S1)
    bg_dim: int = 256                          # D_b
    reassign_dim: int = 512                    # D_s
    fg_classes: int = 200                      # K_f of the symbol-vector LEBM
    bg_classes: int = 200                      # K_b
    trunk_channels: int = 128                  # Linear(D -> C·4·4)
    up_widths: tuple[int, ...] = (1024, 512, 256, 128, 64)  # one per ×2 up-block (Table S2)
    ebm_hidden: int = 200                      # fg/bg LEBM MLP width
    ebm_reassign_hidden: int = 200             # re-assignment LEBM MLP width (Table S2: 3×200)
    classifier_widths: tuple[int, ...] = (64, 128, 256, 512, 1024)  # auxiliary classifiers
    center_prior: float = 0.0                  # s > 0 (beyond the paper): a fixed centre-bias prior on the
                                               # mask, s·max(1 − (r/ρ)², −1) added to the foreground logit
    center_radius: float = 0.6                 # ρ: where that prior is neutral (r: distance from the centre,
                                               # 1 at the middle of each edge)

    @property
    def latent_dim(self) -> int:
        return self.fg_dim + self.bg_dim + self.reassign_dim

    @property
    def num_up_blocks(self) -> int:
        return self.resolution.bit_length() - 3    # 4·2^n = resolution


@dataclass
class LangevinConfig:
    posterior_steps: int = 40                  # K₁
    posterior_step_size: float = 0.1           # δ₁
    prior_steps: int = 60                      # K₀
    prior_step_size: float = 0.4               # δ₀
    test_steps: int = 5000                     # fresh posterior chains at test time
    test_average: int = 0                      # >0: π_f averaged over the last N test steps (a posterior
                                               # mean of π_f instead of one sample; beyond the paper)
    prior_pool_size: int = 0                   # 0: one prior chain per image (paper); >0: shared pool
    persistent: bool = True                    # False: short-run chains from N(0, I) (ablation)
    bf16: bool = True                          # bf16 autocast of the generators inside Langevin (z stays fp32),
                                               # where the device runs bf16 natively (langevin.bf16_is_fast)
    divergence_threshold: float = 1e4          # |z| beyond this marks a chain as diverged
    chain_fp16: bool = False                   # store persistent chains in fp16 (half the memory)


@dataclass
class LossConfig:
    sigma: float = 0.25                        # Laplace expert scale: log p = -|g - x| / (2σ²)
    responsibility: str = "pixel"              # "pixel" (paper Eq. 7) or "channel" (public code)
    tv_weight: float = 0.01                    # on the re-assigned background image
    pseudo_label_weight: float = 0.1           # H(P_k, Q_k), k = fg, bg
    ortho_weight: float = 1.0                  # λ_⊥ (0.1 on Birds)
    # Beyond the paper (0 / 1 = off, as in every paper-* preset; docs/quality.md has the measurements):
    area_weight: float = 0.0                   # λ_A·mean(π_f) added to the generator loss: a foreground-area prior
    competition_window: int = 1                # k > 1 (odd): γ from the fg−bg log-likelihood ratio averaged
                                               # over k×k neighbourhoods (regions compete, not single pixels)


@dataclass
class OptimConfig:
    batch_size: int = 48
    iterations: int = 10_000
    gen_lr: float = 1e-4                       # generators + re-assignment + classifiers
    ebm_lr: float = 2e-5                       # LEBM
    beta1: float = 0.5
    beta2: float = 0.999
    grad_clip: float = 0.0                     # 0: off (the paper does not clip)


@dataclass
class AblationConfig:
    """Switches for the paper's Table 2 (the amortised-encoder row is not built: it 'fails')."""
    pixel_reassign: bool = True
    pseudo_label: bool = True
    tv: bool = True
    ortho: bool = True


@dataclass
class DataConfig:
    dataset: str = "tm-dsprites"
    train_size: int = 20_000
    test_size: int = 1_000
    sprite_size: tuple[float, float] = (0.15, 0.30)   # fraction of S (spec/tm-dsprites.md)
    bank_seed: int = 0


@dataclass
class DRCConfig:
    preset: str = "paper-tmds"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "DRCConfig":
        m, lv, ls = self.model, self.langevin, self.loss
        r = m.resolution
        if r < 8 or r & (r - 1):
            raise ConfigError(f"model.resolution must be a power of two >= 8, got {r}")
        if len(m.up_widths) != m.num_up_blocks:
            raise ConfigError(f"model.up_widths needs {m.num_up_blocks} entries for resolution {r}, "
                              f"got {len(m.up_widths)}")
        if len(m.classifier_widths) != m.num_up_blocks:
            raise ConfigError(f"model.classifier_widths needs {m.num_up_blocks} entries for "
                              f"resolution {r}, got {len(m.classifier_widths)}")
        for name in ("fg_dim", "bg_dim", "reassign_dim", "fg_classes", "bg_classes", "trunk_channels"):
            if getattr(m, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(m, name)}")
        if m.center_prior < 0 or not m.center_radius > 0:
            raise ConfigError(f"model.center_prior must be >= 0 and model.center_radius > 0, got "
                              f"{m.center_prior} and {m.center_radius}")
        for name in ("posterior_step_size", "prior_step_size"):
            if not getattr(lv, name) > 0:
                raise ConfigError(f"langevin.{name} must be > 0, got {getattr(lv, name)}")
        for name in ("posterior_steps", "prior_steps", "test_steps", "test_average", "prior_pool_size"):
            if getattr(lv, name) < 0:
                raise ConfigError(f"langevin.{name} must be >= 0, got {getattr(lv, name)}")
        if not ls.sigma > 0:
            raise ConfigError(f"loss.sigma must be > 0, got {ls.sigma}")
        if ls.responsibility not in ("pixel", "channel"):
            raise ConfigError(f"loss.responsibility must be 'pixel' or 'channel', got {ls.responsibility!r}")
        if ls.competition_window < 1 or ls.competition_window % 2 == 0:
            raise ConfigError(f"loss.competition_window must be an odd integer >= 1, got {ls.competition_window}")
        for name in ("tv_weight", "pseudo_label_weight", "ortho_weight", "area_weight"):
            if getattr(ls, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(ls, name)}")
        if self.optim.batch_size <= 0:
            raise ConfigError(f"optim.batch_size must be positive, got {self.optim.batch_size}")
        for name in ("gen_lr", "ebm_lr"):
            if not getattr(self.optim, name) > 0:
                raise ConfigError(f"optim.{name} must be > 0, got {getattr(self.optim, name)}")
        return self

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """`{"langevin.posterior_steps": 40, ...}`: for MLflow params and search spaces."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DRCConfig":
        return apply_overrides(cls(), data, nested=True)


def _coerce(path: str, current: Any, value: Any) -> Any:
    """Convert `value` to the type of the field at `path` (strings come from the CLI)."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path} expects true/false, got {value!r}")
    if isinstance(current, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        elem_type = type(current[0]) if current else float
        try:
            return tuple(elem_type(v) for v in items)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path} expects a list of {elem_type.__name__}, got {value!r}") from exc
    for typ in (int, float, str):
        if isinstance(current, typ):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{path} expects an integer, got {value!r}")
            try:
                return typ(float(value)) if typ is int and isinstance(value, str) and "e" in value.lower() \
                    else typ(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path} expects {typ.__name__}, got {value!r}") from exc
    return value


def apply_overrides(cfg: DRCConfig, overrides: Mapping[str, Any], *, nested: bool = False) -> DRCConfig:
    """Return a copy of `cfg` with dotted-key (or nested-dict) overrides applied and validated."""
    cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name))
                                      for f in dataclasses.fields(cfg)
                                      if dataclasses.is_dataclass(getattr(cfg, f.name))})
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if nested and isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    for key, value in flat.items():
        parts = key.split(".")
        target: Any = cfg
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
                raise ConfigError(f"unknown config section {key!r}")
            target = getattr(target, part)
        leaf = parts[-1]
        names = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
        if leaf not in names or dataclasses.is_dataclass(getattr(target, leaf)):
            raise ConfigError(f"unknown config key {key!r}")
        setattr(target, leaf, _coerce(key, getattr(target, leaf), value))
    return cfg.validate()


def read_override_file(path) -> dict:
    """A run file (`--config run.yaml`): a YAML mapping of dotted keys (`langevin.posterior_steps: 20`)
    or of sections (`langevin: {posterior_steps: 20}`) → dict of dotted keys. Values keep their YAML
    types; apply_overrides checks them like any other override."""
    import yaml
    from pathlib import Path
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a mapping of section.key: value, got {type(doc).__name__}")
    out: dict = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                walk(name, value)
            else:
                out[name] = tuple(value) if isinstance(value, list) else value
    walk("", doc)
    return out


def merged_overrides(config_file, args: list[str]) -> dict:
    """`--config FILE` first, then the command line's section.key=value, which win."""
    return {**(read_override_file(config_file) if config_file else {}), **parse_override_args(args)}


def parse_override_args(args: list[str]) -> dict[str, str]:
    """`["langevin.posterior_steps=20", "--loss.sigma=0.3"]` -> dict of dotted keys."""
    out: dict[str, str] = {}
    for arg in args:
        arg = arg[2:] if arg.startswith("--") else arg
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like section.key=value")
        key, value = arg.split("=", 1)
        out[key] = value
    return out
