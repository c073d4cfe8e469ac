"""The results table: one row per job of the grid, from the job store's records.

`results.csv` and `results.parquet` (same rows), and `curves.csv` (per-epoch metrics). The
analysis package reads only these files.

    table = write_results(out_dir, jobs, store.completed())
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

COLUMNS = ["job_key", "dataset", "split_kind", "split_seed", "seed", "treatment", "source_half", "target_half",
           "n", "arch", "recipe", "top1_final", "top1_best10", "top5_final", "epochs", "train_images_per_s",
           "wall_s", "frozen_check", "base_job_key", "status", "host", "base_weights_via", "started_at",
           "finished_at"]
CURVE_COLUMNS = ["job_key", "epoch", "train_loss", "val_top1", "val_top5", "lr", "images_per_s"]


def result_row(job, record: dict | None) -> dict:
    row = {c: None for c in COLUMNS} | job.row()
    recipe = job.spec["recipe"]
    row.update(arch=recipe["arch"], recipe=recipe["name"], status="to run")
    if record:
        m = record["metrics"]
        row.update({k: m.get(k) for k in ("top1_final", "top1_best10", "top5_final", "epochs",
                                          "train_images_per_s", "wall_s", "frozen_check")})
        row.update(dataset=record.get("dataset"), status="done", host=record.get("host"),
                   base_weights_via=record.get("base_weights_via"), started_at=record.get("started_at"),
                   finished_at=record.get("finished_at"))
    return row


def write_results(out_dir, jobs, records: dict) -> pd.DataFrame:
    """Write the grid's rows (done and not yet done) atomically; return the done rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [result_row(j, records.get(j.key)) for j in jobs]
    table = pd.DataFrame(rows, columns=COLUMNS)
    done = table[table.status == "done"].reset_index(drop=True)
    _atomic(out_dir / "results.csv", lambda p: done.to_csv(p, index=False))
    _atomic(out_dir / "results.parquet", lambda p: done.to_parquet(p, index=False))
    curves = [{"job_key": j.key, **{c: e.get(c) for c in CURVE_COLUMNS[1:]}}
              for j in jobs for e in (records.get(j.key) or {}).get("metrics", {}).get("epoch_log", [])]
    _atomic(out_dir / "curves.csv", lambda p: pd.DataFrame(curves, columns=CURVE_COLUMNS).to_csv(p, index=False))
    return done


def _atomic(path: Path, write):
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
