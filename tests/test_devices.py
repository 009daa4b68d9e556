"""One `--device` option on every stage that runs a model (pipelines/lib/devices.py): parsed the same
way everywhere, refused with an error naming the stage, and honoured where tensors are created.
The `gpu` tests run the real thing when a CUDA device is present."""
import importlib

import numpy as np
import pytest
import torch

from drc_core.model import DRCModel
from pipelines.lib import devices
from pipelines.lib.models import save_drc

STAGES = ["segment", "distill", "train", "tune", "local"]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")


def parse(stage: str, extra: list[str]):
    """The stage's own argparse parser, with the arguments it requires filled in."""
    required = {"segment": ["--model", "m.pt", "--input", "in", "--output", "out"],
                "distill": ["--teacher", "m.pt"], "train": ["--data", "d"],
                "tune": ["--space", "s.yaml", "--data", "d"], "local": []}[stage]
    mod = importlib.import_module(f"pipelines.{stage}")
    if stage == "local":                      # local builds its parser inside main(): read it back
        import argparse
        captured = {}
        real = argparse.ArgumentParser.parse_args

        def grab(self, argv=None, namespace=None):
            captured["args"] = real(self, argv, namespace)
            raise SystemExit(0)
        try:
            argparse.ArgumentParser.parse_args = grab
            with pytest.raises(SystemExit):
                mod.main(required + extra)
        finally:
            argparse.ArgumentParser.parse_args = real
        return captured["args"]
    return mod.parse_args(required + extra)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_the_same_device_option(stage):
    assert parse(stage, []).device == "auto"
    assert parse(stage, ["--device", "cpu"]).device == "cpu"
    assert parse(stage, ["--device", "cuda:1"]).device == "cuda:1"
    assert parse(stage, ["--gpu"]).device == "cuda"            # the old flag is an alias


@pytest.mark.parametrize("flag", ["tpu", "gpu", "cuda:x", "cuda0", ""])
def test_a_device_that_is_not_one_is_refused_naming_the_stage(flag):
    with pytest.raises(devices.DeviceError, match=r"^segment: --device .* choose auto, cpu, cuda or cuda:N"):
        devices.check(flag, "segment")
    with pytest.raises(devices.DeviceError, match=r"^distill: --device"):
        devices.resolve(flag, "distill")


@pytest.mark.skipif(CUDA, reason="checks the CPU-only machine's answer")
def test_cuda_on_a_machine_without_one_is_an_error_and_auto_is_the_cpu():
    with pytest.raises(devices.DeviceError, match=r"^pyfunc model: --device cuda: no CUDA device is visible"):
        devices.resolve("cuda", "pyfunc model")
    assert devices.resolve("auto", "segment") == torch.device("cpu")
    assert devices.resolve("CPU", "segment") == torch.device("cpu")


@pytest.fixture
def model_pt(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    return str(save_drc(tmp_path / "model.pt", tiny_cfg, DRCModel(tiny_cfg.model, tiny_cfg.ablation).state_dict()))


def test_the_command_lines_refuse_a_bad_device_before_any_work(model_pt, tmp_path, no_ray):
    from pipelines import distill, local, segment
    with pytest.raises(SystemExit, match=r"segment: --device 'tpu'"):
        segment.main(["--model", model_pt, "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                      "--device", "tpu"])
    with pytest.raises(SystemExit, match=r"distill: --device 'tpu'"):
        distill.main(["--teacher", model_pt, "--device", "tpu", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match=r"local: --device 'tpu'"):
        local.main(["--device", "tpu"])


def _meta(flag, stage):
    """A device every machine has and no computation can silently run on: where the resolved
    device reaches, tensors end up on `meta`."""
    devices.check(flag, stage)
    return torch.device("meta")


def test_the_resolved_device_reaches_the_segment_actor_and_the_pyfunc_model(model_pt, monkeypatch):
    from pipelines.lib.mlflow_model import DRCSegmenter
    from pipelines.segment import SegmentBatch
    monkeypatch.setattr(devices, "resolve", _meta)
    actor = SegmentBatch(model_pt, steps=1, seed=0, from_chains=False, png=None, threads=1, batch_size=4,
                         device="auto")
    assert {p.device.type for p in actor.seg.net.parameters()} == {"meta"}
    pyfunc = DRCSegmenter()
    pyfunc.load_context(type("Ctx", (), {"artifacts": {"weights": model_pt}})())
    assert {p.device.type for p in pyfunc.segmenter.net.parameters()} == {"meta"}


def test_distill_loads_the_teacher_and_trains_the_student_on_its_device(model_pt, tmp_path, monkeypatch):
    import drc_core.amortized
    from pipelines import distill
    seen = {}
    real_load, real_distill = distill.load, drc_core.amortized.distill

    def load(ref, device="cpu"):
        seen["teacher"] = torch.device(device)
        return real_load(ref, device)

    def train(pairs, cfg, **kw):
        seen["student"] = torch.device(kw["device"])
        return real_distill(pairs, cfg, **kw)
    monkeypatch.setattr(distill, "load", load)
    monkeypatch.setattr(drc_core.amortized, "distill", train)
    summary = distill.run(distill.parse_args(["--teacher", model_pt, "--pairs", "prior", "--prior-images", "8",
                                              "--steps", "2", "--no-model", "--device", "cpu",
                                              "--out", str(tmp_path / "d"),
                                              "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]))
    assert seen == {"teacher": torch.device("cpu"), "student": torch.device("cpu")}
    assert np.isfinite(summary["final_loss"])


# ---- the real thing, where a GPU is present --------------------------------------------------

@pytest.mark.gpu
@needs_cuda
def test_segment_and_distill_run_on_cuda(model_pt, tiny_cfg):
    from drc_core.amortized import StudentConfig, distill, predict, prior_pairs
    from pipelines.lib.models import load
    seg = load(model_pt, devices.resolve("cuda", "test"))
    assert {p.device.type for p in seg.net.parameters()} == {"cuda"}
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    out = seg.segment(images, np.arange(3), steps=2)
    cpu = load(model_pt).segment(images, np.arange(3), steps=2)
    assert out["prob"].shape == (3, 32, 32) and np.abs(out["prob"] - cpu["prob"]).max() < 0.05
    pairs = prior_pairs(seg.net, tiny_cfg, 4, generator=torch.Generator("cuda").manual_seed(0))
    student = distill([pairs], StudentConfig(resolution=32, width=4, levels=1), steps=2, device="cuda")
    assert {p.device.type for p in student.parameters()} == {"cuda"}
    assert predict(student, images).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.integration
@needs_cuda
def test_a_segment_actor_with_a_gpu_holds_the_model_and_chains_on_cuda(model_pt, ray_local):
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe(path):
        import torch as t

        from pipelines.segment import SegmentBatch
        actor = SegmentBatch(path, steps=1, seed=0, from_chains=False, png=None, threads=1, batch_size=2,
                             device="auto")
        captured = {}
        import drc_core.inference as inf
        real = inf.sample_posterior

        def spy(model, x, z, cfg, **kw):
            captured["z"] = z.device.type
            return real(model, x, z, cfg, **kw)
        inf.sample_posterior = spy
        actor.seg.segment(np.zeros((2, 32, 32, 3), np.uint8), np.arange(2), steps=1)
        return {p.device.type for p in actor.seg.net.parameters()}, captured["z"], t.cuda.is_available()
    params, chains, visible = ray.get(probe.remote(model_pt))
    assert visible and params == {"cuda"} and chains == "cuda"
