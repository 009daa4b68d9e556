"""The README's main job, end to end, in its own process and Ray instance (as a user runs it)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_cluster import _env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quickstart_tiny_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "qs"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pipelines.quickstart", "--tiny", "--iterations", "10",
                           "--out", str(out)], cwd=root, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["seconds"]) == {"preprocess", "train", "distill", "segment", "evaluate"}
    html = (out / "report" / "report.html").read_text()
    for needle in ('id="results"', "langevin", "amortized", "GrabCut", "Learning curves", "Samples"):
        assert needle in html
    for mode in ("langevin", "amortized"):
        manifest = json.loads((out / f"seg-{mode}" / "_manifest.json").read_text())
        assert manifest["mode"] == mode and manifest["counts"]["ok"] == 64
    assert "mlflow ui --backend-store-uri" in proc.stdout
