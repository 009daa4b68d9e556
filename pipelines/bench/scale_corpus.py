"""`pipelines.bench scale`'s corpora: an image folder of N 32² TM-dSprites photos with their masks,
in folders of 1,000 files (train/ 90 %, test/ 10 %), drawn from a pool of 10,000 renders so that
writing 10⁶ files costs minutes; written once by Ray tasks and cached."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

POOL = 10_000            # distinct scenes the corpus is drawn from
SHARD = 1_000            # files per folder


def _pool_pngs(lo: int, hi: int) -> list[tuple[bytes, bytes]]:
    import io

    from PIL import Image

    from drc_core.tmds import render
    out = []
    for i in range(lo, hi):
        s = render("train", i, size=32, sprite_size=(0.25, 0.45))
        a, b = io.BytesIO(), io.BytesIO()
        Image.fromarray(s.image).save(a, format="PNG")
        Image.fromarray((s.fg > 0).astype(np.uint8) * 255).save(b, format="PNG")
        out.append((a.getvalue(), b.getvalue()))
    return out


def _write_shard(root: str, n: int, shard: int, pool: list[tuple[bytes, bytes]]) -> int:
    train = int(n * 0.9)
    for i in range(shard * SHARD, min(n, (shard + 1) * SHARD)):
        split = "train" if i < train else "test"
        rel = f"{split}/{i // SHARD:05d}/{i:07d}.png"
        image, mask = pool[i % len(pool)]
        for sub, data in (("images", image), ("masks", mask)):
            path = Path(root, sub, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return shard


def corpus(n: int, cache: Path) -> Path:
    """The cached image folder of n photos (cache/tmds32-n/{images,masks}), written once by Ray tasks."""
    import ray
    root = cache / f"tmds32-{n}"
    if (root / ".complete").exists():
        return root
    pool_file = cache / "pool-32.json"
    if pool_file.exists():
        pool = [(bytes.fromhex(a), bytes.fromhex(b)) for a, b in json.loads(pool_file.read_text())]
    else:
        render = ray.remote(_pool_pngs)
        step = POOL // 20
        pool = [p for part in ray.get([render.remote(lo, lo + step) for lo in range(0, POOL, step)]) for p in part]
        cache.mkdir(parents=True, exist_ok=True)
        pool_file.write_text(json.dumps([(a.hex(), b.hex()) for a, b in pool]))
    ref = ray.put(pool)
    write = ray.remote(_write_shard)
    ray.get([write.remote(str(root), n, k, ref) for k in range(-(-n // SHARD))])
    (root / ".complete").write_text(str(n))
    return root
