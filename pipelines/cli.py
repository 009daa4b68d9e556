"""`drc <stage> …`: one command for every stage; `drc <stage> --help` is the stage's own help.

Each subcommand is the stage module's command line unchanged (`drc train …` ≡
`python -m pipelines.train …`), so both spellings keep working.
"""
from __future__ import annotations

import importlib
import sys

STAGES = {
    "quickstart": "every stage on local Ray + MLflow, with an HTML report",
    "preprocess": "images or synthetic data → a sharded Parquet dataset (Ray Data)",
    "train": "data-parallel DRC training with persistent chains (Ray Train)",
    "tune": "a hyperparameter study (Ray Tune + MLflow)",
    "distill": "a fast feed-forward segmenter from a trained model",
    "segment": "batch segmentation of a dataset or an image folder (Ray Data)",
    "evaluate": "IoU/Dice against masks, GrabCut and trivial baselines, an HTML report",
    "plan": "memory, FLOPs and time of a training run before paying for it",
    "bench": "speed and quality benchmarks",
    "local": "single-process training with learning curves (experiments)",
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {text}" for name, text in STAGES.items()]
    return ("usage: drc <stage> [options]     (drc <stage> --help for a stage's options)\n\n"
            "Deep Region Competition on Ray: unsupervised foreground extraction.\n\nstages:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        sys.exit(f"drc: unknown stage {stage!r}\n\n{usage()}")
    # a package's command line is its __main__ (the benchmarks)
    module = importlib.import_module(f"pipelines.{stage}.__main__" if stage == "bench" else f"pipelines.{stage}")
    sys.argv = [f"drc {stage}", *rest]             # argparse names the command in its messages
    module.main(rest)


if __name__ == "__main__":
    main()
