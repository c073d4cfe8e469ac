"""The one error type of the sweep's input checks (imported by the driver and the Tune wiring alike)."""


class SweepError(ValueError):
    """Bad input to the sweep: named, with the fix, raised before anything trains."""
