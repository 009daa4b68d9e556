"""Loading a trained model from any reference a user holds, as one `Segmenter` interface.

A reference is one of:
- a training checkpoint folder (`runs/ray/<name>/checkpoint_000300`: state.pt + config.json +
  chain shards) — a DRC model, whose persistent chains `--from-chains` can continue;
- a weights file: `model.pt` (DRC: {"config", "model"}) or `student.pt` (the distilled
  segmenter: {"kind": "amortized", "config", "student", "state"});
- an MLflow model URI (`runs:/<id>/model`, `models:/<name>/<version>`, …) of either kind.

Everything is read with `pipelines.lib.checkpoints.safe_load` (`torch.load(weights_only=True)`): a
file holding pickled objects other than tensors, numbers and strings is refused with ModelError
naming it, and no pickled code runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from drc_core.config import DRCConfig

AMORTIZED, LANGEVIN = "amortized", "langevin"


class ModelError(ValueError):
    pass


SYNTHETIC = ("tm-dsprites", "clevr-masks")     # benchmarks whose objects may touch the frame
REFINE = ("auto", "grabcut", "off")


def resolve_refine(arg: str, model) -> bool:
    """--refine (distill, segment) → whether masks are re-drawn by GrabCut started from the model's
    partition: 'auto' refines for a model trained on photos, not on the synthetic benchmarks."""
    if arg not in REFINE:
        raise ModelError(f"--refine {arg!r}: expected one of {', '.join(REFINE)}")
    return model.cfg.data.dataset not in SYNTHETIC if arg == "auto" else arg == "grabcut"


@dataclass
class Segmenter:
    kind: str                                    # "langevin" (DRC) or "amortized" (student)
    cfg: DRCConfig                               # the teacher's config (resolution, test steps)
    net: torch.nn.Module
    source: str
    checkpoint: str | None = None                # a training checkpoint (folder or URI): its chains are readable
    meta: dict = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return self.cfg.model.resolution

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "Segmenter":
        self.net.to(device)
        return self

    def segment(self, images: np.ndarray, sample_ids: np.ndarray, *, steps: int | None = None, seed: int = 0,
                z_init: torch.Tensor | None = None, batch_size: int = 64) -> dict[str, np.ndarray]:
        """uint8 images (N, H, W, 3) → {"prob": (N, H, W) float32 π_f, "recon_l1": (N,) or None}."""
        if self.kind == AMORTIZED:
            from drc_core.amortized import predict
            return {"prob": predict(self.net, images, batch_size=max(batch_size, 256)).numpy(), "recon_l1": None}
        from drc_core.inference import segment
        seg = segment(self.net, images, self.cfg, steps=steps, seed=seed, sample_ids=sample_ids,
                      z_init=z_init, batch_size=batch_size)
        return {"prob": seg.prob.numpy(), "recon_l1": seg.recon_l1.numpy()}


def save_student(path: str | Path, cfg: DRCConfig, student) -> Path:
    torch.save({"kind": AMORTIZED, "config": cfg.to_dict(), "student": student.cfg.to_dict(),
                "state": {k: v.detach().cpu() for k, v in student.state_dict().items()}}, path)
    return Path(path)


def save_drc(path: str | Path, cfg: DRCConfig, model_state: dict) -> Path:
    """model.pt: the resolved config + DRC model weights (what `load` and the pyfunc read), on the
    CPU whatever device trained them, so that any machine can load it."""
    torch.save({"config": cfg.to_dict(), "model": {k: v.detach().cpu() for k, v in model_state.items()}}, path)
    return Path(path)


def _from_weights(path, source: str) -> Segmenter:
    from pipelines.lib import locations
    from pipelines.lib.checkpoints import CheckpointError, safe_load
    try:
        data = locations.read_bytes(str(path)) if locations.is_uri(str(path)) else None
        saved = safe_load(path, data=data)
    except CheckpointError as exc:
        raise ModelError(f"{source}: cannot load model weights: {exc}") from None
    if not isinstance(saved, dict) or "config" not in saved:
        raise ModelError(f"{source}: {path} holds no DRC config: not a model.pt or student.pt")
    cfg = DRCConfig.from_dict(saved["config"])
    if saved.get("kind") == AMORTIZED:
        from drc_core.amortized import StudentConfig, UNet
        net = UNet(StudentConfig(**saved["student"]))
        net.load_state_dict(saved["state"])
        return Segmenter(AMORTIZED, cfg, net.eval(), source, meta={"student": saved["student"]})
    from drc_core.model import DRCModel
    net = DRCModel(cfg.model, cfg.ablation)
    net.load_state_dict(saved["model"])
    return Segmenter(LANGEVIN, cfg, net.eval(), source)


def _from_checkpoint(folder: str, source: str) -> Segmenter:
    """A DRC model from a training checkpoint, reading and verifying its model files only."""
    from drc_core.model import DRCModel
    from pipelines.lib import checkpoints as ckpt
    try:
        meta, cfg, state = ckpt.load_model(folder)
    except ckpt.CheckpointError as exc:
        raise ModelError(f"{source}: {exc}") from None
    net = DRCModel(cfg.model, cfg.ablation)
    net.load_state_dict(state["model"])
    return Segmenter(LANGEVIN, cfg, net.eval(), source, checkpoint=folder, meta=meta)


def _weights_in(folder: Path, source: str) -> Path:
    """The weights file inside a downloaded MLflow model (its `artifacts/` folder)."""
    found = sorted(folder.rglob("*.pt"))
    if len(found) != 1:
        raise ModelError(f"{source}: expected one weights file (*.pt) in the MLflow model, found "
                         f"{[str(p.relative_to(folder)) for p in found]}")
    return found[0]


def load(ref: str, device="cpu") -> Segmenter:
    """Resolve a checkpoint folder, a weights file or an MLflow model URI into a Segmenter whose
    network lives on `device` (pipelines.lib.devices.resolve)."""
    return _load(ref).to(device)


def _load(ref: str) -> Segmenter:
    from pipelines.lib import locations
    path = Path(ref)
    if "://" not in ref and not ref.startswith(("runs:/", "models:/")):
        if not path.exists():
            raise ModelError(f"--model {ref}: no such file or folder")
        if path.is_dir():
            if (path / "MLmodel").exists():
                return _from_weights(_weights_in(path, ref), ref)
            return _from_checkpoint(str(path.resolve()), ref)
        return _from_weights(path, ref)
    if "://" in ref and not ref.startswith(("runs:/", "models:/")) and not ref.startswith(("http", "mlflow-")):
        try:                                     # a checkpoint or weights file on an object store
            if locations.exists(locations.join(ref, "meta.json")):
                return _from_checkpoint(ref, ref)
            if ref.endswith(".pt") and locations.exists(ref):
                return _from_weights(ref, ref)
        except OSError as exc:
            raise ModelError(f"--model {ref}: cannot read it ({exc})") from None
    import mlflow
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
    except Exception as exc:
        raise ModelError(f"--model {ref}: cannot download the MLflow model ({type(exc).__name__}: {exc})") from None
    return _from_weights(_weights_in(local, ref), ref)
