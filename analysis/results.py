"""The results table the sweep writes (one row per job) and each row's comparison with its base.

Owns reading `RESULTS_DIR/results.{parquet,csv}` and `curves.csv`, checking the columns and the
treatment names, and matching every network with "its base": the base trained on the row's target
half, same split and training seed. A split is told apart by its kind, seed and label (`split`: e.g.
"similar-s0", or the name of a split file the sweep was given). Usage: `rows = with_base(load_rows(results_dir))`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from raytransfer.diagnostics import UNIT  # noqa: F401  (re-exported: the findings and statistics use it)
from raytransfer.recipes import REDUCED_RECIPE

log = logging.getLogger(__name__)

METRIC = "top1_best10"  # the paper's metric: mean of the 10 best validation evaluations
BASE_TREATMENTS = ("baseA", "baseB", "base", "netbase")  # base/netbase: a net on the whole label set (paper's netbase)
TRANSFER_TREATMENTS = ("BnB", "BnB+", "AnB", "AnB+", "random_frozen", "scratch")
REDUCED = "reduced_k"  # all classes, the first k training images of each (reduced solver): its own figure
SWEEP_RECIPE_OF = {reduced: recipe for recipe, reduced in REDUCED_RECIPE.items()}   # paper_reduced -> paper
TREATMENTS = BASE_TREATMENTS + TRANSFER_TREATMENTS + (REDUCED,)
SPLIT_KINDS = ("similar", "dissimilar", "graded", "file", "whole")  # graded: between the two; file: the user's own
# halves; whole: all classes
REQUIRED_COLUMNS = ("job_key", "split_kind", "split_seed", "seed", "treatment", "target_half", "n", METRIC)
TEXT_COLUMNS = ("job_key", "dataset", "split_kind", "split", "treatment", "source_half", "target_half",
                "layer", "arch", "recipe", "recipe_set", "base_job_key", "status", "input")
NUMBER_COLUMNS = ("split_level", "top1_final", "top5_final", "plateau_rise", "epochs", "train_images_per_s", "wall_s",
                  "k", "images_per_class", "input_wait_share")
# A setting is one sweep's way of training: a base is only compared within one, and a report shows one.
# `sweep_recipe` is the recipe of the sweep a row belongs to: its own, but the reduced-volume nets' solver
# (paper_reduced) counts as the recipe whose reduced solver it is (paper); `recipe_set` its --set overrides.
SETTING_COLUMNS = ("dataset", "arch", "sweep_recipe", "recipe_set")
# UNIT (raytransfer.diagnostics): the independent unit of every interval, split x training seed x target half.
CURVE_COLUMNS = ("job_key", "epoch", "step", "train_loss", "val_top1", "val_top5", "lr", "images_per_s", "input_wait_s")


def read_table(results_dir: Path) -> pd.DataFrame:
    """Read results.parquet or results.csv, whichever the sweep wrote last."""
    results_dir = Path(results_dir)
    parquet, csv = results_dir / "results.parquet", results_dir / "results.csv"
    candidates = [p for p in (parquet, csv) if p.is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"no results table in {results_dir}: expected results.csv or results.parquet there; "
            "pass the sweep's results folder (or run `python -m analysis.paper` for the paper's data)")
    newest = max(candidates, key=lambda p: (p.stat().st_mtime, p.suffix == ".parquet"))
    table = pd.read_parquet(newest) if newest.suffix == ".parquet" else pd.read_csv(newest)
    log.info("read %d rows from %s", len(table), newest)
    return table


def normalise_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Check the columns and values, give every column one dtype; keep only finished jobs."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}; it has {list(table.columns)}. "
                         "Expected the sweep's results.csv contract (job_key, split_kind, ...).")
    rows = table.copy()
    for column in TEXT_COLUMNS:
        if column not in rows.columns:
            rows[column] = ""
        rows[column] = rows[column].astype(object).where(rows[column].notna(), "").astype(str)
    for column in NUMBER_COLUMNS:
        rows[column] = pd.to_numeric(rows[column], errors="coerce") if column in rows else np.nan
    if "frozen_check" not in rows.columns:
        rows["frozen_check"] = ""
    rows["frozen_check"] = rows["frozen_check"].astype(object).where(rows["frozen_check"].notna(), "")
    rows["frozen_check"] = rows["frozen_check"].astype(str).str.lower()
    # converged: True / False by the sweep's plateau rule, None where the table does not say (older sweeps)
    truth = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
    converged = rows["converged"] if "converged" in rows.columns else pd.Series(None, index=rows.index, dtype=object)
    rows["converged"] = [truth.get(str(v).lower()) if v is not None and v == v else None for v in converged]
    # dissimilar splits have no seed: the contract allows 0 or empty there
    rows["split_seed"] = pd.to_numeric(rows["split_seed"], errors="coerce").fillna(0).astype(int)
    rows["seed"] = pd.to_numeric(rows["seed"], errors="coerce").fillna(0).astype(int)
    rows["n"] = pd.to_numeric(rows["n"], errors="coerce").fillna(0).astype(int)
    rows[METRIC] = pd.to_numeric(rows[METRIC], errors="coerce")
    rows["sweep_recipe"] = [SWEEP_RECIPE_OF.get(r, r) if t == REDUCED else r
                            for r, t in zip(rows["recipe"], rows["treatment"])]

    unknown = sorted(set(rows["treatment"]) - set(TREATMENTS))
    if unknown:
        raise ValueError(f"unknown treatment {unknown[0]!r}; expected one of {', '.join(TREATMENTS)}")
    unknown = sorted(set(rows["split_kind"]) - set(SPLIT_KINDS))
    if unknown:
        raise ValueError(f"unknown split_kind {unknown[0]!r}; expected one of {', '.join(SPLIT_KINDS)}")

    unfinished = rows["status"].ne("done") & rows["status"].ne("")
    if unfinished.any():
        log.info("skipping %d rows whose status is not 'done'", int(unfinished.sum()))
    rows = rows[~unfinished & rows[METRIC].notna()].reset_index(drop=True)
    duplicated = rows["job_key"].duplicated()
    if duplicated.any():
        raise ValueError(f"job_key {rows.loc[duplicated, 'job_key'].iloc[0]!r} appears twice; "
                         "each job must have one row (rebuild the table from the job store)")
    return rows


def load_rows(results_dir: Path) -> pd.DataFrame:
    """The finished jobs of a sweep, checked and typed."""
    return normalise_rows(read_table(results_dir))


def load_curves(results_dir: Path) -> pd.DataFrame:
    """Per-epoch metrics of every job (empty frame when the sweep wrote none yet)."""
    path = Path(results_dir) / "curves.csv"
    if not path.is_file():
        log.info("no curves.csv in %s: the curves panel will be empty", results_dir)
        return pd.DataFrame(columns=list(CURVE_COLUMNS))
    return normalise_curves(pd.read_csv(path))


def normalise_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Give curves the contract's columns (missing metrics become NaN), sorted by job and epoch."""
    if "job_key" not in curves.columns or "epoch" not in curves.columns:
        raise ValueError(f"curves table needs job_key and epoch columns; it has {list(curves.columns)}")
    curves = curves.copy()
    for column in CURVE_COLUMNS[1:]:
        curves[column] = pd.to_numeric(curves[column], errors="coerce") if column in curves else np.nan
    curves["job_key"] = curves["job_key"].astype(str)
    return curves.sort_values(["job_key", "epoch"], kind="stable").reset_index(drop=True)


def settings(rows: pd.DataFrame) -> list[tuple[str, ...]]:
    """The distinct settings (dataset, arch, sweep recipe, overrides), most rows first."""
    counts = rows.groupby(list(SETTING_COLUMNS), sort=False).size().sort_values(ascending=False, kind="stable")
    return [tuple(index) for index in counts.index]


def base_key(frame: pd.DataFrame) -> pd.Series:
    """The identity a network shares with its base: setting, split, training seed, target half."""
    columns = [c for c in (*SETTING_COLUMNS, "split_kind", "split_seed", "split", "seed", "target_half")
               if c in frame.columns]                      # `split`: tables of older sweeps lack it
    keys = ["|".join(map(str, values)) for values in frame[columns].itertuples(index=False)]
    return pd.Series(keys, index=frame.index, dtype=object)


def with_base(rows: pd.DataFrame) -> pd.DataFrame:
    """Add `base_value` (the metric of the row's base; NaN if that base is not in the table) and
    `rel` = metric − base_value. Bases get their own value and rel 0."""
    rows = rows.copy()
    is_base = rows["treatment"].isin(BASE_TREATMENTS)
    keys = base_key(rows)
    bases = rows[is_base].assign(_key=keys[is_base])
    twice = bases["_key"].duplicated(keep=False)
    if twice.any():
        raise ValueError(f"two base rows share split, seed and target half: "
                         f"{sorted(bases.loc[twice, 'job_key'])[:4]}; keep one base per half and seed")
    base_values = bases.set_index("_key")[METRIC]
    rows["base_value"] = keys.map(base_values).where(rows["treatment"] != REDUCED)   # its own solver: no base
    rows["rel"] = rows[METRIC] - rows["base_value"]
    if "converged" in rows.columns:                    # None: the base is missing or did not record it
        converged = bases.set_index("_key")["converged"]
        rows["base_converged"] = [converged.get(k) for k in keys]
    return rows


def split_label(row) -> str:
    """The split's label: the table's `split` column, else kind and seed (tables of older sweeps)."""
    if row.get("split"):
        return str(row["split"])
    return "dissimilar" if row["split_kind"] == "dissimilar" else f"{row['split_kind']}-s{row['split_seed']}"


def layer_ticks(rows: pd.DataFrame) -> dict[int, str]:
    """{n: name of layer n} from the table's `layer` column (e.g. 3: "conv3"), for axis labels."""
    if "layer" not in rows.columns:
        return {}
    named = rows[(rows["n"] > 0) & (rows["layer"].astype(str) != "")]
    return {int(n): str(layer) for n, layer in zip(named["n"], named["layer"])}


def similar_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the random (similar) splits: the paper's main experiment and Table 1."""
    return rows[rows["split_kind"] == "similar"]


def input_wait_by_treatment(entries) -> list[dict]:
    """The share of training time lost waiting on input, per treatment and input path, over the jobs that
    recorded it: each job's `input_wait_share` weighed by its wall time (its GPU time, on a GPU). `entries`:
    dicts with treatment, input, input_wait_share, wall_s (results rows, or what `raytransfer status` reads)."""
    totals = {}
    for e in entries:
        share, wall = e.get("input_wait_share"), e.get("wall_s")
        if share is None or wall is None or share != share or wall != wall or not e.get("input"):
            continue
        t = totals.setdefault((str(e["treatment"]), str(e["input"])), [0, 0.0, 0.0])
        t[0], t[1], t[2] = t[0] + 1, t[1] + float(share) * float(wall), t[2] + float(wall)
    return [{"treatment": treatment, "input": input_path, "networks": n,
             "input_wait_share": waited / wall if wall > 0 else 0.0}
            for (treatment, input_path), (n, waited, wall) in sorted(totals.items())]
