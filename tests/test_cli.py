"""The `drc` command and the installable distribution (pyproject.toml)."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.lib import search_space

ROOT = Path(__file__).resolve().parent.parent


def test_drc_lists_every_stage_and_refuses_an_unknown_one(capsys):
    cli.main([])
    listed = capsys.readouterr().out
    assert all(f"  {stage}" in listed for stage in cli.STAGES)
    with pytest.raises(SystemExit, match="drc: unknown stage 'trian'"):
        cli.main(["trian"])


@pytest.mark.parametrize("stage", sorted(cli.STAGES))
def test_each_stage_is_its_module_command_line(stage, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([stage, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: drc {stage}")


def test_shipped_search_spaces_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ("tune_spaces/quick.yaml", "quick.yaml", "quick"):
        path = search_space.resolve(ref)
        assert path.is_file() and path.name == "quick.yaml", ref
    assert {"quick.yaml", "langevin.yaml", "regularizers.yaml"} <= set(search_space.shipped())


@pytest.mark.slow
def test_the_wheel_installs_the_drc_command_with_its_packages_and_data(tmp_path):
    import shutil
    src = tmp_path / "src"                      # a copy: setuptools builds in the source tree (build/)
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-test.txt"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("drc_core", "pipelines", "tune_spaces"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("drc_on_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"pipelines/cli.py", "drc_core/model.py", "tune_spaces/quick.yaml"} <= set(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "drc = pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: torch==2.13.0" in meta and "Requires-Dist: ray[data,default,train,tune]==2.60.0" in meta


@pytest.mark.parametrize("stage, required, dest", [
    ("preprocess", ["--source", "tm-dsprites"], None), ("train", ["--data", "d"], "storage"),
    ("tune", ["--space", "quick", "--data", "d"], "storage"), ("distill", ["--teacher", "m.pt"], "out"),
    ("evaluate", ["--data", "d"], None), ("segment", ["--model", "m", "--input", "i"], "output"),
    ("local", [], None), ("quickstart", [], None)])
def test_every_stage_takes_output_for_where_it_writes(stage, required, dest, monkeypatch):
    """`--output` on every stage (the old --out / --storage stay as aliases)."""
    assert vars(_parsed(stage, [*required, "--output", "somewhere"], monkeypatch))[dest or "out"] == "somewhere"


def _parsed(stage: str, argv: list[str], monkeypatch):
    """The arguments a stage's `main(argv)` parses (it stops right after parsing)."""
    import argparse
    import importlib
    seen = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, argv=None, namespace=None):
        seen["args"] = real(self, argv, namespace)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(SystemExit):
        importlib.import_module(f"pipelines.{stage}").main(argv)
    return seen["args"]


@pytest.mark.parametrize("stage, required", [
    ("preprocess", ["--source", "tm-dsprites", "--output", "o"]), ("train", ["--data", "d"]),
    ("tune", ["--space", "quick", "--data", "d"]), ("distill", ["--teacher", "m.pt"]),
    ("evaluate", ["--data", "d", "--output", "o"]), ("segment", ["--model", "m", "--input", "i", "--output", "o"]),
    ("local", []), ("quickstart", [])])
def test_every_stage_takes_quiet(stage, required, monkeypatch):
    assert _parsed(stage, [*required, "--quiet"], monkeypatch).quiet is True


def test_local_evaluates_every_n_iterations_and_quiet_keeps_the_curve_in_its_file(tmp_path, capsys):
    from pipelines import local
    small = ["data.train_size=16", "data.test_size=4", "optim.batch_size=4", "langevin.prior_steps=2",
             "langevin.posterior_steps=2", "langevin.test_average=0"]
    res = local.main(["--iterations", "5", "--eval-every", "2", "--eval-steps", "2", "--out", str(tmp_path),
                      "--name", "n", "--quiet", "--threads", "1", *small])
    assert [row["iteration"] for row in res["curve"]] == [1, 2, 4, 5]
    printed = capsys.readouterr().out
    assert '"iteration": 2' not in printed and "final: IoU" in printed
    assert json.loads((tmp_path / "n" / "curve.json").read_text())["curve"] == json.loads(json.dumps(res["curve"]))
    with pytest.raises(SystemExit, match="not both"):
        local.main(["--eval-every", "2", "--eval-seconds", "5"])


def test_mlflow_experiment_name_is_honoured(monkeypatch):
    from pipelines import train, tune
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-photos")       # read when the parser is built
    assert train.parse_args(["--data", "d"]).experiment == "team-photos"
    assert tune.parse_args(["--space", "quick", "--data", "d"]).experiment == "team-photos"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert train.parse_args(["--data", "d"]).experiment == "drc"
    assert tune.parse_args(["--space", "quick", "--data", "d"]).experiment == "drc-tune"


def test_segment_with_only_png_keeps_its_parquet_beside_the_pngs(capsys):
    from pipelines import segment
    args = segment.parse_args(["--model", "m.pt", "--input", "photos", "--png", "out/photos"])
    assert Path(args.output) == Path("out/photos/segmentation")
    assert segment.parse_args(["--model", "m", "--input", "i", "--png", "p", "--output", "o"]).output == "o"
    with pytest.raises(SystemExit):
        segment.parse_args(["--model", "m", "--input", "i"])
    assert "give --output" in capsys.readouterr().err
