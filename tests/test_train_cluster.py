"""pipelines.train beyond one local instance: a node lost mid-run. It needs its own Ray cluster,
so it runs in a subprocess next to the session instance. (`ray job submit` of the stages on a
`ray start` cluster: tests/test_scale.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.lib import checkpoints as ckpt
from tests.test_train import dataset  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    return env


@pytest.mark.faults
def test_a_node_removed_mid_run_training_completes_on_the_remaining_node(dataset, tmp_path, record_property):
    proc = subprocess.run([sys.executable, "-m", "tests.node_loss_drill", dataset, str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("DRILL ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("DRILL "):])
    assert out.get("error") is None and out["finished"] and out["removed_after"] == "checkpoint_00000005"
    starts = [e for e in out["events"] if e["event"] == "start"]
    assert {e["world_size"] for e in starts} == {1, 2}, "one worker per node, then one on the survivor"
    (restored,) = [e for e in out["events"] if e["event"] == "restored"]
    assert restored["world_size"] == 1 and restored["saved_world_size"] == 2 and restored["iteration"] >= 5
    meta, records = ckpt.verify(Path(out["summary"]["checkpoint"]))
    assert meta["iteration"] == 40 and meta["world_size"] == 1 and records[0]["count"] == 48
    record_property("outcome", f"completed: node removed after checkpoint 5, resumed from {restored['iteration']} "
                               "on 1 worker (chains re-sharded), finished at 40")
