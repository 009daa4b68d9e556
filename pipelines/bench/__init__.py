"""Benchmarks (not tests): measured side by side in one run, printed as ratios; `python -m
pipelines.bench --help` lists them.

    python -m pipelines.bench core [--presets paper-tmds:8 cpu-64:32] [--iterations 1] [--device cuda --profile]
    python -m pipelines.bench preprocess [--images 2000 --size 128]
    python -m pipelines.bench train [--preset cpu-32 --workers 1 2 --iterations 30]
    python -m pipelines.bench segment [--preset cpu-32 --train-iterations 300]
    python -m pipelines.bench quality [--preset cpu-32 --minutes 20 --seeds 2]
    python -m pipelines.bench quality --recipe photos --photos DIR --masks DIR [--sets 2]
    python -m pipelines.bench refine --segmentation OUT/segmentation --photos DIR --masks DIR
    python -m pipelines.bench scale [--images 10000 100000 1000000]

Modules: core (EM iteration and Langevin loop against the device's measured peaks), stages
(preprocess and train), segment (Langevin vs amortised vs GrabCut), quality (IoU/Dice curves beside
the baselines), recipe (the README's photo recipe as commands), refine
(GrabCut refinement variants per photo on a segment output), scale (every stage's time and
memory as the corpus grows, kill-and-resume), texture_fit (an experiment the docs cite), common.
"""
