"""Search spaces as data: `tune_spaces/<study>.yaml` → Ray Tune distributions, checked first.

    description: what the study asks
    params:
      langevin.posterior_step_size: {type: loguniform, low: 0.03, high: 0.3}
      langevin.posterior_steps:      {type: choice, values: [10, 20, 30]}
      loss.tv_weight:                {type: uniform, low: 0.0, high: 0.05}
      langevin.prior_steps:          {type: randint, low: 20, high: 80}     # both ends included
      ablation.tv:                   {type: grid, values: [true, false]}    # every value (random search)

Every key must be a field of the typed config (`section.key`), every bound or value must be a
legal value of that field (checked through the config's own validation), and each distribution
must be well formed; any error names the file and the parameter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from drc_core.config import ConfigError, DRCConfig, apply_overrides

TYPES = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "randint": ("low", "high"),
         "choice": ("values",), "grid": ("values",)}


class SpaceError(ValueError):
    pass


def resolve(space: str | Path) -> Path:
    """A study file: the path as given if it exists, else one of the shipped studies
    (`tune_spaces/quick.yaml`, `quick.yaml` or `quick`), wherever the command runs from."""
    path = Path(space)
    if path.exists():
        return path
    from importlib.resources import files
    shipped = files("tune_spaces")
    for name in (path.name, f"{path.name}.yaml"):
        candidate = shipped / name
        if candidate.is_file():
            return Path(str(candidate))
    return path


def shipped() -> list[str]:
    from importlib.resources import files
    return sorted(p.name for p in files("tune_spaces").iterdir() if p.name.endswith(".yaml"))


def load(path: str | Path, base: DRCConfig) -> dict[str, dict]:
    """Read and check a study file; returns {param: spec}."""
    import yaml
    path = resolve(path)
    if not path.exists():
        raise SpaceError(f"{path}: no such search-space file (shipped studies: {', '.join(shipped())})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict) or not doc["params"]:
        raise SpaceError(f"{path}: needs a non-empty 'params' mapping")
    unknown = set(doc) - {"description", "params"}
    if unknown:
        raise SpaceError(f"{path}: unknown top-level key(s) {sorted(unknown)} (allowed: description, params)")
    fields = base.flat()
    for name, spec in doc["params"].items():
        where = f"{path}: parameter {name!r}"
        if name not in fields:
            raise SpaceError(f"{where} is not a config field (e.g. langevin.posterior_step_size)")
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise SpaceError(f"{where}: 'type' must be one of {sorted(TYPES)}, got {spec!r}")
        kind, need = spec["type"], TYPES[spec["type"]]
        extra = set(spec) - {"type", *need}
        if extra or any(k not in spec for k in need):
            raise SpaceError(f"{where}: a {kind} distribution takes exactly {list(need)}, got {sorted(set(spec) - {'type'})}")
        if "values" in need:
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise SpaceError(f"{where}: 'values' must be a non-empty list")
            samples = spec["values"]
        else:
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                raise SpaceError(f"{where}: low and high must be numbers, got {low!r}, {high!r}")
            if not low < high:
                raise SpaceError(f"{where}: low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
            if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
                raise SpaceError(f"{where}: randint bounds must be integers")
            samples = [low, high]
        for value in samples:
            try:
                apply_overrides(base, {name: value})
            except ConfigError as e:
                raise SpaceError(f"{where}: value {value!r} is not legal: {e}") from None
    return doc["params"]


def to_tune(params: dict[str, dict]) -> dict[str, Any]:
    """Ray Tune's param_space for checked params."""
    from ray import tune
    out = {}
    for name, s in params.items():
        kind = s["type"]
        if kind == "uniform":
            out[name] = tune.uniform(s["low"], s["high"])
        elif kind == "loguniform":
            out[name] = tune.loguniform(s["low"], s["high"])
        elif kind == "randint":
            out[name] = tune.randint(int(s["low"]), int(s["high"]) + 1)
        elif kind == "choice":
            out[name] = tune.choice(s["values"])
        else:
            out[name] = tune.grid_search(s["values"])
    return out


def defaults(params: dict[str, dict], base: DRCConfig) -> dict[str, Any]:
    """The preset's own values of the searched params (the study's reference trial)."""
    flat = base.flat()
    return {name: flat[name] for name in params}
