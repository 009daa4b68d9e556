"""The trained DRC model as an MLflow pyfunc model that segments images.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    out = model.predict(pd.DataFrame({"image": [png_bytes, ...]}), params={"steps": 100})

Input: a DataFrame with an `image` column of encoded images (PNG/JPEG bytes; resized to the
model's resolution), or a uint8 array (N, H, W, 3) at the model's resolution. Output: one row
per image with `fg_fraction`, `mask_png` (PNG bytes, 0/255) and `recon_l1`. The model is logged
from code (pipelines/pyfunc_entry.py) and its weights load with `torch.load(weights_only=True)`:
no pickled code runs at load time.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

try:
    from mlflow.pyfunc import PythonModel
except ImportError:                                              # drc_core users without MLflow
    PythonModel = object


def save_weights(path: str | Path, cfg, model) -> None:
    import torch
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, path)


def load_weights(path: str | Path, device: str = "cpu"):
    import torch

    from drc_core.config import DRCConfig
    from drc_core.model import DRCModel
    saved = torch.load(path, map_location=device, weights_only=True)
    cfg = DRCConfig.from_dict(saved["config"])
    model = DRCModel(cfg.model, cfg.ablation).to(device)
    model.load_state_dict(saved["model"])
    return cfg, model.eval()


def _as_images(model_input, size: int) -> np.ndarray:
    from PIL import Image

    from pipelines.imaging import decode_image
    if isinstance(model_input, np.ndarray):
        arr = model_input
    else:
        if "image" not in getattr(model_input, "columns", []):
            raise ValueError("DRC model input needs an 'image' column of encoded image bytes")
        arr = []
        for i, data in enumerate(model_input["image"]):
            img = decode_image(bytes(data), what=f"row {i}")
            if img.shape[:2] != (size, size):
                img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
            arr.append(img)
        arr = np.stack(arr) if arr else np.zeros((0, size, size, 3), np.uint8)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
        raise ValueError(f"DRC model input array must be uint8 (N, {size}, {size}, 3), got "
                         f"{arr.dtype} {arr.shape}")
    return arr


def mask_png(mask: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


class DRCSegmenter(PythonModel):
    def load_context(self, context):
        self.cfg, self.model = load_weights(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from drc_core.inference import segment
        params = params or {}
        images = _as_images(model_input, self.cfg.model.resolution)
        if len(images) == 0:
            return pd.DataFrame({"fg_fraction": [], "mask_png": [], "recon_l1": []})
        seg = segment(self.model, images, self.cfg, steps=params.get("steps"), seed=int(params.get("seed", 0)))
        masks = seg.mask.numpy()
        return pd.DataFrame({"fg_fraction": masks.reshape(len(masks), -1).mean(1),
                             "mask_png": [mask_png(m) for m in masks],
                             "recon_l1": seg.recon_l1.numpy()})


def signature(test_steps: int):
    """Input: encoded image bytes; output: fg_fraction, mask_png, recon_l1; params: steps, seed."""
    from mlflow.models import infer_signature
    import pandas as pd
    return infer_signature(pd.DataFrame({"image": [b"png"]}),
                           pd.DataFrame({"fg_fraction": [0.5], "mask_png": [b"png"], "recon_l1": [0.1]}),
                           params={"steps": int(test_steps), "seed": 0})


def log_pyfunc(uri: str, run_id: str, weights_path: str | Path, test_steps: int) -> str:
    """Log the model into run `run_id`; returns its model URI."""
    import mlflow
    root = Path(__file__).resolve().parent.parent
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(root / "pipelines" / "pyfunc_entry.py"), artifacts={"weights": str(weights_path)},
            code_paths=[str(root / "drc_core"), str(root / "pipelines")], signature=signature(test_steps),
            pip_requirements=["torch==2.13.0", "numpy", "pillow", "pandas"])
    return info.model_uri
