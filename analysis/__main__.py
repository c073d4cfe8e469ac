"""CLI: `python -m analysis RESULTS_DIR [--out DIR]` (re)builds the report of a finished or running sweep."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from analysis.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    parser.add_argument("results_dir", type=Path, help="the sweep's results folder (holds results.csv)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: RESULTS_DIR)")
    parser.add_argument("--dataset", default=None, help="keep only this dataset (default: the one with most rows)")
    parser.add_argument("--arch", default=None, help="keep only this architecture")
    parser.add_argument("--recipe", default=None, help="keep only this recipe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = build_report(args.results_dir, args.out, dataset=args.dataset, arch=args.arch, recipe=args.recipe)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
