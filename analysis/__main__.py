"""CLI: `python -m analysis RESULTS_DIR [--out DIR] [--dataset D] [--arch A] [--recipe R]` (re)builds the
report of a finished or running sweep (`raytransfer report` takes the same arguments).

Bad input (a folder without a results table, a table that breaks the results contract, a setting the
table lacks) is one line naming the problem and the fix (ReportError); any other error is a bug and
shows its traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


class ReportError(ValueError):
    """Bad input to the report: the message names the problem and the fix."""


def add_report_args(parser: argparse.ArgumentParser):
    parser.add_argument("results_dir", type=Path, help="the sweep's results folder (holds results.csv)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: RESULTS_DIR)")
    parser.add_argument("--dataset", default=None, help="keep only this dataset (default: the setting with most rows)")
    parser.add_argument("--arch", default=None, help="keep only this architecture")
    parser.add_argument("--recipe", default=None, help="keep only this recipe")


def report(args) -> Path:
    """The report of args.results_dir, its input checked first: the folder's table and the chosen setting."""
    from analysis.report import build_report, pick_setting
    from analysis.results import load_rows

    try:
        rows = load_rows(args.results_dir)                 # reads and checks the table: nothing else raises here
    except FileNotFoundError as e:
        raise ReportError(str(e)) from None
    except ValueError as e:
        raise ReportError(f"{args.results_dir}: {e}") from None
    try:
        pick_setting(rows, args.dataset, args.arch, args.recipe)   # raises only for a setting the table lacks
    except ValueError as e:
        raise ReportError(f"{e}: pass one of those (or drop the flag)") from None
    return build_report(args.results_dir, args.out, dataset=args.dataset, arch=args.arch, recipe=args.recipe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n")[0])
    add_report_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(report(args))
    except ReportError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
