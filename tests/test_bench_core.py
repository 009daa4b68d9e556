import json

import pytest
import torch

from pipelines.bench.__main__ import main as bench_main


@pytest.mark.slow
def test_core_benchmark_times_every_variant_against_peaks_measured_in_the_same_run(tmp_path, capsys):
    out = tmp_path / "core.json"
    bench_main(["core", "--presets", "cpu-32:2", "--iterations", "1", "--step-repeat", "1", "--peak-seconds", "0.2",
                "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu"
    peaks, rows = saved["peaks"], saved["rows"]
    assert {"gemm_fp32", "gemm_bf16", "conv_fp32", "conv_bf16"} <= set(peaks) and min(peaks.values()) > 0
    assert [(r["variant"], r["precision"]) for r in rows] == [
        ("ours", "bf16-langevin"), ("torch-norm", "bf16-langevin"), ("torch-norm-nchw", "bf16-langevin"),
        ("ours", "fp32")]
    for r in rows:
        assert r["s_per_iteration"] > 0 and r["images_per_s"] == pytest.approx(2 / r["s_per_iteration"])
        # the fraction is the achieved Langevin rate over the peak measured in this run
        assert r["fraction_of_bf16_conv_peak"] == pytest.approx(r["langevin_gflops"] / peaks["conv_bf16"])
        assert r["gflop_per_posterior_step_per_image"] > 0 and r["peak_memory_gib"] is None   # CPU: no device memory
    assert "cpu-32 batch 2 on cpu" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_core_benchmark_on_cuda_without_a_gpu_says_why():
    with pytest.raises(SystemExit, match="--device cuda.*no CUDA device"):
        bench_main(["core", "--device", "cuda", "--presets", "cpu-32:2"])
