"""The paper's four findings, each answered from the table's own rows with a paired 95 % interval.

A finding is an average of paired differences (a network minus the base of its target half, or two
networks of one unit) computed per *unit* -- one split (kind, seed, label) and one training seed,
whose networks all start from that unit's bases -- and then a Student-t interval over the units:
estimate ± t(0.975, G − 1) · sd / √G for G units. Units are the independent draws; networks inside
a unit are not (they share its bases). A comparison against a base that did not converge measures
extra training, not transfer, so networks whose base did not converge are left out and counted.

    check = science_check(with_base(rows))      # {"co_adaptation": {...}, "specificity": ..., ...}

Each finding: question, answer ("yes" / "no" / "unresolved" when the interval includes zero /
"not enough rows"), estimate and interval (accuracy units: 0.01 = 1 point), networks, units, text,
and for an unresolved one `seeds_to_resolve`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.results import BASE_TREATMENTS, UNIT
from analysis.stats import t_quantile

CONFIDENCE = 0.95
MIDDLE_N = (3, 6)          # co-adaptation: the paper's BnB dips at n = 3..6 (fragile co-adapted middle layers)
FINE_TUNED_N = (3, 7)      # fine-tuning boost: the paper's Table 1 row "3-7"
RANDOM_N_MIN = 3           # random frozen layers fail from n = 3 in the paper


def interval(values) -> tuple[float, float, float]:
    """Mean of per-unit values and its t interval (NaN bounds from fewer than two units)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile((1 + CONFIDENCE) / 2, len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def units_to_resolve(values) -> int | None:
    """How many units an effect of the measured size and spread needs for its interval to exclude zero
    (None when there is no spread to go by or no effect)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or values.std(ddof=1) == 0 or values.mean() == 0:
        return None
    ratio = float(values.std(ddof=1) / abs(values.mean()))
    for g in range(2, 10_000):
        if t_quantile((1 + CONFIDENCE) / 2, g - 1) * ratio / math.sqrt(g) < 1:
            return g
    return None


def _points(value: float) -> str:
    return f"{100 * value:+.1f} points"


@dataclass(frozen=True)
class LeftOut:
    """Networks left out of the findings for their base: it did not converge, or its convergence is unknown
    (a table from before the sweep recorded `converged`, or a base whose row does not say)."""
    not_converged: int = 0
    unknown: int = 0

    def __int__(self) -> int:
        return self.not_converged + self.unknown

    def fields(self) -> dict:
        return {"left_out_unconverged_base": self.not_converged, "left_out_unknown_convergence": self.unknown}

    def text(self) -> str:
        parts = ([f"{self.not_converged} networks left out: their base did not converge."] if self.not_converged
                 else [])
        if self.unknown:
            parts.append(f"{self.unknown} networks left out: their base's convergence is not recorded (a table from "
                         "before the sweep recorded it): rerun those bases, or rebuild the table with a current "
                         "sweep.")
        return " ".join(parts)


def usable(rows: pd.DataFrame) -> tuple[pd.DataFrame, LeftOut]:
    """Networks with a base in the table whose base converged; and how many were left out because their base
    did not converge or its convergence is unknown (NaN/None, or no `base_converged` column at all): a
    comparison with a base that may have stopped short measures extra training, not transfer."""
    with_base = rows[rows["rel"].notna() & ~rows["treatment"].isin(BASE_TREATMENTS)]
    known = (with_base["base_converged"] if "base_converged" in rows.columns
             else pd.Series(None, index=with_base.index, dtype=object))
    state = known.map(_truth)                                  # True / False / None (unknown)
    converged, short = state.eq(True), state.eq(False)
    return with_base[converged], LeftOut(not_converged=int(short.sum()), unknown=int(state.isna().sum()))


def _truth(value) -> bool | None:
    """True / False for a recorded convergence (bool, numpy bool, 1/0), None for NaN, None or anything else."""
    if isinstance(value, (bool, np.bool_, int, float)) and value == value and value in (0, 1):
        return bool(value)
    return None


def _per_unit(frame: pd.DataFrame) -> pd.Series:
    """Per unit: the mean over n of the per-n mean of `rel` (each n weighs the same)."""
    if frame.empty:
        return pd.Series(dtype=float)
    per_n = frame.groupby(list(UNIT) + ["n"])["rel"].mean()
    return per_n.groupby(level=list(range(len(UNIT)))).mean()


def _answer(estimate, low, high, positive_is_yes: bool) -> str:
    if math.isnan(low):
        return "unresolved"
    if low > 0:
        return "yes" if positive_is_yes else "no"
    if high < 0:
        return "no" if positive_is_yes else "yes"
    return "unresolved"


def _finding(question: str, values: pd.Series, networks: int, positive_is_yes: bool, what: str,
             left_out: LeftOut, lacking: str | None = None, unit: str | None = None) -> dict:
    result = {"question": question, "confidence": CONFIDENCE, "networks": int(networks), "units": int(len(values)),
              **left_out.fields()}
    if lacking or len(values) == 0:
        result.update(answer="not enough rows", estimate=None, interval=None,
                      text=f"not enough rows: {lacking or 'no networks with a converged base'}."
                           + (f" {left_out.text()}" if int(left_out) else ""))
        return result
    estimate, low, high = interval(values)
    answer = _answer(estimate, low, high, positive_is_yes)
    result.update(answer=answer, estimate=estimate, interval=None if math.isnan(low) else [low, high])
    bounds = "no interval from one unit" if math.isnan(low) else f"95 % interval {_points(low)} to {_points(high)}"
    result["text"] = (f"{answer}: {what} {_points(estimate)} ({bounds}; {networks} networks, {len(values)} "
                      f"independent units of {unit or 'split × training seed × target half'}).")
    if int(left_out):
        result["text"] += f" {left_out.text()}"
    if answer == "unresolved":
        need = units_to_resolve(values)
        if need is not None:
            units_per_seed = len(values) / values.index.get_level_values("seed").nunique()
            seeds = max(1, math.ceil(need / units_per_seed))
            result["seeds_to_resolve"] = seeds
            result["text"] += (f" An effect of this size and spread needs about {need} units to resolve: "
                               f"--train-seeds with {seeds} seeds on this grid.")
        elif math.isnan(low):
            result["text"] += " More training seeds (--train-seeds 0,1,2,...) give an interval."
        else:
            result["text"] += (" Its estimate is too close to zero to resolve with any practical number of training "
                               "seeds (more than 10,000 units).")
    return result


def science_check(rows: pd.DataFrame) -> dict:
    """The four findings, from rows of `results.with_base` (optionally with `base_converged`)."""
    nets, left_out = usable(rows)

    found = {"co_adaptation": co_adaptation(nets, left_out)}
    found["specificity"] = _specificity(nets, left_out)

    low, high = FINE_TUNED_N
    anbp = nets[(nets["treatment"] == "AnB+") & nets["n"].between(low, high) & (nets["split_kind"] == "similar")]
    found["fine_tuning"] = _finding(
        f"Does fine-tuning transferred layers (AnB+) beat the base (mean over n = {low}..{high}, similar split)? "
        "The paper: a small boost (+1.6 points).",
        _per_unit(anbp), len(anbp), positive_is_yes=True, what=f"AnB+ minus its base, n = {low}..{high}:",
        left_out=left_out,
        lacking=None if len(anbp) else f"no AnB+ network at n = {low}..{high} on the similar split with its base")

    found["random_vs_transfer"] = _random_vs_transfer(nets, left_out)
    return found


def _middle_bnb(nets: pd.DataFrame) -> pd.DataFrame:
    low, high = MIDDLE_N
    return nets[(nets["treatment"] == "BnB") & nets["n"].between(low, high)]


def co_adaptation(nets: pd.DataFrame, left_out: LeftOut) -> dict:
    """BnB minus its base, mean over the middle layers (MIDDLE_N), per unit then a t interval over units."""
    low, high = MIDDLE_N
    bnb = _middle_bnb(nets)
    return _finding(
        f"Does BnB (frozen selffer) fall below its base at the middle layers (mean over n = {low}..{high})?",
        _per_unit(bnb), len(bnb), positive_is_yes=False, what=f"BnB minus its base, n = {low}..{high}, all splits:",
        left_out=left_out,
        lacking=None if len(bnb) else f"no BnB network at n = {low}..{high} with its base")


def co_adaptation_by_arm(arms: dict, rule: str, small: set | None = None) -> dict | None:
    """Co-adaptation answered for each arm of a table that trained one grid several ways (e.g. the demo with batch
    norm and the demo with the paper's LRN and dropout: `--recipes demo,demo_lrn`). `arms`: {label: rows of
    `results.with_base` of one setting}, the report's main arm first. Per arm the finding (interval, networks,
    units), its bases' convergence and its second schedule's gain; per other arm its difference from the main
    one, paired by unit (split x training seed x target half: the arms train the same grid); and one sentence on
    what the difference means. `small`: labels of arms whose nets are CPU-sized (the demo recipes), where a
    finding not reproduced has an expected reading. None where the table holds one arm."""
    if len(arms) < 2:
        return None
    per_arm, values = {}, {}
    for label, rows in arms.items():
        nets, left_out = usable(rows)
        finding = co_adaptation(nets, left_out)
        convergence = convergence_summary(rows, rule)
        finding.update(bases=convergence["bases"], bases_not_converged=len(convergence["bases_not_converged"]),
                       second_schedule_gain=convergence.get("second_schedule_gain"))
        per_arm[label], values[label] = finding, _per_unit(_middle_bnb(nets))
    main, *others = list(arms)
    differences = {}
    for other in others:
        paired = (values[other] - values[main]).dropna()
        difference = {"minus": main, "units": int(len(paired)), "estimate": None, "interval": None}
        if len(paired):
            estimate, low, high = interval(paired)
            difference.update(estimate=estimate, interval=None if math.isnan(low) else [low, high])
        differences[other] = difference
    return {"main": main, "arms": per_arm, "difference": differences, "unit": "split × training seed × target half",
            "reading": arms_reading(per_arm, differences, main, small or set())}


def _interval_text(part: dict) -> str:
    if part.get("estimate") is None:
        return "no estimate"
    bounds = ("no interval" if part.get("interval") is None else
              f"95 % interval {_points(part['interval'][0])} to {_points(part['interval'][1])}")
    return f"{_points(part['estimate'])} ({bounds})"


def arms_reading(per_arm: dict, differences: dict, main: str, small: set) -> str:
    """One sentence (two where the finding is not reproduced) on what the arms' co-adaptation answers mean."""
    low, high = MIDDLE_N
    dips = [label for label, part in per_arm.items() if part["answer"] == "yes"]
    answered = [label for label, part in per_arm.items() if part["answer"] not in ("not enough rows",)]
    if len(answered) < 2:
        return ("Not every arm has BnB networks at n = "
                f"{low}..{high} with a converged base, so the arms cannot be compared yet.")
    parts = []
    for other, difference in differences.items():
        if difference["estimate"] is None:
            continue
        text = f"BnB minus its base with {other} minus the same with {main}, paired by unit: {_interval_text(difference)}"
        resolved = difference["interval"] is not None and (difference["interval"][0] > 0 or difference["interval"][1] < 0)
        if resolved and difference["estimate"] < 0:
            parts.append(f"{text}: the upper layers recover less of what the frozen ones lose under {other}'s training, "
                         f"so co-adaptation shows more there than with {main}")
        elif resolved:
            parts.append(f"{text}: the upper layers recover more under {other}'s training than with {main}")
        else:
            parts.append(f"{text}: its interval includes zero, so this table cannot tell the arms apart: on these nets "
                         "the way they were trained (normalisation, dropout, schedule) did not measurably change how "
                         "well re-trained upper layers make up for frozen co-adapted ones")
    sentence = "; ".join(parts) + "." if parts else ""
    if dips:
        return (f"{sentence} The paper's dip (BnB below its base at n = {low}..{high}) shows with "
                f"{' and '.join(dips)}" + (f", not with {', '.join(l for l in per_arm if l not in dips)}." if
                                            len(dips) < len(per_arm) else "."))
    why = f" {DEMO_SIZE_READING}" if set(answered) <= small else ""
    return (f"{sentence} The paper's dip (BnB below its base at n = {low}..{high}) is not reproduced in any arm of "
            f"this table.{why}").strip()


DEMO_SIZE_READING = (
    "That is the expected reading at demo size: the demo recipes' nets (1/8 of the paper's width on 30 px crops: "
    "about 0.1M parameters) retrain their upper layers for a whole schedule on the images their frozen partners "
    "were trained on, so they are expected to relearn what the frozen layers feed them (layers of SGD-trained nets "
    "stitch with little loss: Bansal, Nakkiran & Barak 2021); the paper's dip (its logged BnB 1.8 and 3.0 points "
    "below the base at n = 4 and 5) is in a 60M-parameter net trained on 645k images a half.")


def co_adaptation_reading(finding: dict, small: bool) -> str | None:
    """What a table of one setting's co-adaptation answer means where the paper's dip does not show in it: with a
    demo-sized recipe (`small`) it is the expected reading, said with why; None where the dip shows, where there are
    no rows to answer, or for nets of the paper's size (no claim)."""
    if not small or finding["answer"] in ("yes", "not enough rows"):
        return None
    low, high = MIDDLE_N
    return (f"The paper's dip (BnB below its base at n = {low}..{high}) is not reproduced at demo size. "
            f"{DEMO_SIZE_READING} (benchmarks/RESULTS.md: neither the batch-norm demo nor the paper's normalisation "
            "and dropout, `--recipes demo,demo_lrn`, shows it, on two generated datasets.)")


WHOLE_UNIT = ("seed",)     # random frozen nets on the whole dataset (the paper): one unit per training seed


def _random_vs_transfer(nets: pd.DataFrame, left_out: int) -> dict:
    """random_frozen − its base minus AnB − its base, per n ≥ RANDOM_N_MIN, then per unit. Random frozen nets on a
    split's half (demo) pair with AnB in the same unit; on the whole dataset (the paper: all classes, against
    netbase) they belong to no split, so both sides are averaged per training seed and n (AnB over every
    split unit of that seed) and the unit is the training seed."""
    deep = nets[nets["n"] >= RANDOM_N_MIN]
    random_frozen, anb = deep[deep["treatment"] == "random_frozen"], deep[deep["treatment"] == "AnB"]
    whole = len(random_frozen) > 0 and random_frozen["split_kind"].eq("whole").all()
    unit = list(WHOLE_UNIT if whole else UNIT)
    wide = pd.concat({"random_frozen": random_frozen.groupby(unit + ["n"])["rel"].mean(),
                      "AnB": anb.groupby(unit + ["n"])["rel"].mean()}, axis=1).dropna()
    diff = (wide["random_frozen"] - wide["AnB"]).groupby(level=list(range(len(unit)))).mean()
    if len(unit) == 1:
        diff.index.name = unit[0]
    paired = wide.index
    counted = sum(int(part.set_index(unit + ["n"]).index.isin(paired).sum()) for part in (random_frozen, anb))
    against = ("random frozen layers on all classes minus netbase, against AnB minus its base averaged over the "
               "splits; unit: training seed" if whole else "unit: split × training seed × target half")
    result = _finding(
        f"Are random frozen layers below transferred ones (random_frozen − AnB, mean over n ≥ {RANDOM_N_MIN})?",
        diff, counted, positive_is_yes=False, what=f"random_frozen minus AnB, n ≥ {RANDOM_N_MIN} ({against}):",
        left_out=left_out, unit="training seed" if whole else None,
        lacking=None if len(diff) else f"no n ≥ {RANDOM_N_MIN} with both random_frozen and AnB networks and bases")
    result["unit"] = "training seed (random frozen nets on the whole dataset)" if whole else \
        "split × training seed × target half"
    return result


def welch_interval(a, b) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its Welch t interval (units of two independent groups)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    estimate = float(a.mean() - b.mean())
    if va + vb == 0:
        return estimate, estimate, estimate
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + CONFIDENCE) / 2, df) * math.sqrt(va + vb)
    return estimate, estimate - half, estimate + half


def _specificity(nets: pd.DataFrame, left_out: int) -> dict:
    """(AnB − base at n = 7, dissimilar) minus (the same, similar): paired by training seed where every seed
    has both split kinds (the demo's grid), else a Welch interval over the units of each kind."""
    question = "Does AnB fall further below its base at n = 7 on the dissimilar split than on the similar one?"
    anb7 = nets[(nets["treatment"] == "AnB") & (nets["n"] == 7)]
    units = {kind: _per_unit(anb7[anb7["split_kind"] == kind]) for kind in ("similar", "dissimilar")}
    lacking = [kind for kind, values in units.items() if values.empty]
    if lacking:
        return _finding(question, pd.Series(dtype=float), 0, False, "", left_out,
                        lacking=f"no AnB network at n = 7 with its base on the {' and '.join(lacking)} split")
    by_seed = {kind: values.groupby(level="seed").mean() for kind, values in units.items()}
    paired = (by_seed["dissimilar"] - by_seed["similar"]).dropna()
    networks = int(len(anb7[anb7["split_kind"].isin(["similar", "dissimilar"])]))
    if len(paired) >= 2:
        result = _finding(question, paired, networks, False, "(AnB − base at n = 7, dissimilar) minus (the same, "
                          "similar), paired by training seed:", left_out)
        result["pairing"] = "training seed"
    else:
        dissimilar, similar = units["dissimilar"], units["similar"]
        result = {"question": question, "confidence": CONFIDENCE, "networks": networks,
                  "units": int(len(dissimilar) + len(similar)), **left_out.fields(),
                  "pairing": "none (independent units of each split kind)"}
        if min(len(dissimilar), len(similar)) < 2:
            estimate = float(dissimilar.mean() - similar.mean())
            result.update(answer="unresolved", estimate=estimate, interval=None,
                          text=(f"unresolved: AnB − base at n = 7 is {_points(dissimilar.mean())} on the dissimilar "
                                f"split and {_points(similar.mean())} on the similar one ({_points(estimate)}, "
                                f"{networks} networks), but {min(len(dissimilar), len(similar))} unit of one kind "
                                "gives no interval: train several seeds of both (--train-seeds 0,1,2)."))
        else:
            estimate, low, high = welch_interval(dissimilar, similar)
            answer = _answer(estimate, low, high, positive_is_yes=False)
            result.update(answer=answer, estimate=estimate, interval=[low, high],
                          text=(f"{answer}: (AnB − base at n = 7, dissimilar) minus (the same, similar) "
                                f"{_points(estimate)} (95 % Welch interval {_points(low)} to {_points(high)}; "
                                f"{networks} networks, {len(dissimilar)} + {len(similar)} units)."))
        if int(left_out):
            result["text"] += f" {left_out.text()}"
    result["similar_AnB7_minus_base"] = float(units["similar"].mean())
    result["dissimilar_AnB7_minus_base"] = float(units["dissimilar"].mean())
    return result


def convergence_summary(rows: pd.DataFrame, rule: str) -> dict:
    """Which bases converged by `rule`, and what a second full schedule from a base's own weights gives
    (BnB+ at the deepest n: the base trained again; what fine-tuning gains from a second schedule, not transfer)."""
    bases = rows[rows["treatment"].isin(BASE_TREATMENTS)]
    known = bases[bases["converged"].isin([True, False])] if "converged" in bases else bases.iloc[:0]
    short = known[known["converged"].eq(False)]
    summary = {"rule": rule, "bases": int(len(bases)), "bases_with_rule": int(len(known)),
               "bases_not_converged": sorted(short["job_key"]),
               "base_top1": [float(v) for v in bases["top1_best10"]] if "top1_best10" in bases else []}
    if "plateau_rise" in bases:
        rises = pd.to_numeric(bases["plateau_rise"], errors="coerce").dropna()
        if len(rises):
            summary["base_plateau_rise"] = {"min": float(rises.min()), "median": float(rises.median()),
                                            "max": float(rises.max())}
    selffers = rows[(rows["treatment"] == "BnB+") & rows["rel"].notna()]
    if len(selffers):
        deepest = selffers[selffers["n"] == selffers["n"].max()]
        estimate, low, high = interval(_per_unit(deepest))
        summary["second_schedule_gain"] = {
            "n": int(deepest["n"].iloc[0]), "estimate": estimate, "networks": int(len(deepest)),
            "interval": None if math.isnan(low) else [low, high]}
    return summary
