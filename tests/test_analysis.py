"""analysis/: Table 1 on known tables, the paper-only report, the report drawn in headless Chromium,
bootstrap intervals, the science check. Hand-made tables are written out row by row; the expected
numbers are worked out by hand in the comments."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from analysis.paper import paper_curves, paper_rows
from analysis.report import build_figures, build_report
from analysis.results import normalise_rows, with_base
from analysis.stats import layer_effects, table1

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def make_row(key, treatment, target, n=0, value=0.5, split_kind="similar", split_seed=0, seed=0, source=""):
    """One row of the sweep's results contract."""
    return {"job_key": key, "dataset": "toy", "split_kind": split_kind, "split_seed": split_seed, "seed": seed,
            "split": f"similar-s{split_seed}" if split_kind == "similar" else split_kind,
            "treatment": treatment, "source_half": source, "target_half": target, "n": n, "arch": "tiny",
            "recipe": "fast", "top1_final": value, "top1_best10": value, "top5_final": "", "epochs": 3,
            "train_images_per_s": 100.0, "wall_s": 1.0, "frozen_check": "true" if n and "+" not in treatment else "",
            "base_job_key": "", "status": "done"}


def table1_rows() -> list[dict]:
    """Bases: A 0.60, B 0.70 (pooled base mean 0.65). Each network minus its own base in brackets."""
    return [
        make_row("baseA", "baseA", "A", value=0.60),
        make_row("baseB", "baseB", "B", value=0.70),
        make_row("AnB+2", "AnB+", "B", n=2, value=0.74, source="A"),  # +0.04
        make_row("AnB+5", "AnB+", "A", n=5, value=0.63, source="B"),  # +0.03
        make_row("AnB+6", "AnB+", "B", n=6, value=0.73, source="A"),  # +0.03
        make_row("BnB+3", "BnB+", "A", n=3, value=0.61, source="A"),  # +0.01
        make_row("BnB+6", "BnB+", "B", n=6, value=0.72, source="B"),  # +0.02
        make_row("AnB4", "AnB", "B", n=4, value=0.66, source="A"),    # frozen: not in Table 1
        # dissimilar split: Table 1 is the similar split only, so these must not count
        make_row("d-baseA", "baseA", "A", value=0.30, split_kind="dissimilar"),
        make_row("d-AnB+3", "AnB+", "A", n=3, value=0.90, split_kind="dissimilar", source="B"),
    ]


def test_table1_pooled_and_paired_match_hand_computed_values(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    pd.DataFrame(table1_rows()).to_csv(results / "results.csv", index=False)
    run = subprocess.run([sys.executable, "-m", "analysis", str(results), "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("report.html")
    values = json.loads((tmp_path / "out" / "table1.json").read_text())
    expected = {
        # pooled 1-7: AnB+ mean (0.74+0.63+0.73)/3 = 0.70; - bases 0.65 = 0.05; - BnB+ mean 0.665 = 0.035
        # paired 1-7: AnB+ (0.04+0.03+0.03)/3 = 0.03333; BnB+ (0.01+0.02)/2 = 0.015; difference 0.018333
        "1-7": {"pooled": (0.05, 0.035), "paired": (0.1 / 3, 0.1 / 3 - 0.015)},
        # 3-7: AnB+ n=5,6 mean 0.68 -> 0.03 and 0.68-0.665 = 0.015; paired AnB+ 0.03, BnB+ 0.015
        "3-7": {"pooled": (0.03, 0.015), "paired": (0.03, 0.015)},
        # 5-7: BnB+ only n=6 (0.72): pooled 0.68-0.72 = -0.04; paired 0.03-0.02 = 0.01
        "5-7": {"pooled": (0.03, -0.04), "paired": (0.03, 0.01)},
    }
    for label, by_normalisation in expected.items():
        for normalisation, (vs_base, vs_selffer) in by_normalisation.items():
            cell = values[normalisation][label]
            assert cell["AnB+ - base"] == pytest.approx(vs_base, abs=1e-12), (normalisation, label)
            assert cell["AnB+ - BnB+"] == pytest.approx(vs_selffer, abs=1e-12), (normalisation, label)
    assert table1(with_base(normalise_rows(pd.DataFrame(table1_rows())))) == values


def test_table1_is_none_where_rows_are_missing():
    rows = with_base(normalise_rows(pd.DataFrame(table1_rows()[:3])))  # bases + one AnB+ at n = 2
    values = table1(rows)
    assert values["pooled"]["1-7"]["AnB+ - base"] == pytest.approx(0.09)
    assert values["pooled"]["1-7"]["AnB+ - BnB+"] is None
    assert values["pooled"]["3-7"]["AnB+ - base"] is None


@pytest.fixture(scope="module")
def paper_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paper_report")
    run = subprocess.run([sys.executable, "-m", "analysis.paper", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "pooled, layers 1-7" in run.stdout and "paired, layers 5-7" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == str(out / "report.html")
    return out / "report.html"


def test_paper_only_report_builds_with_sane_table1(paper_report):
    out = paper_report.parent
    for name in ("fig1_similar", "fig2_dissimilar", "fig3_table1", "fig4_layer_effects", "fig5_curves"):
        assert (out / f"{name}.html").stat().st_size > 1_000_000, name  # plotly.js inline: opens offline
    page = paper_report.read_text()
    library = get_plotlyjs()
    assert page.count(library[:200]) == 1  # plotly.js inline, once
    own_markup = page.replace(library, "")
    assert "<script src=" not in own_markup and "https://" not in own_markup  # nothing to fetch: opens offline
    values = json.loads((out / "table1.json").read_text())
    # the paper's Table 1 (pooled over networks) reads +1.6, +1.8, +2.1 points for AnB+ - base
    pooled = [100 * values["pooled"][label]["AnB+ - base"] for label in ("1-7", "3-7", "5-7")]
    assert [round(v, 1) for v in pooled] == [1.6, 1.8, 2.1]
    for normalisation in ("pooled", "paired"):
        for cell in values[normalisation].values():
            assert all(v is not None and -0.05 < v < 0.05 for v in cell.values())
    check = json.loads((out / "science_check.json").read_text())
    # the paper logged one dissimilar split in both directions: two units (split x training seed x target half)
    # against the similar splits' eight, so a Welch interval, and it excludes zero
    assert check["specificity"]["answer"] == "yes" and check["specificity"]["units"] == 2 + 8
    assert check["specificity"]["dissimilar_AnB7_minus_base"] < check["specificity"]["similar_AnB7_minus_base"] < 0
    # the sweep's convergence rule on the paper's logged curves: all 11 bases (8 similar, 2 dissimilar, netbase)
    assert check["convergence"]["bases_with_rule"] == 11 and check["convergence"]["bases_not_converged"] == []
    assert check["co_adaptation"]["left_out_unknown_convergence"] == 0


def test_paper_rows_cover_every_logged_network_once():
    rows = paper_rows()
    counts = rows.groupby(["split_kind", "treatment"]).size().to_dict()
    assert counts == {("similar", "baseA"): 4, ("similar", "baseB"): 4, ("similar", "BnB"): 28,
                      ("similar", "AnB"): 56, ("similar", "BnB+"): 10, ("similar", "AnB+"): 10,
                      ("dissimilar", "baseA"): 1, ("dissimilar", "baseB"): 1, ("dissimilar", "AnB"): 14,
                      ("whole", "base"): 1, ("whole", "random_frozen"): 7}
    based = with_base(rows)
    assert based.loc[~based["treatment"].str.startswith("base"), "base_value"].notna().all()
    # transfer0B0A_1_7 is a B -> A transfer: compared with half0A (0.6151), the base of its target half
    row = based.set_index("job_key").loc["paper/transfer0B0A_1_7"]
    assert (row["treatment"], row["source_half"], row["target_half"]) == ("AnB", "B", "A")
    assert row["base_value"] == pytest.approx(0.6151)
    curves = paper_curves(rows)
    assert set(curves["job_key"]) == set(rows["job_key"])


def _dom_slices(dom: str, ids: list[str]) -> dict[str, str]:
    """The part of the dumped DOM that belongs to each plot div, in document order."""
    starts = sorted((dom.index(f'id="{name}"'), name) for name in ids)
    ends = [start for start, _ in starts[1:]] + [len(dom)]
    return {name: dom[start:end] for (start, name), end in zip(starts, ends)}


def test_report_draws_every_figure_in_headless_chromium(paper_report, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; scripts/setup.sh installs it)")
    # A copy of the report with a probe: console.error and uncaught errors are written into the page,
    # and after drawing, a click on a network of figure 1 is emitted to check the curves panel follows.
    probe_head = """<script>window.probeErrors = []; var originalError = console.error;
console.error = function () {
  window.probeErrors.push(Array.prototype.join.call(arguments, ' ')); originalError.apply(console, arguments); };
window.addEventListener('error', function (e) { window.probeErrors.push('uncaught: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) { window.probeErrors.push('rejected: ' + e.reason); });
</script>"""
    probe_tail = """<script>setTimeout(function () {
  var gd = document.getElementById('fig1_similar');
  gd.emit('plotly_click', {points: [{customdata: ['paper/transfer0A0B_1_3', '']}]});
  setTimeout(function () {
    var out = document.createElement('pre'); out.id = 'probe';
    out.textContent = JSON.stringify({errors: window.probeErrors,
      title: document.getElementById('fig5_curves').layout.title.text,
      picked: document.getElementById('job-picker').value,
      options: document.getElementById('job-picker').options.length});
    document.body.appendChild(out);
  }, 1000);
}, 3000);</script>"""
    page = paper_report.read_text()
    probed = tmp_path / "report.html"
    probed.write_text(page.replace("<head>", "<head>" + probe_head, 1).replace("</body>", probe_tail + "</body>", 1))
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--window-size=1400,2000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120)
    dom = run.stdout
    assert "Uncaught" not in run.stderr, [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    probe = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert probe, "the probe never ran: the page did not finish drawing\n" + run.stderr[-2000:]
    result = json.loads(html.unescape(probe.group(1)))
    assert result["errors"] == []
    assert re.search(r'<pre id="report-errors" hidden="">\s*</pre>', dom)  # the report's own error box stayed empty

    ids = ["fig1_similar", "fig2_dissimilar", "fig3_table1", "fig4_layer_effects", "fig5_curves"]
    slices = _dom_slices(dom, ids)
    assert dom.count("js-plotly-plot") >= len(ids)
    figs = build_figures(*_paper_inputs())
    for name in ("fig1_similar", "fig2_dissimilar", "fig4_layer_effects", "fig5_curves"):
        assert "js-plotly-plot" in slices[name], name
        shown = sum(trace.visible is not False for trace in figs[name].data)
        assert slices[name].count('class="trace scatter') == shown > 0, name
    assert 'class="table"' in slices["fig3_table1"] and "layers 5-7" in slices["fig3_table1"]
    # the click on paper/transfer0A0B_1_3 in figure 1 switched the curves panel to that job
    assert "paper/transfer0A0B_1_3" in result["title"] and result["picked"] == "paper/transfer0A0B_1_3"
    assert result["options"] == len(paper_rows())


def _paper_inputs():
    rows = with_base(paper_rows())
    return rows, paper_curves(rows), rows


def synthetic_rows(n_seeds: int, rng: np.random.Generator) -> pd.DataFrame:
    """One similar split, n_seeds training seeds: per seed, bases of both halves (unit-level noise)
    and BnB, AnB, AnB+ for n = 1..7 into both halves with known effects plus network noise."""
    rows = []
    for seed in range(n_seeds):
        base = {"A": 0.60 + rng.normal(0, 0.01), "B": 0.62 + rng.normal(0, 0.01)}
        for half in "AB":
            rows.append(make_row(f"s{seed}/base{half}", f"base{half}", half, value=base[half], seed=seed))
            other = "B" if half == "A" else "A"
            for n in range(1, 8):
                effects = {"BnB": -0.004 * n, "AnB": -0.01 * n, "AnB+": 0.015}
                for treatment, effect in effects.items():
                    source = half if treatment == "BnB" else other
                    value = base[half] + effect + rng.normal(0, 0.01)
                    rows.append(make_row(f"s{seed}/{treatment}/{source}{half}/n{n}", treatment, half, n=n,
                                         value=value, seed=seed, source=source))
    return with_base(normalise_rows(pd.DataFrame(rows)))


def test_bootstrap_intervals_narrow_with_more_seeds():
    rng = np.random.default_rng(20140101)
    few, many = layer_effects(synthetic_rows(2, rng)), layer_effects(synthetic_rows(8, rng))
    assert len(few) == len(many) == 21  # 3 effects x 7 layers
    width_few = (few["high"] - few["low"]).mean()
    width_many = (many["high"] - many["low"]).mean()
    assert width_many < 0.5 * width_few, (width_few, width_many)
    assert (many["units"] == 16).all() and (few["units"] == 4).all()      # seeds x target halves
    assert set(many.loc[many["effect"] == "specificity loss", "networks"]) == {32}  # 8 seeds x 2 halves x 2
    # with 8 seeds the intervals cover the effects built in (specificity = 0.006 n, boost = 0.015)
    truth = {"co-adaptation loss": lambda n: 0.004 * n, "specificity loss": lambda n: 0.006 * n,
             "fine-tuning boost": lambda n: 0.015}
    covered = [row.low <= truth[row.effect](row.n) <= row.high for row in many.itertuples()]
    assert sum(covered) >= 18


def test_partial_table_builds_report_and_says_what_is_missing(tmp_path):
    rows = pd.DataFrame(table1_rows()[:2] + [make_row("AnB1", "AnB", "B", n=1, value=0.69, source="A")])
    rows.to_parquet(tmp_path / "results.parquet")
    pd.DataFrame({"job_key": ["AnB1"] * 3, "epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.2],
                  "val_top1": [0.3, 0.5, 0.69]}).to_csv(tmp_path / "curves.csv", index=False)
    report = build_report(tmp_path)
    assert report == tmp_path / "report.html" and report.is_file()
    page = report.read_text()
    assert "not enough rows" in page and "no dissimilar-split rows yet" in page
    assert "2 of 3 jobs have no per-epoch metrics" in page
    assert "kaleido" in page  # the static-export note: one line, not a failure
    check = json.loads((tmp_path / "science_check.json").read_text())
    assert {part["answer"] for name, part in check.items() if name != "convergence"} == {"not enough rows"}


def test_bad_rows_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="unknown treatment 'AnB\\+\\+'; expected one of .*AnB\\+"):
        normalise_rows(pd.DataFrame([make_row("x", "AnB++", "B", n=1)]))
    with pytest.raises(ValueError, match="two base rows"):
        with_base(normalise_rows(pd.DataFrame([make_row("b1", "baseA", "A"), make_row("b2", "baseA", "A")])))


def test_analysis_imports_neither_ray_nor_torch():
    code = ("import sys, analysis, analysis.paper, analysis.report, analysis.figures, analysis.stats; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_t_quantile_is_students_t():
    """scipy's Student's t: the table values the paired intervals use (two-sided 95 %)."""
    from analysis.stats import t_quantile

    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert abs(t_quantile(0.975, df) - value) < 1e-4, df


def test_axis_names_the_tables_layers_and_split_files_get_their_own_series():
    """A ResNet-18 table on a split file: n ticks named after its layers (the CaffeNet overlay adds its
    n unnamed), figure 2 draws AnB of that split as its own series, matched with that split's bases."""
    def row(key, treatment, target, n=0, value=0.5, layer="", split="mine", source=""):
        return {**make_row(key, treatment, target, n, value, split_kind="file", source=source), "arch": "resnet18",
                "layer": layer, "split": split}
    rows = with_base(normalise_rows(pd.DataFrame([
        row("bB", "baseB", "B", value=0.6), row("t3", "AnB", "B", 3, 0.55, "layer1.1", source="A"),
        row("t9", "AnB", "B", 9, 0.40, "layer4.1", source="A"),
        row("oB", "baseB", "B", value=0.9, split="other"), row("o3", "AnB", "B", 3, 0.85, "layer1.1", "other", "A")])))
    assert rows.set_index("job_key").loc[["t3", "t9", "o3"], "rel"].round(2).tolist() == [-0.05, -0.2, -0.05]
    fig = build_figures(rows, pd.DataFrame(columns=["job_key", "epoch"]), with_base(paper_rows()))["fig2_dissimilar"]
    axis = fig.layout.xaxis
    assert axis.title.text == "n: layers copied (layer1.1..layer4.1)"
    assert "3<br>layer1.1" in axis.ticktext and "9<br>layer4.1" in axis.ticktext and "2" in axis.ticktext
    assert not [t for t in axis.ticktext if "conv" in t or "fc" in t]
    assert {t.name for t in fig.data if t.meta == "sweep"} >= {"AnB, split mine", "AnB, split other"}


def diagnostic_tables(tmp_path: Path) -> Path:
    """A results table (two split kinds, bases + AnB/AnB+ at n = 1..3) with its diagnostics.csv and
    transferability.json, as the sweep writes them: CKA falls with depth, faster on the dissimilar split."""
    layers = ["conv1", "conv2", "conv3", "fc4"]
    rows, diag = [], []
    for kind, drop in (("similar", 0.1), ("dissimilar", 0.25)):
        rows += [make_row(f"{kind}-baseA", "baseA", "A", value=0.6, split_kind=kind),
                 make_row(f"{kind}-baseB", "baseB", "B", value=0.7, split_kind=kind)]
        for n in (1, 2, 3):
            for treatment in ("AnB", "AnB+"):
                rows.append(make_row(f"{kind}-{treatment}{n}", treatment, "B", n=n, value=0.7 - drop * n / 3
                                     + (0.05 if "+" in treatment else 0), split_kind=kind, source="A"))
        unit = {"split_kind": kind, "split_seed": 0, "split": "similar-s0" if kind == "similar" else kind,
                "seed": 0, "source_half": "A",
                "target_half": "B", "job_key": f"{kind}-diag"}
        for i, la in enumerate(layers, 1):
            for j, lb in enumerate(layers, 1):
                diag.append({**unit, "kind": "cka", "net_a": f"{kind}-baseA", "net_b": f"{kind}-baseB",
                             "treatment": "baseA-baseB", "n": i, "layer_a": la, "layer_b": lb,
                             "value": max(0.0, 1 - drop * (i + j) - 0.1 * abs(i - j))})
            for n in (1, 2, 3):
                diag.append({**unit, "kind": "cka", "net_a": f"{kind}-AnB{n}", "net_b": f"{kind}-baseA",
                             "treatment": "AnB", "n": n, "layer_a": la, "layer_b": la,
                             "value": 1.0 if i <= n else 0.5})
            if i < len(layers):
                for estimator, value in (("probe", 0.7 - drop * i / 3), ("hscore", 3 - i), ("logme", -0.2 * i)):
                    diag.append({**unit, "kind": estimator, "net_a": f"{kind}-baseA", "net_b": "", "treatment": "baseA",
                                 "n": i, "layer_a": la, "layer_b": "", "value": value})
        diag.append({**unit, "kind": "leep", "net_a": f"{kind}-baseA", "net_b": "", "treatment": "baseA", "n": None,
                     "layer_a": "fc4", "layer_b": "", "value": -1.0 - drop})
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    pd.DataFrame(diag).to_csv(tmp_path / "diagnostics.csv", index=False)
    estimators = {e: {t: {"tau": 0.6, "p_value": 0.04, "points": 6} for t in ("AnB", "AnB+")}
                  for e in ("hscore", "logme", "leep", "probe")}
    (tmp_path / "transferability.json").write_text(json.dumps({"metric": "top1_best10", "estimators": estimators}))
    return tmp_path


def test_report_draws_the_diagnostics_in_headless_chromium(tmp_path):
    from analysis.diagnostics import DIAGNOSTIC_FILES

    report = build_report(diagnostic_tables(tmp_path))
    page = report.read_text()
    assert 'id="diagnostics"' in page and 'id="transferability"' in page and "τ = +0.60" in page
    assert 'id="shared-init"' in page          # recipe fast: baseA and baseB from one init, said beside the heatmap
    for name in DIAGNOSTIC_FILES:
        assert (tmp_path / f"{name}.html").is_file()
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; scripts/setup.sh installs it)")
    probe_tail = """<script>setTimeout(function () {
  var out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({errors: window.reportErrors});
  document.body.appendChild(out);
}, 3000);</script>"""
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe_tail + "</body>", 1))
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--window-size=1400,2000",
         "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    dom = run.stdout
    probe = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert probe, "the probe never ran: the page did not finish drawing\n" + run.stderr[-2000:]
    assert json.loads(html.unescape(probe.group(1)))["errors"] == []
    slices = _dom_slices(dom, list(DIAGNOSTIC_FILES))
    assert slices["diag1_cka_layers"].count('class="hm"') == 2 == slices["diag1_cka_layers"].count("<image")   # 2 kinds
    assert slices["diag2_cka_transfers"].count('class="trace scatter') == 6          # 3 n x 2 split kinds
    assert slices["diag3_probe"].count('class="trace scatter') == 6                  # probe, AnB, AnB+ x 2 kinds
    assert slices["diag4_estimators"].count('class="trace scatter') == 2 * 4 * 2     # 2 treatments x 4 x 2 kinds
    assert "τ = +0.60" in slices["diag4_estimators"]
