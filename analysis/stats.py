"""The numbers behind the report's figures: Table 1 and per-layer effects with bootstrap intervals.

Every function takes the rows of `results.with_base(...)` (one row per network, `rel` = the network
minus the base trained on its own target half) and returns plain data. Usage:
`table1(rows)`, `layer_effects(rows)`. The paper's four findings: analysis/findings.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.results import BASE_TREATMENTS, METRIC, UNIT, similar_rows

LAYER_RANGES = {"1-7": (1, 7), "3-7": (3, 7), "5-7": (5, 7)}  # the paper's Table 1 rows
EFFECTS = (  # name, what it is, treatments it rests on
    ("co-adaptation loss", "base − BnB", ("BnB",)),
    ("specificity loss", "BnB − AnB", ("BnB", "AnB")),
    ("fine-tuning boost", "AnB+ − base", ("AnB+",)),
)
EFFECT_FROM_MEANS = {  # effect from the mean paired difference (network − its base) of each treatment
    "co-adaptation loss": lambda means: -means["BnB"],
    "specificity loss": lambda means: means["BnB"] - means["AnB"],
    "fine-tuning boost": lambda means: means["AnB+"],
}
# The independent unit of the bootstrap is analysis.results.UNIT (split x training seed x target half): every
# network of a unit shares that unit's bases, so networks are not independent draws but units are; resampling
# units keeps the base-to-transfer correlation inside each draw.


def _mean(values) -> float | None:
    values = pd.Series(values, dtype=float).dropna()
    return float(values.mean()) if len(values) else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table1(rows: pd.DataFrame) -> dict:
    """AnB+ − base and AnB+ − BnB+ over layers 1–7, 3–7, 5–7 on the similar split, two ways.

    pooled (as the paper did): mean of all AnB+ networks with n in the range, minus the mean of all
    base networks (resp. of all BnB+ networks in the range). paired: each network minus the base of
    its own target half (same split and seed), averaged over the networks in the range; the
    AnB+ − BnB+ entry is the difference of the two paired averages. Values are fractions; None
    where the rows are missing."""
    sim = similar_rows(rows)
    bases = sim.loc[sim["treatment"].isin(BASE_TREATMENTS), METRIC]
    result = {"pooled": {}, "paired": {}}
    for label, (low, high) in LAYER_RANGES.items():
        in_range = sim["n"].between(low, high)
        anb_plus = sim[in_range & (sim["treatment"] == "AnB+")]
        bnb_plus = sim[in_range & (sim["treatment"] == "BnB+")]
        result["pooled"][label] = {
            "AnB+ - base": _minus(_mean(anb_plus[METRIC]), _mean(bases)),
            "AnB+ - BnB+": _minus(_mean(anb_plus[METRIC]), _mean(bnb_plus[METRIC])),
        }
        result["paired"][label] = {
            "AnB+ - base": _mean(anb_plus["rel"]),
            "AnB+ - BnB+": _minus(_mean(anb_plus["rel"]), _mean(bnb_plus["rel"])),
        }
    return result


def table1_counts(rows: pd.DataFrame) -> dict:
    """How many networks each Table 1 row rests on (pooled; paired drops those without a base)."""
    sim = similar_rows(rows)
    n_bases = int(sim["treatment"].isin(BASE_TREATMENTS).sum())
    counts = {}
    for label, (low, high) in LAYER_RANGES.items():
        in_range = sim[sim["n"].between(low, high)]
        counts[label] = {
            "AnB+": int((in_range["treatment"] == "AnB+").sum()),
            "BnB+": int((in_range["treatment"] == "BnB+").sum()),
            "base": n_bases,
            "AnB+ paired": int(((in_range["treatment"] == "AnB+") & in_range["rel"].notna()).sum()),
            "BnB+ paired": int(((in_range["treatment"] == "BnB+") & in_range["rel"].notna()).sum()),
        }
    return counts


def layer_effects(rows: pd.DataFrame, n_boot: int = 2000, confidence: float = 0.95,
                  rng_seed: int = 0) -> pd.DataFrame:
    """Per n: co-adaptation loss, specificity loss and fine-tuning boost on the similar split, each
    from paired differences (network − its base), with a bootstrap interval over units.

    The bootstrap resamples units (split seed × training seed) with replacement and gives the
    standard error of each estimate; the interval is estimate ± t(G − 1) · √(G / (G − 1)) · SE for
    G units. A percentile interval is not used: from the 2–4 units a sweep usually has it cannot
    reach past the unit means and would be far too narrow.
    Returns columns effect, label, n, estimate, low, high, networks, units; low/high are NaN when
    fewer than 2 units hold the networks an effect needs (no interval from one unit)."""
    sim = similar_rows(rows)
    sim = sim[sim["treatment"].isin(["BnB", "AnB", "AnB+"]) & sim["rel"].notna()]
    units = sorted({tuple(u) for u in sim[list(UNIT)].itertuples(index=False)})
    unit_index = {u: i for i, u in enumerate(units)}
    sim = sim.assign(_unit=[unit_index[tuple(u)] for u in sim[list(UNIT)].itertuples(index=False)])
    rng = np.random.default_rng(rng_seed)
    # weights[b, g]: how often unit g is drawn in bootstrap sample b
    weights = rng.multinomial(len(units), np.full(len(units), 1 / len(units)), size=n_boot) if units else None

    records = []
    for n in sorted(sim["n"].unique()):
        at_n = sim[sim["n"] == n]
        means, boot, counts, unit_sets = {}, {}, {}, {}
        for treatment in ("BnB", "AnB", "AnB+"):
            chosen = at_n[at_n["treatment"] == treatment]
            sums = np.bincount(chosen["_unit"], weights=chosen["rel"], minlength=len(units))
            count = np.bincount(chosen["_unit"], minlength=len(units)).astype(float)
            counts[treatment] = int(count.sum())
            unit_sets[treatment] = set(np.flatnonzero(count))
            means[treatment] = sums.sum() / count.sum() if count.sum() else np.nan
            with np.errstate(invalid="ignore", divide="ignore"):
                boot[treatment] = (weights @ sums) / (weights @ count)
        for effect, label, needs in EFFECTS:
            if any(counts[t] == 0 for t in needs):
                continue
            estimate = float(EFFECT_FROM_MEANS[effect](means))
            units_used = set.union(*(unit_sets[t] for t in needs))
            low = high = math.nan
            if len(units_used) >= 2:
                samples = EFFECT_FROM_MEANS[effect](boot)
                units_count = len(units_used)
                standard_error = np.nanstd(samples) * math.sqrt(units_count / (units_count - 1))
                half_width = t_quantile((1 + confidence) / 2, units_count - 1) * standard_error
                low, high = estimate - half_width, estimate + half_width
            records.append({"effect": effect, "label": label, "n": int(n), "estimate": estimate,
                            "low": low, "high": high, "networks": sum(counts[t] for t in needs),
                            "units": len(units_used)})
    return pd.DataFrame(records, columns=["effect", "label", "n", "estimate", "low", "high",
                                          "networks", "units"])


def t_quantile(probability: float, df: int) -> float:
    """Quantile of Student's t with df degrees of freedom (scipy)."""
    from scipy import stats

    return float(stats.t.ppf(probability, df))
