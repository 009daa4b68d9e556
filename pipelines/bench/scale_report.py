"""What `pipelines.bench scale` measured, reduced and printed: the growth of every stage between the
smallest and largest corpus (bytes per image of the driver, of the largest worker and of the object
store; images/s and s/iteration ratios), the targets of docs/scale.md with pass/fail, and the
projection to a corpus and cluster size from those slopes."""
from __future__ import annotations

MB = 2 ** 20


def growth(rows: list[dict]) -> dict:
    """Per stage, between its smallest and largest measured size: driver bytes per image (slope),
    the largest worker's and the object store's slope, images/s ratio (largest / smallest)."""
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        rs = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["images"])
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        dn = b["images"] - a["images"]
        slope = lambda k: ((b[k] or 0) - (a[k] or 0)) / dn if a.get(k) is not None and b.get(k) is not None else None
        g = {"from": a["images"], "to": b["images"], "driver_bytes_per_image": slope("driver_peak"),
             "worker_bytes_per_image": slope("worker_peak"), "store_bytes_per_image": slope("store_peak")}
        if a.get("images_per_s") and b.get("images_per_s"):
            g["images_per_s_ratio"] = b["images_per_s"] / a["images_per_s"]
        curve = b.get("driver_curve") or []
        if len(curve) == 10 and curve[4] and b.get("images"):
            # the largest run's own streaming half: 50 → 90 % of its wall time (~40 % of its images
            # at a steady rate; the last tenth is its report and manifest)
            g["driver_streaming_bytes_per_image"] = (curve[8] - curve[4]) / (0.4 * b["images"])
        if stage == "train":
            g["s_per_iteration_ratio"] = b["s_per_iteration"] / a["s_per_iteration"]
            more = b["shard_rows"] - a["shard_rows"]
            if more > 0:
                g["worker_bytes_per_shard_image"] = (b["worker_peak"] - a["worker_peak"]) / more
                chains = sum(b["checkpoint_chain_bytes"].values()) / (len(b["checkpoint_chain_bytes"]) * b["shard_rows"])
                g["shard_image_bytes"] = b.get("image_bytes", 32 * 32 * 3) + chains
        out[stage] = g
    return out


def projection(result: dict, images: int, nodes: int, cpus: int) -> dict:
    """Each stage at `images` on `nodes` nodes of `cpus` CPUs like this one, extrapolated linearly
    from the two ends of the measured sizes: the driver's peak memory; a worker's (for train, from
    the bytes per image of its shard: one worker per CPU, 90 % of the images training); hours from
    images/s per CPU; for train, the chain bytes of a base over all workers and of one checkpoint's
    deltas, which depend on the batch and the checkpoint interval, not on the corpus."""
    gib, out = 2 ** 30, {}
    for stage, g in result["growth"].items():
        rows = sorted((r for r in result["rows"] if r["stage"] == stage), key=lambda r: r["images"])
        a, b = rows[0], rows[-1]
        p = {"driver_gb": ((b["driver_peak"] or 0) + max(0.0, g["driver_bytes_per_image"] or 0)
                           * (images - b["images"])) / gib}
        if stage == "train":
            per_image = (b["worker_peak"] - a["worker_peak"]) / max(1, b["shard_rows"] - a["shard_rows"])
            shard = images * 0.9 / (nodes * cpus)
            p["worker_gb"] = (b["worker_peak"] + per_image * (shard - b["shard_rows"])) / gib
            base = sum(b["checkpoint_chain_bytes"].values()) / (2 * b["shard_rows"])       # bytes per chain
            p["chains_base_gb"] = base * images * 0.9 / gib
            p["checkpoint_delta_mb_per_worker"] = max(b["second_checkpoint_chain_bytes"].values()) / 2 ** 20
            p["s_per_iteration"] = b["s_per_iteration"]
        else:
            p["worker_gb"] = (b["worker_peak"] + max(0.0, g["worker_bytes_per_image"] or 0)
                              * (images - b["images"])) / gib
            per_cpu = b["images_per_s"] / result["cpus"]
            p["images_per_s_per_cpu"] = per_cpu
            p["hours"] = images / (per_cpu * nodes * cpus) / 3600
        out[stage] = p
    return out


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / MB:.0f}"


def format_result(r: dict) -> str:
    lines = [f"pipelines.bench scale on {r['cpu']}, a Ray cluster of {r['cpus']} CPUs ({r['command']})", "",
             f"{'stage':<11}{'images':>9}{'wall s':>9}{'images/s':>10}{'driver MB':>11}{'worker MB':>11}"
             f"{'store MB':>10}{'written MB':>12}"]
    for x in r["rows"]:
        ips = "" if not x.get("images_per_s") else f"{x['images_per_s']:.0f}"
        lines.append(f"{x['stage']:<11}{x['images']:>9}{x['seconds']:>9.0f}{ips:>10}{_mb(x['driver_peak']):>11}"
                     f"{_mb(x['worker_peak']):>11}{_mb(x['store_peak']):>10}{_mb(x.get('bytes')):>12}")
    curves = [x for x in r["rows"] if len(x.get("driver_curve") or []) == 10]
    if curves:
        lines += ["", "driver MB up to each tenth of the run's wall time:"]
        lines += [f"  {x['stage']:<11}{x['images']:>9}: " + " ".join(_mb(v) for v in x["driver_curve"]) for x in curves]
    trains = [x for x in r["rows"] if x["stage"] == "train"]
    if trains:
        lines += ["", "train: s/iteration; per worker: checkpoint write s, chain bytes written (1st / 2nd checkpoint), "
                      "restore s, bytes read"]
        for x in trains:
            lines.append(f"  {x['images']:>9}: {x['s_per_iteration']:.3f} s/it "
                         f"({' / '.join(f'{v:.3f}' for v in x.get('s_per_iteration_runs', []))}), shard {x['shard_rows']} chains, write "
                         f"{x['checkpoint_s']}, chains {x['checkpoint_chain_bytes']} / "
                         f"{x['second_checkpoint_chain_bytes']}, restore {x['restore_s']}, read {x['restore_bytes']}")
    lines += ["", "growth (smallest → largest size):"]
    for stage, g in r["growth"].items():
        lines.append(f"  {stage:<11} driver {g['driver_bytes_per_image'] or 0:+.1f} B/image"
                     + (f" ({g['driver_streaming_bytes_per_image']:+.1f} while the largest streams: 50 → 90 % of its time)"
                        if g.get("driver_streaming_bytes_per_image") is not None else "")
                     + f", worker {g['worker_bytes_per_image'] or 0:+.1f} B/image"
                     + (f", images/s ×{g['images_per_s_ratio']:.2f}" if "images_per_s_ratio" in g else "")
                     + (f", s/iteration ×{g['s_per_iteration_ratio']:.2f}" if "s_per_iteration_ratio" in g else ""))
    lines += ["", "targets:"]
    for stage, g in r["growth"].items():
        d = g["driver_bytes_per_image"] or 0
        lines.append(f"  {stage}: driver < 100 B/image: {'PASS' if d < 100 else 'FAIL'} ({d:.1f})")
        if "images_per_s_ratio" in g and stage in ("preprocess", "segment", "evaluate"):
            lines.append(f"  {stage}: images/s at the largest ≥ 0.8× the smallest: "
                         f"{'PASS' if g['images_per_s_ratio'] >= 0.8 else 'FAIL'} ({g['images_per_s_ratio']:.2f})")
        if "s_per_iteration_ratio" in g:
            lines.append(f"  train: s/iteration within 10 %: {'PASS' if abs(g['s_per_iteration_ratio'] - 1) <= 0.1 else 'FAIL'}"
                         f" ({g['s_per_iteration_ratio']:.2f})")
            w = g.get("worker_bytes_per_shard_image")
            if w is not None:
                own = g["shard_image_bytes"]
                lines.append(f"  train: a worker grows by {w:.0f} B per image of its shard, ≤ 2× what it owns per image "
                             f"({own:.0f} B: the uint8 image and its chains): {'PASS' if w <= 2 * own else 'FAIL'}")
    for d in r["drills"]:
        share = d["resumed_processed"] / d["n"] if d.get("resumed_processed") is not None else None
        lines.append(f"  {d['stage']} at {d['n']}: killed {d['killed']}, {d['rows_kept']} rows kept, resumed run "
                     f"processed {share:.0%} (≤ 55 %: {'PASS' if share is not None and share <= 0.55 else 'FAIL'}), "
                     f"every input once: {d['every_input_once']}, identical: {d['identical_to_uninterrupted']}")
    if r.get("projection"):
        q = r["projected"]
        lines += ["", f"projection to {q['images']:,} images on {q['nodes']} nodes of {q['cpus_per_node']} CPUs like "
                      f"this one (linear in the measured slopes):"]
        for stage, p in r["projection"].items():
            lines.append(f"  {stage:<11}" + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
    return "\n".join(lines)
