"""The results table: one row per finished or failed job of the grid, from the job store's records.

`results.csv` and `results.parquet` (same rows), and `curves.csv` (per-epoch metrics of the done
jobs). A failed job (e.g. its frozen layers changed) is a row with status "failed" and its reason,
never "done": the analysis reads only done rows. The analysis package reads only these files.
`split` is the split's label ("similar-s0", "dissimilar", or a --split-file's name), `layer` the
name of layer n in the arch's table, the last one copied (the report's axis labels); `k` the images per
class of a reduced_k job (0: all) and `images_per_class` the training images per class a job had.

    table = write_results(out_dir, jobs, store.completed())
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

COLUMNS = ["job_key", "dataset", "split_kind", "split_seed", "split", "split_sha256", "seed", "treatment",
           "source_half", "target_half", "n", "k", "layer", "arch", "recipe", "top1_final", "top1_best10", "top5_final",
           "plateau_rise", "converged", "epochs", "images_per_class", "train_images_per_s", "wall_s", "frozen_check",
           "base_job_key", "status", "reason", "host", "node_id", "gpus_held", "device", "attempts", "base_weights_via",
           "checkpoint_bytes", "started_at", "finished_at"]
CURVE_COLUMNS = ["job_key", "epoch", "train_loss", "val_top1", "val_top5", "lr", "images_per_s"]


def result_row(job, record: dict | None, status: str = "done") -> dict:
    row = {c: None for c in COLUMNS} | job.row()
    recipe = job.spec["recipe"]
    row.update(arch=recipe["arch"], recipe=recipe["name"], status="to run")
    if record:
        m = record.get("metrics") or {}
        row.update({k: m.get(k) for k in ("top1_final", "top1_best10", "top5_final", "plateau_rise", "converged",
                                          "epochs", "images_per_class",
                                          "train_images_per_s", "wall_s", "frozen_check", "checkpoint_bytes",
                                          "device")})
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


def _atomic(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
