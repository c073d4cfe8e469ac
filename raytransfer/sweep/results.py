"""The results table: one row per finished or failed job of the grid, from the job store's records.

`results.csv` and `results.parquet` (same rows), and `curves.csv` (per-epoch metrics of the done
jobs). A failed job (e.g. its frozen layers changed) is a row with status "failed" and its reason,
never "done": the analysis reads only done rows. The analysis package reads only these files.
`split` is the split's label ("similar-s0", "dissimilar", or a --split-file's name), `layer` the
name of layer n in the arch's table, the last one copied (the report's axis labels); `k` the images per
class of a reduced_k job (0: all) and `images_per_class` the training images per class a job had; `recipe_set` the fields a sweep's --set (or --arch,
--until-plateau) changed in the built-in recipe, FIELD=VALUE;... ('' for none: the setting the report groups by);
`input` the input path the job read and `input_wait_share` the share of its training time it waited on input.

    table = write_results(out_dir, jobs, store.completed())
    write_diagnostics(out_dir, diagnostic_jobs, store.completed(), table)

`diagnostics.csv` / `.parquet`: one row per measurement of the diagnostic jobs (kind cka | probe | hscore |
logme | leep, split_kind, split_seed, seed, net_a, net_b (job keys; net_b empty where one net), layer_a,
layer_b, value); `transferability.json`: Kendall's tau of each estimator against AnB and AnB+.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ..recipes import describe_changes

COLUMNS = ["job_key", "dataset", "split_kind", "split_seed", "split", "split_sha256", "split_level", "seed", "treatment",
           "source_half", "target_half", "n", "k", "layer", "arch", "recipe", "recipe_set", "top1_final", "top1_best10", "top5_final",
           "plateau_rise", "converged", "epochs", "images_per_class", "train_images_per_s", "wall_s", "frozen_check",
           "base_job_key", "status", "reason", "host", "node_id", "gpus_held", "device", "attempts", "base_weights_via",
           "checkpoint_bytes", "input", "input_wait_share", "started_at", "finished_at"]
CURVE_COLUMNS = ["job_key", "epoch", "step", "train_loss", "val_top1", "val_top5", "lr", "images_per_s", "input_wait_s"]


def result_row(job, record: dict | None, status: str = "done") -> dict:
    row = {c: None for c in COLUMNS} | job.row()
    recipe = job.spec["recipe"]
    row.update(arch=recipe["arch"], recipe=recipe["name"], recipe_set=describe_changes(recipe), status="to run")
    if record:
        m = record.get("metrics") or {}
        row.update({k: m.get(k) for k in ("top1_final", "top1_best10", "top5_final", "plateau_rise", "converged",
                                          "epochs", "images_per_class",
                                          "train_images_per_s", "wall_s", "frozen_check", "checkpoint_bytes",
                                          "device", "input", "input_wait_share")})
        row.update({k: record.get(k) for k in ("dataset", "host", "node_id", "gpus_held", "attempts",
                                               "base_weights_via", "started_at", "finished_at", "reason")})
        row["status"] = status
    return row


def write_results(out_dir, jobs, records: dict, failed: dict | None = None) -> pd.DataFrame:
    """Write the rows of the done and failed jobs atomically; return the done rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = failed or {}
    rows = [result_row(j, records[j.key]) if j.key in records else result_row(j, failed.get(j.key), "failed")
            for j in jobs]
    table = pd.DataFrame(rows, columns=COLUMNS)
    done = table[table.status == "done"].reset_index(drop=True)
    written = table[table.status.isin(["done", "failed"])].reset_index(drop=True)
    _atomic(out_dir / "results.csv", lambda p: written.to_csv(p, index=False))
    _atomic(out_dir / "results.parquet", lambda p: written.to_parquet(p, index=False))
    curves = [{"job_key": j.key, **{c: e.get(c) for c in CURVE_COLUMNS[1:]}}
              for j in jobs for e in (records.get(j.key) or {}).get("metrics", {}).get("epoch_log", [])]
    _atomic(out_dir / "curves.csv", lambda p: pd.DataFrame(curves, columns=CURVE_COLUMNS).to_csv(p, index=False))
    return done


DIAGNOSTIC_COLUMNS = ["kind", "split_kind", "split_seed", "split", "seed", "source_half", "target_half", "net_a", "net_b",
                      "treatment", "n", "layer_a", "layer_b", "value", "job_key"]
ESTIMATORS = ("hscore", "logme", "leep", "probe")       # each against the measured transfer curves
MEASURED = ("AnB", "AnB+")
MEASURED_METRIC = "top1_best10"                         # the paper's metric, as in the report


def write_diagnostics(out_dir, jobs, records: dict, table: pd.DataFrame) -> pd.DataFrame | None:
    """diagnostics.csv / .parquet (one row per measurement, from the done diagnostic jobs' records) and
    transferability.json (Kendall's tau of each estimator against AnB and AnB+); None without diagnostics."""
    if not jobs:
        return None
    out_dir = Path(out_dir)
    rows = [r for j in jobs for r in (records.get(j.key) or {}).get("rows", [])]
    diag = pd.DataFrame(rows, columns=DIAGNOSTIC_COLUMNS)
    diag["net_b"] = diag["net_b"].fillna("")
    diag["layer_b"] = diag["layer_b"].fillna("")
    diag["n"] = pd.to_numeric(diag["n"], errors="coerce").astype("Int64")
    _atomic(out_dir / "diagnostics.csv", lambda p: diag.to_csv(p, index=False))
    _atomic(out_dir / "diagnostics.parquet", lambda p: diag.to_parquet(p, index=False))
    summary = transferability(diag, table)
    _atomic(out_dir / "transferability.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    return diag


def transferability(diag: pd.DataFrame, table: pd.DataFrame) -> dict:
    """Could the transfer curve have been predicted without training it? For each estimator (and the
    probe) and each measured treatment: Kendall's tau-b (and its p-value) between the estimator's value
    at layer n and the measured accuracy of that treatment at n, over every n, split, training seed and
    target half. LEEP scores the source net's softmax, one value per split x seed x target, so its tau
    ranks splits only (its value ties across n)."""
    from ..diagnostics import ESTIMATOR_UNIT, estimator_pairs, kendall_tau

    out = {"metric": MEASURED_METRIC, "over": "n x split x training seed x target half", "estimators": {}}
    done = table[table["status"] == "done"] if "status" in table else table
    for estimator in ESTIMATORS:
        mine = diag[diag["kind"] == estimator]
        if mine.empty:
            continue
        out["estimators"][estimator] = {}
        for treatment in MEASURED:
            measured = done[done["treatment"] == treatment][ESTIMATOR_UNIT + ["n", MEASURED_METRIC]]
            pairs = estimator_pairs(measured, mine, estimator)
            tau, p, used = kendall_tau(pairs["value"], pairs[MEASURED_METRIC])
            out["estimators"][estimator][treatment] = {"tau": _finite(tau), "p_value": _finite(p), "points": used}
    return out


def _finite(x: float):
    return None if x != x else x                         # NaN -> null in JSON


def _atomic(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
