"""pipelines.ray_env: a local instance started beside another Ray instance still frees the
placement group of a Ray Train run whose controller was killed (a Tune trial ASHA stopped)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_cluster import _env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_a_killed_train_run_frees_its_placement_group_beside_another_ray_instance(ray_local, tmp_path):
    # ray_local (this session's instance) is the other instance. Without the State API address
    # pinned by init_ray, Ray Train's PlacementGroupCleaner fails with "Found multiple active
    # Ray instances" and the group stays CREATED (1 CPU reserved) until the driver exits.
    proc = subprocess.run([sys.executable, "-m", "tests.pg_cleanup_drill", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("DRILL ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("DRILL "):])
    assert out["worker_started"] and out["worker_groups"] == 1 and out["ray_instances"] >= 2, out
    assert set(out["states"].values()) == {"REMOVED"} and out["cpus_free"] == 2.0, out
    assert out["api_server"].startswith("http://127.0.0.1:"), out
