"""The main job on the embedded default: TM-dSprites at a CPU preset, trained and evaluated.

    python -m pipelines.quickstart [--tiny] [--minutes M]

For now this runs drc_core's local training (pipelines.local) and prints the learning curve, the
final IoU/Dice against trivial baselines, and where the results are. The Ray pipeline
(preprocess → train → segment → evaluate, tracked in MLflow) replaces it as its stages land.
"""
from __future__ import annotations

import argparse

from pipelines import local


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a one-minute run on 200 images")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--out", default="runs")
    args = p.parse_args(argv)
    forwarded = ["--preset", "cpu-32", "--out", args.out, "--minutes", str(1.0 if args.tiny else args.minutes),
                 "--eval-every", str(30 if args.tiny else 60)]
    if args.tiny:
        forwarded += ["--eval-images", "50", "data.train_size=200"]
    return local.main(forwarded)


if __name__ == "__main__":
    main()
