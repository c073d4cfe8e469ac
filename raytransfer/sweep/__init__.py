"""The sweep: jobs and keys, the durable job store, the dependency searcher, the weights registry,
the Tune wiring and the results table. `main(GRID)` is what a sweep file calls."""
from .runner import main

__all__ = ["main"]
