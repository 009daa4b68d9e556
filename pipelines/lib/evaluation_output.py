"""What evaluate prints and logs: its table and the subject-size table as text, and one MLflow run
with a metric per table cell and the report folder as artifacts."""
from __future__ import annotations

import re
import time
from pathlib import Path

from pipelines.lib import tracking
from pipelines.lib.scoring import PROTOCOL_LABEL


def metric_name(method: str, split: str, metric: str) -> str:
    """An MLflow metric name for a table cell (MLflow allows letters, digits, _ - . / : and spaces):
    `GrabCut.test.iou`, `langevin_threshold_0.5_DRC_protocol.test.iou`, `centred_disc_best_area_40pct…`."""
    m = method.replace(PROTOCOL_LABEL, "threshold 0.5 DRC protocol").replace("%", "pct").replace("−", "-")
    m = re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_.\-]", "_", m)).strip("_")
    return f"{m}.{split}.{metric}"


def track(result: dict, out: Path, uri: str, experiment: str, params: dict) -> str:
    """One MLflow run: <method>.<split>.iou/dice metrics and the report folder as artifacts."""
    run_id = tracking.start_run(uri, f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}",
                                {**params, **{f"pred.{k}": v for k, v in result["preds"].items()}},
                                experiment=experiment, tags={"drc.stage": "evaluate"})
    tracking.log_metrics(uri, run_id, {metric_name(r["method"], r["split"], m): r[m]
                                       for r in result["table"] for m in ("iou", "dice")}, 0)
    tracking.client(uri).log_artifacts(run_id, str(out), "evaluation")
    tracking.end_run(uri, run_id)
    return run_id


def format_subject_sizes(sizes: list[dict]) -> str:
    """metrics.json's "by_subject_size" as a table: IoU (%) per method and subset, on GrabCut's images."""
    sizes = [r for r in sizes if r["images"]]
    if not sizes:
        return ""
    methods = list(dict.fromkeys(m for r in sizes for m in r["methods"]))
    lines = [f"{'IoU by subject size (GrabCut beaten on %)':<48}" + "".join(f"{r['subset']:>20}" for r in sizes),
             f"{'images':<48}" + "".join(f"{r['images']:>20}" for r in sizes)]
    for m in methods:
        lines.append(f"{m[:47]:<48}" + "".join(
            f"{r['methods'][m]['iou']:>11.1f} ({100 * r['methods'][m]['beats_grabcut']:>3.0f} %)" if m in r["methods"]
            else f"{'–':>20}" for r in sizes))
    return "\n".join(lines)


def format_table(table: list[dict]) -> str:
    w = max([34, *(len(r["method"]) + 2 for r in table)])     # "<name>, π_f's mask before GrabCut" is longer
    lines = [f"{'method':<{w}}{'split':<8}{'images':>8}{'IoU':>8}{'Dice':>8}"]
    lines += [f"{r['method']:<{w}}{r['split']:<8}{r['images']:>8}{r['iou']:>8.1f}{r['dice']:>8.1f}" for r in table]
    return "\n".join(lines)
