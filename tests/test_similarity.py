"""analysis/similarity.py: the transferability surface over graded task similarity, from hand-made rows whose
answer is known: the surface's cells and intervals, the per-layer slopes against p, where the dependence starts,
gradual against sudden, and the estimators' Kendall's tau against p. Also its section in the report."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.results import normalise_rows, with_base
from analysis.similarity import graded_rows, has_graded_levels, similarity_summary

LEVELS = (0.0, 1 / 6, 1 / 3, 1 / 2)
SEEDS = (0, 1, 2)
BASE = 0.80


def rows_for(drop, noise=0.004, split_seeds=(0, 1), converged=True):
    """Bases and frozen AnB n = 1..7 at every level x split seed x training seed (target B); AnB minus base
    is drop(level, n) plus a small seeded noise. Level 0 is the dissimilar split, one for every split seed."""
    rng = np.random.default_rng(0)
    rows = []
    for level in LEVELS:
        for split_seed in (split_seeds if level else (0,)):
            kind = "graded" if level else "dissimilar"
            label = f"graded-{level:.3f}-s{split_seed}" if level else "dissimilar"
            for seed in SEEDS:
                common = {"dataset": "toy", "split_kind": kind, "split_seed": split_seed if level else 0,
                          "split": label, "split_level": level if level else None, "seed": seed, "arch": "tiny",
                          "recipe": "demo", "status": "done"}
                key = f"{label}-s{seed}"
                rows += [{**common, "job_key": f"{key}-bA", "treatment": "baseA", "target_half": "A", "n": 0,
                          "top1_best10": 0.75, "converged": True},
                         {**common, "job_key": f"{key}-bB", "treatment": "baseB", "target_half": "B", "n": 0,
                          "top1_best10": BASE, "converged": converged}]
                for n in range(1, 8):
                    rows.append({**common, "job_key": f"{key}-AnB{n}", "treatment": "AnB", "target_half": "B",
                                 "n": n, "top1_best10": BASE + drop(level, n) + noise * rng.standard_normal(),
                                 "converged": True})
    return with_base(normalise_rows(pd.DataFrame(rows)))


def gradual(level, n):      # no dependence at n = 1, 2; from n = 3 a linear fall as p goes to 0, steeper with n
    return 0.0 if n < 3 else -0.04 * (n - 2) * (0.5 - level) / 0.5


def sudden(level, n):       # from n = 3 a cliff between p = 0 and p = 1/6, flat above it
    return -0.12 if n >= 3 and level == 0 else 0.0


def test_the_surface_cells_are_t_intervals_over_units_and_level_0_is_the_dissimilar_split():
    rows = rows_for(gradual)
    assert has_graded_levels(rows) and graded_rows(rows)["split_level"].eq(0).sum() == 2 * 3 + 7 * 3
    summary = similarity_summary(rows)
    cells = {(c["level"], c["n"]): c for c in summary["surface"]}
    assert sorted({level for level, _ in cells}) == pytest.approx(list(LEVELS)) and len(cells) == 4 * 7
    assert cells[(0.0, 5)]["units"] == 3 and cells[(0.5, 5)]["units"] == 6      # the dissimilar split is one split
    values = rows[(rows["treatment"] == "AnB") & (rows["n"] == 5) & (rows["split_level"] == 0.5)]["rel"]
    mean, sd, g = values.mean(), values.std(ddof=1), len(values)
    half = stats.t.ppf(0.975, g - 1) * sd / math.sqrt(g)
    cell = cells[(0.5, 5)]
    assert (cell["estimate"], cell["low"], cell["high"]) == pytest.approx((mean, mean - half, mean + half))
    assert summary["networks"] == 7 * (3 + 3 * 6)


def test_a_gradual_fall_from_layer_3_reads_gradual_from_n_3():
    summary = similarity_summary(rows_for(gradual))
    slopes = {s["n"]: s for s in summary["slopes"]}
    for n in (1, 2):
        assert slopes[n]["low"] < 0 < slopes[n]["high"]                      # no dependence there
    for n in range(3, 8):
        truth = 0.04 * (n - 2) / 0.5
        assert slopes[n]["slope"] == pytest.approx(truth, abs=0.01) and slopes[n]["low"] > 0
    reading = summary["reading"]
    assert reading["onset_n"] == 3 and reading["shape"] == "gradual"
    assert reading["text"].startswith("transferability depends on task similarity from n = 3")


def test_a_cliff_between_two_levels_reads_sudden_and_names_the_step():
    reading = similarity_summary(rows_for(sudden))["reading"]
    assert reading["onset_n"] == 3 and reading["shape"] == "sudden"
    first = reading["sudden_at"][0]
    assert first["n"] == 3 and first["largest_step"] == pytest.approx([0.0, 1 / 6]) and first["step"] > 0.1
    assert "between p = 0 and p = 0.167" in reading["text"]


def test_no_dependence_is_unresolved_and_bases_that_did_not_converge_are_left_out():
    flat = similarity_summary(rows_for(lambda level, n: 0.0))
    assert flat["reading"]["shape"] == "unresolved" and flat["reading"]["onset_n"] is None
    short = similarity_summary(rows_for(gradual, converged=False))
    assert short["networks"] == 0 and short["left_out_for_their_base"] == 7 * (3 + 3 * 6)
    assert short["reading"]["shape"] == "not enough rows"


def test_estimators_are_set_against_p_and_the_measured_drop_with_kendalls_tau():
    rows = rows_for(gradual)
    anb = rows[rows["treatment"] == "AnB"]
    diag = pd.DataFrame([{"kind": "hscore", "split_kind": r.split_kind, "split_seed": r.split_seed, "split": r.split,
                          "seed": r.seed, "target_half": "B", "n": r.n, "value": 1.0 + r.rel}
                         for r in anb.itertuples()])
    estimators = similarity_summary(rows, diag)["estimators"]
    assert list(estimators) == ["hscore"]
    assert estimators["hscore"]["tau_with_measured"]["tau"] == pytest.approx(1.0)     # a perfect estimator
    assert estimators["hscore"]["tau_with_level"]["tau"] > 0.3
    assert estimators["hscore"]["tau_with_measured"]["points"] == len(anb)


def test_the_report_shows_the_surface_and_its_reading(tmp_path):
    from analysis.report import build_report_from_rows

    rows = rows_for(sudden)
    curves = pd.DataFrame(columns=["job_key", "epoch", "step", "train_loss", "val_top1", "val_top5", "lr",
                                   "images_per_s", "input_wait_s"])
    path = build_report_from_rows(rows.drop(columns=["base_value", "rel"]), curves, tmp_path, "test rows",
                                  paper_overlay=False)
    page = path.read_text()
    assert 'id="similarity"' in page and "the fall is sudden" in page
    assert (tmp_path / "similarity.json").is_file() and (tmp_path / "sim1_surface.html").is_file()


def test_the_similarity_sweep_end_to_end_at_smoke_scale(tmp_path):
    """sweeps/similarity_surface.py on the smoke data (families of 6: levels 0, 1/6, 1/3, 1/2 are exact): every
    level's bases and frozen AnB, level 0 keyed as the dissimilar split, the levels in the rows, and the report's
    surface section drawn from them. A level the families cannot make is one error before anything trains."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRANSFER_CACHE": tempfile.mkdtemp(prefix="rtc", dir="/tmp"),
           "RAYTRANSFER_RAY_TMP": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    sweep = [sys.executable, str(root / "sweeps" / "similarity_surface.py"), "--scale", "smoke", "--n", "1,7",
             "--no-dashboard", "--num-cpus", "2", "--out", str(tmp_path / "exp")]
    bad = subprocess.run(sweep + ["--splits", "graded:0,graded:1/4"], env=env, capture_output=True, text=True,
                         cwd=root, timeout=300)
    assert bad.returncode != 0 and "graded level 1/4 is not exact on families of 6" in bad.stderr + bad.stdout
    assert "nearest exact levels are 1/6 and 1/3" in bad.stderr + bad.stdout
    assert not list((tmp_path / "exp").glob("jobstore/jobs/*.json"))              # nothing trained
    run = subprocess.run(sweep, env=env, capture_output=True, text=True, cwd=root, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "exp" / "results.csv")
    nets = table[table.treatment.isin(["baseA", "baseB", "AnB"])]
    assert (nets.status == "done").all() and len(nets) == 4 * (2 + 2)             # 4 levels x (2 bases + n = 1, 7)
    assert sorted(set(nets.split_level.round(4))) == [0.0, 0.1667, 0.3333, 0.5]
    assert set(nets[nets.split_level == 0].split_kind) == {"dissimilar"}
    assert all(k.startswith("dissimilar0-") for k in nets[nets.split_level == 0].job_key)
    summary = json.loads((tmp_path / "exp" / "similarity.json").read_text())
    # smoke nets stop short of their plateau: those whose base did not converge are counted, not used
    assert summary["networks"] + summary["left_out_for_their_base"] == 4 * 2 and summary["reading"]["text"]
    assert sum(cell["networks"] for cell in summary["surface"]) == summary["networks"]
    assert 'id="similarity"' in (tmp_path / "exp" / "report.html").read_text()
