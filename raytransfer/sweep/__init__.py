"""The sweep: jobs and keys, the durable job store, the dependency searcher, the weights registry,
the Tune wiring and the results table. `main(GRID)` is what a sweep file calls."""
__all__ = ["main"]


def __getattr__(name):
    """`main` on first use: `raytransfer status` imports this package without the runner (torch, Ray)."""
    if name == "main":
        from .runner import main
        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
