"""The scale benchmark's arithmetic (no cluster): the driver's memory curve over a run, the slopes
between sizes and within the largest run, and the table that prints them."""
from pipelines.bench.scale import driver_curve
from pipelines.bench.scale_report import format_result, growth

MB = 2 ** 20


def test_the_driver_curve_is_the_running_peak_at_each_tenth_of_the_run():
    samples = [(t / 2, (100 + (t if t < 10 else 10)) * MB) for t in range(40)]   # grows 5 s, then flat; 20 s
    curve = driver_curve(samples, seconds=20.0)
    assert len(curve) == 10
    assert curve[0] == 104 * MB and curve[1] == 108 * MB and curve[2:] == [110 * MB] * 8
    assert driver_curve([], seconds=5.0) == [0] * 10


def _row(stage, images, driver_mb, curve_mb=None, ips=100.0):
    return {"stage": stage, "images": images, "seconds": images / ips, "images_per_s": ips,
            "driver_peak": driver_mb * MB, "worker_peak": 500 * MB, "store_peak": MB, "bytes": images * 800,
            "driver_curve": [c * MB for c in curve_mb] if curve_mb else []}


def test_growth_gives_the_slope_between_sizes_and_the_largest_runs_streaming_slope():
    flat_then_report = [400, 420, 430, 430, 430, 431, 431, 432, 432, 600]    # the last tenth: a report
    rows = [_row("evaluate", 10_000, 420, ips=200.0), _row("evaluate", 1_000_000, 600, flat_then_report, ips=600.0)]
    g = growth(rows)["evaluate"]
    assert g["driver_bytes_per_image"] == (600 - 420) * MB / 990_000
    assert g["images_per_s_ratio"] == 3.0
    assert g["driver_streaming_bytes_per_image"] == (432 - 430) * MB / 400_000      # 50 → 90 % of the time
    text = format_result({"cpu": "test CPU", "cpus": 2, "command": "x", "rows": rows, "growth": {"evaluate": g},
                          "drills": []})
    assert "evaluate     1000000: 400 420 430 430 430 431 431 432 432 600" in text
    assert f"driver +190.7 B/image ({g['driver_streaming_bytes_per_image']:+.1f} while the largest streams" in text
    assert "evaluate: driver < 100 B/image: FAIL (190.7)" in text     # the peak slope is what the target reads


def test_a_run_without_a_curve_has_no_streaming_slope():
    g = growth([_row("segment", 10_000, 400), _row("segment", 100_000, 405)])["segment"]
    assert "driver_streaming_bytes_per_image" not in g and round(g["driver_bytes_per_image"], 1) == 58.3


def test_memory_figures_come_from_proc_without_extra_packages():
    """The benchmarks read /proc themselves (psutil is not a dependency: `bench stages` imported it
    and failed before it measured anything)."""
    from pipelines.bench.common import peak_rss_mb
    from pipelines.bench.peak import high_water_mark, memory
    assert 0 < memory("self", "VmRSS") <= high_water_mark() and memory(2 ** 22 + 1) == 0     # no such process
    mine = peak_rss_mb(include_ray_workers=False)
    assert 0 < mine <= high_water_mark() / 2 ** 20                  # a high-water mark only rises
    assert peak_rss_mb(include_ray_workers=True) >= mine
