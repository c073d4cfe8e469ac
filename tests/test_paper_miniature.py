"""`--scale paper` end to end, in miniature: the paper's real grid and protocol on a tiny built-in dataset,
shrunk only through --set, and the report and findings built from the rows that sweep wrote.

The grid: two similar splits and the dissimilar one, both directions, every n = 1..7, the paper's treatments
(frozen AnB alone on the dissimilar split), netbase and random frozen layers on the whole dataset, reduced_k
with three k; the protocol: the base's mean image at 0..255, a 1000-way fc8, independent bases, an evaluation
every `eval_every_iters` iterations, Caffe's solver, the pixel-store input. --set shrinks the net (1/8 width, 28 px crops of the 32 px
images, batch norm so that a few dozen iterations learn something), the batch and the iterations. 147 jobs,
about two minutes on an idle 2-core machine.
"""
from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHRINK = ["resize_size=32", "crop_size=28", "width=0.125", "fc_width=0.0625", "norm=batch", "init=kaiming",
          "dropout=0", "lr=0.02", "batch_size=32", "iterations=96", "eval_every_iters=4"]
REDUCED_K = (5, 10, 0)


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    """8 built-in classes in two families (a dissimilar split), 24 training and 30 validation images a class: 120 a
    half, so that one image more or less right moves an evaluation by 0.8 points, below the convergence rule's 1."""
    from raytransfer.prepare import prepare
    from raytransfer.synthetic import SyntheticSpec

    data = tmp_path_factory.mktemp("paper-mini-data")
    prepare("synthetic", None, data, resolution=None, workers=2,
            synthetic=SyntheticSpec(superclasses_per_family=2, classes_per_superclass=2, train_per_class=24,
                                    val_per_class=30))
    return data


@pytest.fixture(scope="module")
def paper_sweep(tmp_path_factory, mini_data):
    """(results folder, the sweep's stdout) of the miniature paper run."""
    data = mini_data
    out = tmp_path_factory.mktemp("paper-mini") / "exp"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRANSFER_RAY_TMP": tempfile.mkdtemp(prefix="rtp", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    flags = ["--scale", "paper", "--data", str(data), "--seeds", "0,1", "--directions", "both",
             "--reduced-k", ",".join(map(str, REDUCED_K)), "--num-cpus", "2", "--no-dashboard", "--out", str(out)]
    flags += [arg for field in SHRINK for arg in ("--set", field)]
    run = subprocess.run([sys.executable, str(ROOT / "sweeps" / "full_paper.py"), *flags], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout


def test_the_paper_grid_ran_with_its_protocol_and_the_overrides_in_every_key_and_row(paper_sweep):
    out, stdout = paper_sweep
    table = pd.read_csv(out / "results.csv")
    assert (table.status == "done").all() and "0 failed, 0 not run" in stdout
    counts = table.groupby(["split_kind", "treatment"]).size().to_dict()
    assert counts[("similar", "baseA")] == counts[("similar", "baseB")] == 2            # two similar splits
    assert counts[("dissimilar", "AnB")] == 14                                          # n = 1..7, both directions
    assert counts[("similar", "BnB+")] == counts[("similar", "AnB")] == 2 * 2 * 7
    assert counts[("whole", "netbase")] == 1 and counts[("whole", "random_frozen")] == 7
    assert counts[("whole", "reduced_k")] == len(REDUCED_K)
    assert set(table.target_half) == {"A", "B", "all"}
    reduced = table[table.treatment == "reduced_k"]
    assert set(reduced.recipe) == {"paper_reduced"} and set(table.recipe) == {"paper", "paper_reduced"}
    assert sorted(reduced.images_per_class) == [5, 10, 24]                           # k = 0: all 24 of a class
    # every override, in every row (the reduced solver's too) and in every job's record
    for written in set(table.recipe_set):
        fields = dict(item.split("=") for item in written.split(";"))
        assert {k: float(v) if k != "norm" and k != "init" else v for k, v in fields.items()} == \
               {k: float(v) if k != "norm" and k != "init" else v for k, v in (f.split("=") for f in SHRINK)}
    record = json.loads(next((out / "jobstore" / "jobs").glob("whole-reduced_k-all-k5-*.json")).read_text())
    recipe = record["config"]["recipe"]
    assert (recipe["name"], recipe["iterations"], recipe["width"], recipe["normalize"], recipe["head_outputs"]) == \
           ("paper_reduced", 96, 0.125, "mean_image", 1000)
    # the protocol: an evaluation every 4 iterations (24 of them)
    assert set(table.epochs.dropna()) and (pd.to_numeric(table.top1_best10) >= 0).all()
    base = json.loads(next((out / "jobstore" / "jobs").glob("similar0-baseA-A-*.json")).read_text())
    assert base["metrics"]["evaluations"] == 96 // 4
    assert len(base["metrics"]["epoch_log"]) == 96 // 4         # one record per evaluation, not per epoch
    # which input each job read, and the share of its training time it waited on it
    assert set(table.input) == {"pixel_store"}
    assert table.input_wait_share.between(0, 1).all()


def test_status_and_the_report_show_the_time_lost_to_input(paper_sweep):
    from raytransfer.sweep.status import format_status, sweep_status

    out, _ = paper_sweep
    status = sweep_status(str(out))
    waits = {w["treatment"]: w for w in status["input_wait"]}
    assert set(waits) == {"baseA", "baseB", "AnB", "AnB+", "BnB", "BnB+", "scratch", "netbase", "random_frozen",
                          "reduced_k"}
    assert sum(w["networks"] for w in waits.values()) == 147
    assert all(0 <= w["input_wait_share"] <= 1 and w["input"] == "pixel_store" for w in waits.values())
    assert "share of training time waiting on input" in format_status(status)
    page = (out / "report.html").read_text()
    assert 'id="input-wait"' in page and "training time waiting on input" in page


def test_a_batch_larger_than_a_jobs_images_is_one_error_before_training(mini_data, capsys, tmp_path):
    """At k = 1 the 8 classes give 8 images: a batch of 32 would never take a step."""
    from raytransfer.sweep.runner import main
    import runpy

    sweep = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))
    flags = ["--scale", "paper", "--data", str(mini_data), "--splits", "similar", "--treatments", "AnB", "--n", "1",
             "--reduced-k", "1", "--out", str(tmp_path)] + [a for f in SHRINK for a in ("--set", f)]
    assert main(sweep["GRID"], flags, name="full_paper") == 2
    err = capsys.readouterr().err
    assert "whole-reduced_k-all-k1-" in err and "8 training images at batch 32" in err
    assert "--set batch_size=8" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("tune-*"))                                      # nothing started
    assert main(sweep["GRID"], flags + ["--dry-run"], name="full_paper") == 0      # a dry run lists it, and says so
    assert "a sweep would stop here" in capsys.readouterr().out


def test_the_same_grid_without_overrides_has_other_keys(paper_sweep, mini_data, capsys, tmp_path):
    from raytransfer.sweep.runner import main
    import runpy

    out, _ = paper_sweep
    sweep = runpy.run_path(str(ROOT / "sweeps" / "full_paper.py"))
    data = pd.read_csv(out / "results.csv")
    flags = ["--scale", "paper", "--data", str(mini_data), "--splits", "similar", "--seeds", "0", "--treatments", "AnB",
             "--n", "1", "--reduced-k", "none", "--dry-run", "--out", str(tmp_path)]
    shrunk = [arg for field in SHRINK for arg in ("--set", field)]
    assert main(sweep["GRID"], flags + shrunk, name="full_paper") == 0
    with_set = capsys.readouterr().out
    assert main(sweep["GRID"], flags + shrunk[:-2], name="full_paper") == 0            # one override fewer
    without_one = capsys.readouterr().out
    keys = lambda text: {line.split()[0] for line in text.splitlines() if line.startswith("similar0-")}
    assert keys(with_set) <= set(data.job_key)                                         # the sweep's own jobs
    assert keys(with_set).isdisjoint(keys(without_one))


def test_the_report_has_every_figure_of_the_paper_beside_ours(paper_sweep):
    from analysis.paper import paper_reduced_curve, paper_rows
    from analysis.report import build_figures
    from analysis.results import load_curves, load_rows, with_base

    out, _ = paper_sweep
    page = (out / "report.html").read_text()
    for name in ("fig1_similar", "fig2_dissimilar", "fig3_table1", "fig4_layer_effects", "fig5_curves",
                 "fig6_reduced"):
        assert f'id="{name}"' in page and (out / f"{name}.html").is_file(), name
    assert "settings (dataset, arch, recipe" not in page    # the reduced-volume rows belong to the sweep's setting
    rows = with_base(load_rows(out))
    figs = build_figures(rows, load_curves(out), with_base(paper_rows()))
    for name in ("fig1_similar", "fig2_dissimilar"):                 # the paper's networks beside ours
        sources = {trace.meta for trace in figs[name].data}
        assert {"sweep", "paper"} <= sources, (name, sources)
    sweep_points, _, paper_curve = figs["fig6_reduced"].data
    assert sorted(sweep_points.x) == [5, 10, 24] and list(paper_curve.x)[:3] == [1, 2, 5]
    assert len(paper_reduced_curve()) == len(paper_curve.x)
    table1 = json.loads((out / "table1.json").read_text())
    assert all(cell["AnB+ - base"] is not None for cell in table1["paired"].values())
    effects = [trace for trace in figs["fig4_layer_effects"].data if trace.y is not None and len(trace.y)]
    assert len(effects) >= 3
    curves = load_curves(out)
    assert set(curves.job_key) == set(rows.job_key)
    ranked = rows.set_index("job_key")                            # random frozen layers against netbase
    netbase = ranked[ranked.treatment == "netbase"]["top1_best10"].iloc[0]
    frozen = ranked[ranked.treatment == "random_frozen"]
    assert (frozen["base_value"] == netbase).all() and (frozen["rel"] == frozen["top1_best10"] - netbase).all()
    assert ranked[ranked.treatment == "reduced_k"]["base_value"].isna().all()    # its own figure, no base


def test_all_four_findings_are_computed_from_the_rows(paper_sweep):
    out, _ = paper_sweep
    check = json.loads((out / "science_check.json").read_text())
    for name in ("co_adaptation", "specificity", "fine_tuning", "random_vs_transfer"):
        assert check[name]["answer"] != "not enough rows" and check[name]["estimate"] is not None, check[name]
    random = check["random_vs_transfer"]
    assert random["unit"].startswith("training seed") and "netbase" in random["text"]
    # every random frozen net at n = 3..7 and every AnB there (2 similar splits and the dissimilar one, both
    # directions) whose base converged: the finding's networks, counted from the rows
    rows = pd.read_csv(out / "results.csv")
    converged = dict(zip(rows.job_key, rows.converged))
    deep = rows[(rows.n >= 3) & rows.treatment.isin(["random_frozen", "AnB"])]
    netbase = rows[rows.treatment == "netbase"].job_key.iloc[0]
    base = [netbase if t == "random_frozen" else b for t, b in zip(deep.treatment, deep.base_job_key)]
    assert len(deep) == 5 + 5 * 3 * 2 and random["networks"] == sum(converged[b] is True for b in base) > 0
    assert "units of split × training seed × target half" in check["fine_tuning"]["text"]
    similar_bases = rows[(rows.split_kind == "similar") & rows.treatment.isin(["baseA", "baseB"])]
    assert len(similar_bases) == 4                                  # 2 similar splits x 2 target halves: 4 units,
    assert check["fine_tuning"]["units"] == similar_bases.converged.eq(True).sum() > 0   # those of a converged base


def test_the_report_draws_in_headless_chromium(paper_sweep, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; scripts/setup.sh installs it)")
    out, _ = paper_sweep
    probe = """<script>setTimeout(function () {
  var out = document.createElement('pre'); out.id = 'probe';
  var fig6 = document.getElementById('fig6_reduced');
  out.textContent = JSON.stringify({errors: window.reportErrors, fig6: fig6 && fig6.data ? fig6.data.length : 0});
  document.body.appendChild(out);
}, 3000);</script>"""
    probed = tmp_path / "probed.html"
    probed.write_text((out / "report.html").read_text().replace("</body>", probe + "</body>", 1))
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--window-size=1400,2000",
         "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, "the probe never ran: the page did not finish drawing\n" + run.stderr[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["errors"] == [] and result["fig6"] == 3
