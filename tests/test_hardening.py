"""Hardening without a Ray cluster: diverging chains, configs that cannot work, files carrying
pickled code, output names, and where the servers we start listen."""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from drc_core.config import apply_overrides
from drc_core.fit import TrainState, fit
from drc_core.presets import get_config
from drc_core.tmds import render_many
from pipelines.lib import chain_reader
from pipelines.lib import checkpoints as ckpt

ROOT = Path(__file__).resolve().parent.parent


# ---- a. Langevin divergence ---------------------------------------------------------------------

@pytest.mark.faults
def test_diverging_chains_are_reset_logged_and_training_completes(tiny_cfg, caplog, record_property):
    """δ₁ = 1e3: every posterior chain leaves |z| < 1e4 within one Langevin run; em_step resets
    it to N(0, I), TrainState.step (which fit calls) warns with the count and the iteration, and
    the fit keeps going with finite losses and parameters."""
    cfg = apply_overrides(tiny_cfg, {"langevin.posterior_step_size": 1e3})
    images, _ = render_many("train", range(8), size=32, bank_seed=0, sprite_size=(0.25, 0.45))
    with caplog.at_level(logging.WARNING, logger="drc_core.fit"):
        state = fit(cfg, images, iterations=2)
    assert state.iteration == 2 and [h["chains_reset"] for h in state.history] == [4.0, 4.0]
    warnings = [r.getMessage() for r in caplog.records if r.name == "drc_core.fit"]
    assert warnings == [f"iteration {i}: reset 4 diverged Langevin chain(s) (non-finite or |z| > 10000) to N(0, I)"
                        for i in (1, 2)]
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    assert torch.isfinite(state.chains.z).all() and state.chains.z.abs().max() < cfg.langevin.divergence_threshold
    assert all(np.isfinite(v) for h in state.history for v in h.values())
    record_property("outcome", "completed: 4 chains reset per iteration, warned, parameters finite")


# ---- b. configs that cannot work fail fast, naming the field ----------------------------------

def _dataset(folder: Path, n: int = 4, size: int = 32) -> str:
    """A minimal valid dataset written with pyarrow alone (no Ray): one part + manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True)
    images, masks = render_many("train", range(n), size=size, bank_seed=0, sprite_size=(0.25, 0.45))
    table = pa.table({"sample_id": pa.array(range(n), pa.int64()), "key": [f"train/{i}" for i in range(n)],
                      "split": ["train"] * n, "image": [im.tobytes() for im in images],
                      "mask": [m.tobytes() for m in masks], "height": [size] * n, "width": [size] * n})
    pq.write_table(table, folder / "part-00000.parquet", write_page_checksum=True)
    (folder / "_manifest.json").write_text(json.dumps({
        "schema_version": 2, "resolution": size, "files": 1, "file_names": ["part-00000.parquet"],
        "parts": [{"name": "part-00000.parquet", "rows": n, "id_min": 0, "id_max": n - 1}],
        "splits": {"train": [0, n]}, "rows": n, "counts": {"ok": n, "per_split": {"train": n}, "with_mask": n}}))
    return str(folder)


@pytest.mark.parametrize("override, message", [
    ("model.resolution=48", "model.resolution must be a power of two >= 8, got 48"),
    ("langevin.posterior_step_size=-0.1", "langevin.posterior_step_size must be > 0, got -0.1"),
    ("langevin.prior_step_size=0", "langevin.prior_step_size must be > 0, got 0.0"),
    ("optim.batch_size=0", "optim.batch_size must be positive, got 0"),
])
def test_train_cli_refuses_a_config_that_cannot_work_before_ray(override, message, no_ray, tmp_path):
    from pipelines.train import main
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["--data", str(tmp_path / "none"), "--storage", str(tmp_path / "ray"), override])
    assert not (tmp_path / "ray").exists()


def test_train_cli_error_is_one_line_and_no_ray_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.train", "--data", str(tmp_path), "--storage",
                           str(tmp_path / "ray"), "model.resolution=48"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip() == "train: model.resolution must be a power of two >= 8, got 48"
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "ray").exists()


def _saved_run(storage: Path, name: str, cfg, data: str) -> Path:
    """A run folder as pipelines.train leaves it: run record + one complete checkpoint."""
    run_dir = storage / name
    (run_dir).mkdir(parents=True)
    (run_dir / "drc_run.json").write_text(json.dumps({"mlflow_run_id": "x", "data": data, "preset": cfg.preset}))
    state = TrainState.create(cfg, torch.arange(4))
    state.iteration = 3
    ckpt.write_shard(run_dir / "checkpoint_00000003", rank=0, world_size=1, state=state, meta={})
    return run_dir


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`: 'nothing previously written was lost or changed'."""
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, message", [
    (["--preset", "cpu-64"], "preset is 'cpu-64' but run old was started with preset 'cpu-32'"),
    (["model.fg_dim=16"], "model.fg_dim is 16 but the checkpoint .*checkpoint_00000003 was trained with 32"),
    (["langevin.prior_pool_size=64"], "langevin.prior_pool_size is 64 but the checkpoint"),
])
def test_resume_with_another_preset_or_architecture_fails_before_ray(argv, message, no_ray, tmp_path):
    from pipelines.train import main
    data = _dataset(tmp_path / "data")
    run_dir = _saved_run(tmp_path / "ray", "old", get_config("cpu-32"), data)
    before = _digests(run_dir)
    with pytest.raises(SystemExit, match=message):
        main(["--data", data, "--resume", "old", "--storage", str(tmp_path / "ray"), *argv])
    assert _digests(run_dir) == before


def test_preset_mismatch_is_named_by_check_compatible(tiny_cfg):
    from drc_core.config import ConfigError
    other = apply_overrides(tiny_cfg, {})
    other.preset = "cpu-64"
    with pytest.raises(ConfigError, match="preset is 'cpu-64' but the checkpoint x was trained with preset 'cpu-32'"):
        ckpt.check_compatible(tiny_cfg, other, "x")


# ---- c. no pickled code runs when loading checkpoints or models -------------------------------

class _Payload:
    """Unpickling this object runs code: it writes `marker` (what an attacker's file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickled code ran')",)


def _evil(path: Path, marker: Path, **content) -> Path:
    torch.save({**content, "payload": _Payload(marker)}, path)
    return path


def _forge_checksum(folder: Path, name: str) -> None:
    """Rewrite the shard record as an attacker would, so the checksums match the planted file."""
    digest = ckpt._sha256((folder / name).read_bytes())
    for rec_path in folder.glob("shard-*.json"):
        rec = json.loads(rec_path.read_text())
        if name in rec["files"]:
            rec["files"][name] = digest
        for entries in (rec.get("chains") or {}).values():
            for e in entries:
                if e["file"] == name:
                    e["sha256"] = digest
        rec_path.write_text(json.dumps(rec))


def test_the_payload_is_live_when_unpickled_without_restrictions(tmp_path):
    """The control: torch.load(weights_only=False) on the test file does run its code."""
    marker = tmp_path / "ran"
    torch.load(_evil(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.read_text() == "pickled code ran"


@pytest.mark.faults
def test_checkpoint_files_with_pickled_code_are_refused_by_every_loader(tiny_cfg, tmp_path, record_property):
    from pipelines.lib.models import ModelError, load
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoint_00000003"
    state = TrainState.create(tiny_cfg, torch.arange(6))
    ckpt.write_shard(folder, rank=0, world_size=1, state=state, meta={})
    good_state = (folder / "state.pt").read_bytes()

    _evil(folder / "state.pt", marker, model={}, optimizers={}, iteration=3)
    _forge_checksum(folder, "state.pt")
    ckpt.verify(folder)                                        # checksums match: only loading can tell
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: refused: .*GLOBAL exec\).*nothing in it ran"):
        ckpt.load_state(folder)
    with pytest.raises(ModelError, match=r"state\.pt: refused"):
        load(str(folder))

    (folder / "state.pt").write_bytes(good_state)
    _forge_checksum(folder, "state.pt")
    shard = folder / "chains-posterior-r00000-of-00001.pt"
    _evil(shard, marker, ids=torch.arange(6), z=torch.zeros(6, 2), visits=torch.zeros(6))
    _forge_checksum(folder, shard.name)
    _, records = ckpt.verify(folder)
    with pytest.raises(ckpt.CheckpointError, match=r"chains-posterior-r00000-of-00001\.pt: refused"):
        chain_reader.load_chains(folder, records, torch.arange(6), torch.arange(6), torch.float32)
    with pytest.raises(ckpt.CheckpointError, match=r"chains-posterior-r00000-of-00001\.pt: refused"):
        chain_reader.ChainReader(folder).get([0])
    assert not marker.exists()
    record_property("outcome", "clear error: state.pt and chain shard refused by load_state, models.load, "
                               "load_chains, ChainReader; no code ran")


@pytest.mark.faults
def test_model_files_with_pickled_code_are_refused_by_every_loader(tiny_cfg, tmp_path, no_ray, record_property):
    from pipelines import local, segment
    from pipelines.lib.mlflow_model import DRCSegmenter
    from pipelines.lib.models import ModelError, load
    marker = tmp_path / "ran"
    evil = _evil(tmp_path / "model.pt", marker, config=tiny_cfg.to_dict(), model={})
    with pytest.raises(ModelError, match=r"model\.pt: refused: .*GLOBAL exec"):
        load(str(evil))
    mlflow_dir = tmp_path / "mlflow_model"                    # a downloaded MLflow model folder
    (mlflow_dir / "artifacts").mkdir(parents=True)
    (mlflow_dir / "MLmodel").write_text("flavors: {}\n")
    _evil(mlflow_dir / "artifacts" / "student.pt", marker, kind="amortized", config=tiny_cfg.to_dict())
    with pytest.raises(ModelError, match=r"student\.pt: refused"):
        load(str(mlflow_dir))

    class Context:
        artifacts = {"weights": str(evil)}
    with pytest.raises(ModelError, match="refused"):
        DRCSegmenter().load_context(Context())
    with pytest.raises(SystemExit, match=r"--evaluate-only .*model\.pt: refused"):
        local.main(["--evaluate-only", str(evil)])
    with pytest.raises(SystemExit, match=r"segment: .*model\.pt: refused"):      # on the driver, before Ray
        segment.main(["--model", str(evil), "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()
    record_property("outcome", "clear error: model.pt / MLflow folder / pyfunc / local --evaluate-only / "
                               "segment --model refused; no code ran")


def test_damaged_torch_files_are_named(tmp_path):
    bad = tmp_path / "state.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: unreadable"):
        ckpt.safe_load(bad)


# ---- d. names derived from input cannot escape the output folder ------------------------------

@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", ".hidden", "", "x" * 200])
def test_run_and_study_names_cannot_escape_the_storage_folder(name, no_ray, tmp_path, capsys):
    from pipelines import train, tune
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path), "--storage", str(tmp_path / "ray"), "--name", name])
    assert "is not a plain name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune.parse_args(["--space", "x.yaml", "--data", str(tmp_path), "--resume", name])
    assert "is not a plain name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_png_names_from_hostile_keys_stay_inside_the_folder(tmp_path):
    import numpy as np

    from pipelines.lib.mask_files import safe_name, write_pair
    keys = ["../../etc/passwd", "/abs/path", "..", "a/b\\c", "\x00odd", "", "..\\..\\win", "ümlaut/ß",
            "." * 300, "con", "a\nb"]
    names = {safe_name(i, k) for i, k in enumerate(keys)}
    assert len(names) == len(keys)                   # the sample id keeps them distinct
    for name in names:
        assert re.fullmatch(r"\d{8}-[A-Za-z0-9._-]{1,80}\.png", name) and not name.startswith(".")
    pixel = np.zeros((1, 1, 3), np.uint8)
    for name in names:
        write_pair(str(tmp_path), name, b"png", pixel)
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {f"{sub}/{n}" for sub in ("masks", "overlays") for n in names}
    for hostile in ("../x.png", ".hidden.png", "a/b.png"):
        with pytest.raises(ValueError, match="could escape"):
            write_pair(str(tmp_path), hostile, b"png", pixel)


# ---- e. servers we start listen on 127.0.0.1 ---------------------------------------------------

def _listening() -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine, from /proc/net."""
    out = []
    for family, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":                                  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # per-word host order
            out.append((socket.inet_ntop(family, raw), int(hex_port, 16)))
    return out


DASHBOARD_PROBE = """
import json, os
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
from pipelines.lib.ray_env import init_ray
ray = init_ray(num_cpus=1, include_dashboard=True)
print("PROBE", json.dumps({"api": os.environ["RAY_API_SERVER_ADDRESS"],
                           "dashboard": ray._private.worker.get_dashboard_url()}), flush=True)
input()
"""


@pytest.mark.integration
def test_local_ray_dashboard_and_job_server_listen_on_loopback_only(tmp_path):
    """init_ray's local instance with the dashboard on: its HTTP server (dashboard, State API and
    the job-submission REST API share it) listens on 127.0.0.1 and on no other address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-c", DASHBOARD_PROBE], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("PROBE "):
                break
        assert line.startswith("PROBE "), "the probe did not start Ray"
        info = json.loads(line[len("PROBE "):])
        host, port = info["dashboard"].rsplit(":", 1)
        assert info["api"] == f"http://127.0.0.1:{port}" and host.endswith("127.0.0.1")
        bound = sorted({ip for ip, p in _listening() if p == int(port)})
        assert bound == ["127.0.0.1"], bound
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10):
            pass
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)


def test_init_ray_binds_the_dashboard_to_loopback_unless_told_otherwise(monkeypatch):
    import ray

    from pipelines.lib import ray_env
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "unset")              # init_ray sets both: restore them
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    ray_env.init_ray(num_cpus=1)
    ray_env.init_ray(num_cpus=1, include_dashboard=True)
    ray_env.init_ray(num_cpus=1, include_dashboard=True, dashboard_host="0.0.0.0", dashboard_port=18265)
    assert [c["dashboard_host"] for c in calls] == ["127.0.0.1", "127.0.0.1", "0.0.0.0"]
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:18265"


def test_every_mlflow_server_the_project_starts_or_documents_binds_to_loopback():
    """The project starts no MLflow server itself (tracking is the embedded sqlite store or a
    URI the user gives); every `mlflow server` / `mlflow ui` command in code, scripts and docs
    says --host 127.0.0.1, except the cluster guide's shared server, which names a host address
    and never all interfaces."""
    found = []
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".sh", ".md", ".yaml", ".yml", ".toml") or {".venv", "tests"} & set(path.parts):
            continue                                   # tests only check the printed hint
        for line in path.read_text(errors="replace").splitlines():
            if re.search(r"mlflow(\"?,\s*\"|\s+)(server|ui)\b", line):
                found.append((path.relative_to(ROOT), line.strip()))
    assert found, "expected the README's `mlflow ui` line"
    for where, line in found:
        if where.parts[0] == "cluster":               # a shared server: told where to listen
            host = re.search(r"--host[ =](\S+)", line)
            assert host and host.group(1).strip("'\"") not in ("0.0.0.0", "::", ""), f"{where}: {line}"
        else:
            assert "--host 127.0.0.1" in line or "\"127.0.0.1\"" in line, f"{where}: {line}"
