"""Figures and the offline HTML report of a transfer sweep, from its results table alone.

Reads only the sweep's results table (`results.csv`/`results.parquet`, `curves.csv`) and the paper's
logged networks shipped in `analysis/data/`; never imports ray or torch.
Usage: `python -m analysis RESULTS_DIR [--out DIR]`, `python -m analysis.paper --out DIR`, or
`from analysis import build_report; build_report(results_dir)`.
"""

from analysis.report import build_report

__all__ = ["build_report"]
