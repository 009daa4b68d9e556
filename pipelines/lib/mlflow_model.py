"""The trained DRC model as an MLflow pyfunc model that segments images.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    out = model.predict(pd.DataFrame({"image": [png_bytes, ...]}), params={"steps": 100})

Input: a DataFrame with an `image` column of encoded images (PNG/JPEG bytes of any size; each
photo stretched to the model's square exactly as `pipelines.segment --crop resize` does), or a
uint8 array (N, H, W, 3) at the model's resolution. Output: one row per image with
`fg_fraction`, `confidence`, `mask_png` (PNG bytes, 0/255, π_f above the threshold of the
`threshold` policy param, default drc_core.threshold.DEFAULT; at the photo's own size for encoded
inputs; re-drawn by GrabCut guided by that mask as `pipelines.segment --refine` does when the
`refine` param is `grabcut`, or `auto` (default) and the model was trained on photos), `threshold`,
`prob_png` (π_f in 8 bits, model resolution) and `recon_l1`. The
same class serves the DRC model (posterior Langevin, `steps`/`seed` params) and the distilled
amortised segmenter (one forward pass; params ignored). The model is logged
from code (pipelines/lib/pyfunc_entry.py) and its weights load with `torch.load(weights_only=True)`:
no pickled code runs at load time.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

try:
    from mlflow.pyfunc import PythonModel
except ImportError:                                              # drc_core users without MLflow
    PythonModel = object


def _as_images(model_input, size: int) -> tuple[np.ndarray, list[dict] | None]:
    """(model inputs (N, size, size, 3), each photo's {height, width, region} or None for an array
    input). Encoded photos go through pipelines.lib.imaging.model_input, as in pipelines.segment."""
    from pipelines.lib.imaging import decode_image, model_input as prepare
    geometry = None
    if isinstance(model_input, np.ndarray):
        arr = model_input
    else:
        if "image" not in getattr(model_input, "columns", []):
            raise ValueError("DRC model input needs an 'image' column of encoded image bytes")
        arr, geometry = [], []
        for i, data in enumerate(model_input["image"]):
            photo = decode_image(bytes(data), what=f"row {i}")
            img, region = prepare(photo, size, "resize")
            arr.append(img)
            geometry.append({"height": photo.shape[0], "width": photo.shape[1], "region": region, "photo": photo})
        arr = np.stack(arr) if arr else np.zeros((0, size, size, 3), np.uint8)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
        raise ValueError(f"DRC model input array must be uint8 (N, {size}, {size}, 3), got "
                         f"{arr.dtype} {arr.shape}")
    return arr, geometry


def mask_png(mask: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def prob_png(prob: np.ndarray) -> bytes:
    """π_f quantised to 8 bits (round(255·π_f)), as a grey PNG: enough to change the threshold
    policy later without running the model again."""
    from PIL import Image
    buf = io.BytesIO()
    from pipelines.lib.imaging import quantised
    Image.fromarray(np.rint(quantised(prob) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def result_frame(prob: np.ndarray, recon_l1: np.ndarray | None, policy=None):
    """(one row per image, boolean masks (N, H, W)). Rows: fg_fraction, confidence (mean |2π_f − 1|),
    mask_png (the mask under `policy`, default drc_core.threshold.DEFAULT), threshold (the one
    applied to that image), prob_png (π_f, 8 bits) and recon_l1 (NaN for the amortised segmenter,
    which reconstructs nothing)."""
    import pandas as pd
    from drc_core.threshold import DEFAULT
    policy = policy or DEFAULT
    prob = np.asarray(prob, np.float32)
    n = len(prob)
    masks, thresholds = (t.numpy() for t in policy.apply(prob))
    frame = pd.DataFrame({"fg_fraction": masks.reshape(n, -1).mean(1).astype(np.float64),
                          "confidence": np.abs(2.0 * prob.reshape(n, -1) - 1.0).mean(1).astype(np.float64),
                          "mask_png": [mask_png(m) for m in masks],
                          "threshold": thresholds.astype(np.float64),
                          "prob_png": [prob_png(p) for p in prob],
                          "recon_l1": (np.full(n, np.nan) if recon_l1 is None else recon_l1).astype(np.float64)})
    return frame, masks


class DRCSegmenter(PythonModel):
    """Either kind of model (DRC with Langevin inference, or the distilled student)."""

    def load_context(self, context):
        """Loads on the GPU when the serving process has one (pipelines.lib.devices, `auto`)."""
        from pipelines.lib.devices import resolve
        from pipelines.lib.models import load
        self.segmenter = load(context.artifacts["weights"], resolve("auto", "pyfunc model"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """`model_input`: a DataFrame with an `image` column (or a uint8 array; the hint tells MLflow
        to validate against the logged signature rather than infer one)."""
        from drc_core.threshold import DEFAULT, ThresholdPolicy
        from pipelines.lib.grabcut import REFINE_MAX_SIDE
        from pipelines.lib.models import resolve_refine
        params = params or {}
        images, geometry = _as_images(model_input, self.segmenter.resolution)
        policy = ThresholdPolicy.parse(params.get("threshold") or DEFAULT.name)
        refine = resolve_refine(params.get("refine") or "auto", self.segmenter)
        if len(images) == 0:
            return result_frame(np.zeros((0, 1, 1)), None, policy)[0]
        ids = np.arange(len(images))
        out = self.segmenter.segment(images, ids, steps=params.get("steps"), seed=int(params.get("seed", 0)))
        frame, masks = result_frame(out["prob"], out["recon_l1"], policy)
        if geometry is not None or refine:       # as segment writes it: at each photo's size, refined by GrabCut
            from pipelines.lib.imaging import product_mask
            sources = images if geometry is None else [g["photo"] for g in geometry]
            regions = [None] * len(images) if geometry is None else [g["region"] for g in geometry]
            frame["mask_png"] = [mask_png(product_mask(im, p, t, m, r, refine=refine, seed=i,
                                                       max_side=REFINE_MAX_SIDE) == 255)
                                 for i, (im, p, t, m, r) in enumerate(zip(sources, out["prob"], frame["threshold"],
                                                                          masks, regions))]
        return frame


def signature(test_steps: int):
    """Input: encoded image bytes; output: fg_fraction, confidence, mask_png, threshold, prob_png,
    recon_l1; params: steps, seed, threshold (a drc_core.threshold policy), refine (auto, grabcut, off)."""
    from mlflow.models import infer_signature
    import pandas as pd
    from drc_core.threshold import DEFAULT
    return infer_signature(pd.DataFrame({"image": [b"png"]}),
                           pd.DataFrame({"fg_fraction": [0.5], "confidence": [0.5], "mask_png": [b"png"],
                                         "threshold": [0.5], "prob_png": [b"png"], "recon_l1": [0.1]}),
                           params={"steps": int(test_steps), "seed": 0, "threshold": DEFAULT.name, "refine": "auto"})


def log_pyfunc(uri: str, run_id: str, weights_path: str | Path, test_steps: int) -> str:
    """Log the model into run `run_id`; returns its model URI."""
    import os
    import warnings

    import mlflow
    root = Path(__file__).resolve().parents[2]
    mlflow.set_tracking_uri(uri)
    # MLflow copies the logged files back to validate the model and draws a "Downloading artifacts"
    # progress bar for that local copy in the middle of the stage's own lines; a user's setting wins
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the signature is explicit; an input example would only make MLflow run the model (for a
        # DRC model, Langevin at the preset's test steps) to infer what the signature already says
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(root / "pipelines" / "lib" / "pyfunc_entry.py"), artifacts={"weights": str(weights_path)},
            code_paths=[str(root / "drc_core"), str(root / "pipelines")], signature=signature(test_steps),
            pip_requirements=["torch==2.13.0", "numpy", "pillow", "pandas"])
    return info.model_uri
