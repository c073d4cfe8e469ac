"""When a net counts as trained to convergence: the rule every job records and the report states.

A transfer compared with a base that stopped short measures extra training, not transfer (a copied
layer gets its training twice), so each job records `plateau_rise` and `converged` from its own
validation curve; the analysis leaves out comparisons against bases that did not converge. Pure
Python: the analysis reads the rule's text without importing torch.

    rise = plateau_rise(history, total_steps)      # history: [{"step": ..., "val_top1": ...}, ...]
"""
from __future__ import annotations

# The convergence rule the report states: validation top-1 rose by less than PLATEAU_POINTS over the last
# 20 % of training, measured as the mean of the evaluations in the last tenth of the steps minus the mean
# of those in the tenth that ends at 80 % (two windows, so one noisy evaluation does not decide it).
PLATEAU_POINTS = 0.01
PLATEAU_RULE = ("validation top-1 rose by less than 1 point over the last 20 % of training (mean of the "
                "evaluations in the last 10 % of the steps minus the mean of those between 70 % and 80 %)")


def plateau_rise(history, total_steps: int) -> float:
    """How much validation top-1 rose over the last 20 % of training (NaN without evaluations in both
    windows); converged when below PLATEAU_POINTS."""
    def window(low, high):
        values = [h["val_top1"] for h in history if low * total_steps < h["step"] <= high * total_steps]
        return sum(values) / len(values) if values else float("nan")
    return window(0.9, 1.0) - window(0.7, 0.8)


PLATEAU_PATIENCE = 3       # epochs a learning-rate level is judged over (--until-plateau)


def plateau_state(epoch_top1: list, decays: int, patience: int = PLATEAU_PATIENCE) -> tuple[int, bool]:
    """--until-plateau's schedule from each finished epoch's validation top-1: (learning-rate level = decays
    so far, stop?). A level has plateaued once the mean of its last `patience` epochs is less than
    PLATEAU_POINTS above the mean of the `patience` before them; then the rate decays, and after `decays`
    decays training stops. A pure function of the curve, so a resumed trial takes the same path."""
    level, start = 0, 0
    for end in range(1, len(epoch_top1) + 1):
        seen = epoch_top1[start:end]
        if len(seen) < 2 * patience:
            continue
        recent, before = seen[-patience:], seen[-2 * patience:-patience]
        if sum(recent) / patience - sum(before) / patience < PLATEAU_POINTS:
            if level == decays:
                return level, True
            level, start = level + 1, end
    return level, False
