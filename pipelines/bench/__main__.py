"""`python -m pipelines.bench <benchmark> …` (the package's docstring lists them)."""
from __future__ import annotations

import argparse
import sys

import pipelines.bench as package
from pipelines.bench import core, quality, refine, scale, segment, stages


def main(argv: list[str] | None = None) -> None:
    prog = "python -m pipelines.bench" if sys.argv[0].endswith("__main__.py") else None    # else `drc bench`
    p = argparse.ArgumentParser(prog=prog, description=package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    core.add_parser(sub)
    stages.add_parsers(sub)
    segment.add_parser(sub)
    quality.add_parser(sub)
    refine.add_parser(sub)
    scale.add_parser(sub)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
