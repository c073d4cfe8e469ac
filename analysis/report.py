"""One offline HTML report of a sweep (or of the paper's data), plus each figure on its own.

Writes into the results folder (or `out_dir`): report.html (plotly.js inline once, no network),
fig1_similar.html … fig5_curves.html, table1.json, science_check.json, and PNG/SVG copies where
kaleido is installed. Usage: `build_report(results_dir)` (the sweep calls it at its end) or
`python -m analysis RESULTS_DIR [--out DIR]`.
"""

from __future__ import annotations

import datetime
import html
import importlib.util
import json
import time
import os
import logging
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from analysis import figures
from analysis.diagnostics import bases_share_init, diagnostic_figures, diagnostics_html, load_diagnostics
from analysis.findings import co_adaptation_by_arm, co_adaptation_reading, convergence_summary, science_check
from analysis.similarity import has_graded_levels, similarity_figures, similarity_html, similarity_summary
from analysis.results import (BASE_TREATMENTS, METRIC, REDUCED, SETTING_COLUMNS, SPLIT_KINDS, TREATMENTS,
                              input_wait_by_treatment, layer_ticks, load_curves, load_rows, settings, split_label,
                              with_base)
from analysis.stats import table1
from raytransfer.convergence import PLATEAU_RULE
from raytransfer.recipes import RECIPES

log = logging.getLogger(__name__)

FIGURE_FILES = ("fig1_similar", "fig2_dissimilar", "fig3_table1", "fig4_layer_effects", "fig5_curves")
REDUCED_FIGURE = "fig6_reduced"  # only where the table has reduced_k rows
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

# Clicking a network in figures 1/2 (customdata[0] = job key) shows its curves in figure 5 by
# applying that job's dropdown entry; the <select> lists the same entries.
CLICK_SCRIPT = """
document.getElementById('{plot_id}').on('plotly_click', function (event) {
  var point = event.points && event.points[0];
  if (point && point.customdata && typeof point.customdata[0] === 'string') { showCurves(point.customdata[0]); }
});"""
CURVES_SCRIPT = """
function curveButtons() {
  var gd = document.getElementById('fig5_curves');
  var menus = (gd && gd.layout && gd.layout.updatemenus) || [];
  return menus.length ? menus[0].buttons : [];
}
function showCurves(key) {
  var gd = document.getElementById('fig5_curves'), buttons = curveButtons();
  var note = document.getElementById('curves-note');
  for (var i = 0; i < buttons.length; i++) {
    if (buttons[i].label === key) {
      Plotly.update(gd, buttons[i].args[0], buttons[i].args[1]);
      Plotly.relayout(gd, {'updatemenus[0].active': i});
      document.getElementById('job-picker').value = key;
      note.textContent = '';
      return;
    }
  }
  note.textContent = 'no per-epoch metrics for ' + key;
}
function fillPicker() {
  var picker = document.getElementById('job-picker');
  curveButtons().forEach(function (button) {
    var option = document.createElement('option');
    option.value = option.textContent = button.label;
    picker.appendChild(option);
  });
  picker.addEventListener('change', function () { showCurves(picker.value); });
}"""
# Any script error is written into the page, so a figure that failed to draw is visible (and testable).
ERROR_HOOK = """
window.reportErrors = [];
function reportError(message) {
  window.reportErrors.push(message);
  var box = document.getElementById('report-errors');
  if (box) { box.hidden = false; box.textContent += 'script error: ' + message + '\\n'; }
}
window.addEventListener('error', function (event) { reportError(String(event.message)); });
window.addEventListener('unhandledrejection', function (event) { reportError(String(event.reason)); });"""
CSS = """
body { font-family: system-ui, sans-serif; margin: 0 1.5rem 3rem; color: #222; }
h1 { font-size: 1.5rem; margin: 1rem 0 0.2rem; }
.meta { color: #666; font-size: 0.9rem; }
.science { border: 1px solid #ccd; background: #f7f7fc; padding: 0.6rem 1rem; margin: 1rem 0; }
.science li { margin: 0.3rem 0; }
.answer-yes { color: #17752a; font-weight: 600; } .answer-no { color: #b3261e; font-weight: 600; }
.answer-not { color: #8a6d00; font-weight: 600; }
.grid { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 1rem; align-items: start; }
.side { position: sticky; top: 0.5rem; }
.notes { font-size: 0.9rem; color: #444; }
table.coverage { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
table.coverage td, table.coverage th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
#report-errors { color: #b3261e; white-space: pre-wrap; }
@media (max-width: 1100px) { .grid { grid-template-columns: minmax(0, 1fr); } .side { position: static; } }
"""


def build_report(results_dir: Path, out_dir: Path | None = None, dataset: str | None = None,
                 arch: str | None = None, recipe: str | None = None) -> Path:
    """(Re)build the report of a finished or running sweep; returns the path of report.html."""
    results_dir = Path(results_dir)
    rows = load_rows(results_dir)
    return build_report_from_rows(rows, load_curves(results_dir), out_dir or results_dir,
                                  source=str(results_dir), dataset=dataset, arch=arch, recipe=recipe,
                                  progress=sweep_progress(results_dir), diagnostics=load_diagnostics(results_dir))


def sweep_progress(results_dir: Path) -> str | None:
    """'N of M networks' while a sweep runs (its runner writes sweep_progress.json), else None."""
    f = Path(results_dir) / "sweep_progress.json"
    try:
        p = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(p["updated_at"]))
    state = "the sweep has ended" if p.get("final") else "the sweep is running: this page is rebuilt as jobs land"
    failed = f", {p['failed']} failed" if p.get("failed") else ""
    return f"This report holds {p['done']} of the {p['planned']} networks of its sweep{failed} ({state}; updated {when})."


def asked_for(rows: pd.DataFrame, dataset=None, arch=None, recipe=None) -> pd.DataFrame:
    """The rows of the dataset, arch and recipe asked for (None: any)."""
    wanted = {"dataset": dataset, "arch": arch, "sweep_recipe": recipe}
    for column, value in wanted.items():
        if value is not None:
            if value not in set(rows[column]):
                raise ValueError(f"no rows with {column.replace('sweep_', '')} {value!r}; the table has "
                                 f"{sorted(set(rows[column]))}")
            rows = rows[rows[column] == value]
    return rows


def _of_setting(rows: pd.DataFrame, setting: tuple) -> pd.DataFrame:
    return rows[rows[list(SETTING_COLUMNS)].astype(str).agg("|".join, axis=1) == "|".join(setting)]


def pick_setting(rows: pd.DataFrame, dataset=None, arch=None, recipe=None) -> tuple[pd.DataFrame, list[str]]:
    """Keep one setting (dataset, arch, the sweep's recipe and its --set overrides): the one asked for, else
    the one with most rows (of as many, the first in the table: a sweep's first --recipes arm). A sweep's
    reduced-volume nets (their own solver, e.g. paper_reduced) belong to the setting of its recipe (paper).
    Returns the rows and notes naming what was left out."""
    rows = asked_for(rows, dataset, arch, recipe)
    combos = settings(rows)
    if len(combos) <= 1:
        return rows, []
    chosen = combos[0]
    notes = [f"the table holds {len(combos)} settings (dataset, arch, recipe, --set overrides); this report shows "
             f"{setting_text(chosen)}; left out: {', '.join(setting_text(c) for c in combos[1:])} "
             "(co-adaptation is answered for each at the top; pick one: raytransfer report RESULTS_DIR --dataset D "
             "--arch A --recipe R; python -m analysis takes the same flags)"]
    return _of_setting(rows, chosen), notes


def arms_of(rows: pd.DataFrame) -> tuple[dict, set]:
    """The table's settings as arms, {label: rows with their base}, the report's main setting first (pick_setting's
    choice); and the labels of arms trained with a CPU-sized built-in recipe (the demo's: width below 1). A label
    is the recipe and its overrides, with dataset and arch where the arms differ in them."""
    combos = settings(rows)
    differ = [len({c[i] for c in combos}) > 1 for i in range(2)]
    arms, small = {}, set()
    for setting in combos:
        dataset, arch, recipe, overrides = setting
        label = " / ".join([v for v, d in zip((dataset, arch), differ) if d] + [recipe]) + (f" [{overrides}]" if overrides else "")
        arms[label] = with_base(_of_setting(rows, setting))
        if recipe in RECIPES and RECIPES[recipe].width < 1 and "width" not in overrides:
            small.add(label)
    return arms, small


def setting_text(setting: tuple) -> str:
    """A setting as the report names it: dataset / arch / recipe [overrides]."""
    dataset, arch, recipe, overrides = setting
    return f"{dataset} / {arch} / {recipe}" + (f" [{overrides}]" if overrides else "")


def build_figures(rows: pd.DataFrame, curves: pd.DataFrame, paper: pd.DataFrame | None) -> dict[str, go.Figure]:
    """All five figures, keyed by their file names; figure 6 (reduced volume) too where the rows have
    reduced_k networks."""
    figs = dict(zip(FIGURE_FILES, (
        figures.fig_similar(rows, paper), figures.fig_dissimilar(rows, paper),
        figures.fig_table1(rows, paper), figures.fig_layer_effects(rows), figures.fig_curves(curves, rows))))
    if (rows["treatment"] == REDUCED).any():
        from analysis.paper import paper_reduced_curve

        figs[REDUCED_FIGURE] = figures.fig_reduced(rows, paper_reduced_curve() if paper is not None else None)
    return figs


def build_report_from_rows(rows: pd.DataFrame, curves: pd.DataFrame, out_dir: Path, source: str,
                           dataset=None, arch=None, recipe=None, paper_overlay: bool = True,
                           progress: str | None = None, diagnostics: tuple | None = None) -> Path:
    """Build every output from rows of the results table (already normalised); `diagnostics`:
    (diagnostics rows, transferability summary) of analysis.diagnostics.load_diagnostics, if any."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms, small = arms_of(asked_for(rows, dataset, arch, recipe))
    rows, notes = pick_setting(rows, dataset, arch, recipe)
    rows = with_base(rows)
    order = {"split_kind": {kind: i for i, kind in enumerate(SPLIT_KINDS)},
             "treatment": {treatment: i for i, treatment in enumerate(TREATMENTS)}}
    rows = rows.sort_values(["split_kind", "split_seed", "seed", "treatment", "n", "job_key"], kind="stable",
                            key=lambda column: column.map(order[column.name]) if column.name in order else column)
    curves = curves[curves["job_key"].isin(set(rows["job_key"]))]
    paper = None
    if paper_overlay:
        from analysis.paper import paper_rows  # here, so `python -m analysis.paper` imports it once

        paper = with_base(paper_rows())

    figs = build_figures(rows, curves, paper)
    results_table1 = table1(rows)
    check = science_check(rows)
    convergence = convergence_summary(rows, PLATEAU_RULE)
    by_arm = co_adaptation_by_arm(arms, PLATEAU_RULE, small)    # None for a table of one setting
    reading = None if by_arm else co_adaptation_reading(check["co_adaptation"], bool(small) and set(arms) <= small)
    if reading:
        check["co_adaptation"]["reading"] = reading
    atomic_write(out_dir / "table1.json", lambda p: p.write_text(json.dumps(results_table1, indent=2) + "\n"))
    atomic_write(out_dir / "science_check.json",
                 lambda p: p.write_text(json.dumps({**check, "convergence": convergence,
                                                    **({"co_adaptation_by_arm": by_arm} if by_arm else {})},
                                                   indent=2) + "\n"))
    for name, fig in figs.items():
        atomic_write(out_dir / f"{name}.html", lambda p: fig.write_html(p, include_plotlyjs=True, config=PLOT_CONFIG))
    section = ""
    diag, tau = diagnostics or (None, None)
    if diag is not None:
        diag_figs = diagnostic_figures(diag, tau, rows)
        for name, fig in diag_figs.items():
            atomic_write(out_dir / f"{name}.html", lambda p: fig.write_html(p, include_plotlyjs=True, config=PLOT_CONFIG))
        section = diagnostics_html(diag_figs, diag, tau, _div, shared_init=bases_share_init(rows))
    if has_graded_levels(rows):                    # a sweep over graded splits: the similarity surface
        summary = similarity_summary(rows, diag)
        atomic_write(out_dir / "similarity.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
        sim_figs = similarity_figures(summary, layer_ticks(rows))
        for name, fig in sim_figs.items():
            atomic_write(out_dir / f"{name}.html", lambda p: fig.write_html(p, include_plotlyjs=True, config=PLOT_CONFIG))
        section += similarity_html(sim_figs, summary, _div)
    notes += missing_notes(rows, curves) + [export_static(figs, out_dir)]

    page = render_page(figs, check, rows, notes, source, progress, convergence, section, by_arm)
    path = out_dir / "report.html"
    atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))   # a reader never sees half a page
    log.info("wrote %s (%d networks)", path, len(rows))
    return path


def atomic_write(path: Path, write):
    """write(tmp) then rename over `path`: a live report is replaced whole, never seen half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def export_static(figs: dict[str, go.Figure], out_dir: Path) -> str:
    """PNG and SVG copies where kaleido can run; otherwise a one-line note (never a failure)."""
    if importlib.util.find_spec("kaleido") is None:
        return "static PNG/SVG export skipped: kaleido is not installed (pip install kaleido to get them)."
    try:
        for name, fig in figs.items():
            for suffix in ("png", "svg"):
                fig.write_image(out_dir / f"{name}.{suffix}")
    except Exception as error:  # kaleido needs a working Chrome; a report must not fail for a picture
        log.warning("static export failed: %s", error)
        return f"static PNG/SVG export failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return "static PNG and SVG copies of each figure written beside this report."


def missing_notes(rows: pd.DataFrame, curves: pd.DataFrame) -> list[str]:
    """What the rows do not yet allow: networks without their base, absent treatments, no curves."""
    notes = []
    transfers = rows[~rows["treatment"].isin(BASE_TREATMENTS + ("scratch", REDUCED))]
    orphans = transfers[transfers["base_value"].isna()]
    if len(orphans):
        notes.append(f"{len(orphans)} networks have no base of their target half in the table (left out of "
                     f"every comparison with a base), e.g. {', '.join(orphans['job_key'].head(3))}")
    similar = rows[rows["split_kind"] == "similar"]
    for treatment, needed_for in (("BnB", "figure 4 co-adaptation / specificity"),
                                  ("AnB", "figures 1, 2, 4 and the science check"),
                                  ("AnB+", "Table 1 and the fine-tuning boost"), ("BnB+", "Table 1, AnB+ − BnB+")):
        if not (similar["treatment"] == treatment).any():
            notes.append(f"no {treatment} rows on the similar split yet: {needed_for} incomplete")
    if not (rows["split_kind"] == "dissimilar").any():
        notes.append("no dissimilar-split rows yet")
    if not (rows["treatment"] == "random_frozen").any():
        notes.append("no random_frozen rows yet")
    no_curves = len(set(rows["job_key"]) - set(curves["job_key"]))
    if no_curves:
        notes.append(f"{no_curves} of {len(rows)} jobs have no per-epoch metrics in curves.csv")
    return notes


def coverage_html(rows: pd.DataFrame) -> str:
    """Networks per (split kind, treatment) and n: what the figures rest on."""
    if rows.empty:
        return "<p>No finished jobs in the table yet.</p>"
    rows = rows.assign(_split=[split_label(row) for _, row in rows.iterrows()])
    counts = rows.groupby(["_split", "treatment", "n"]).size().unstack("n", fill_value=0)
    header = "".join(f"<th>n={n}</th>" for n in counts.columns)
    body = "".join(f"<tr><th>{html.escape(kind)}</th><th>{html.escape(treatment)}</th>"
                   + "".join(f"<td>{v}</td>" for v in values) + "</tr>"
                   for (kind, treatment), values in zip(counts.index, counts.to_numpy()))
    return f'<table class="coverage"><tr><th>split</th><th>treatment</th>{header}</tr>{body}</table>'


def input_html(rows: pd.DataFrame) -> str:
    """Per treatment and input path, the share of training time the step waited on its input (weighed by each
    job's wall time): what the GPU-hours lost to input were; '' where no row recorded it."""
    waits = input_wait_by_treatment(rows.to_dict("records")) if "input_wait_share" in rows else []
    if not waits:
        return ""
    body = "".join(f"<tr><th>{html.escape(w['treatment'])}</th><td>{html.escape(w['input'])}</td>"
                   f"<td>{w['networks']}</td><td>{100 * w['input_wait_share']:.1f} %</td></tr>" for w in waits)
    return ('<h3>Time lost to input</h3><table class="coverage" id="input-wait"><tr><th>treatment</th><th>input</th>'
            f"<th>networks</th><th>training time waiting on input</th></tr>{body}</table>")


def _answer_class(answer: str) -> str:
    return {"yes": "answer-yes", "no": "answer-no"}.get(answer, "answer-not")


def science_html(check: dict, convergence: dict | None = None, by_arm: dict | None = None) -> str:
    items = "".join(
        f'<li id="finding-{name}">{html.escape(part["question"])} <span class="{_answer_class(part["answer"])}">'
        f'{html.escape(part["answer"])}</span><br>{html.escape(part["text"])}'
        + (f'<br><i class="reading">{html.escape(part["reading"])}</i>' if part.get("reading") else "") + "</li>"
        for name, part in check.items())
    main = f" of {html.escape(by_arm['main'])}" if by_arm else ""
    return (f'<section class="science" id="science-check"><b>The paper\'s findings</b> (from this table\'s own '
            f"rows{main}; each network relative to the base of its target half; 95 % t intervals over independent "
            f"units of split × training seed × target half)<ul>{items}</ul>{convergence_html(convergence)}"
            f"{arms_html(by_arm)}</section>")


def arms_html(by_arm: dict | None) -> str:
    """Co-adaptation in each arm of the table (each its own recipe), and what their difference means."""
    if not by_arm:
        return ""
    items = []
    for label, part in by_arm["arms"].items():
        gain = part.get("second_schedule_gain")
        second = "" if not gain else (f"; a second schedule from its bases' own weights (BnB+ at n = {gain['n']}) "
                                      f"gained {100 * gain['estimate']:+.1f} points ({gain['networks']} networks)")
        bases = (f"{part['bases'] - part['bases_not_converged']} of {part['bases']} bases converged{second}")
        text = part["text"].removeprefix(f"{part['answer']}:")          # the answer leads, in its colour
        items.append(f'<li class="arm" data-arm="{html.escape(label)}"><b>{html.escape(label)}</b>: '
                     f'<span class="{_answer_class(part["answer"])}">{html.escape(part["answer"])}</span>:'
                     f"{html.escape(text)} {html.escape(bases)}.</li>")
    return (f'<div id="co-adaptation-arms"><b>Co-adaptation in each arm</b> (the same grid trained with each '
            f"recipe of the sweep; the figures below show {html.escape(by_arm['main'])})<ul>{''.join(items)}</ul>"
            f'<p id="co-adaptation-reading">{html.escape(by_arm["reading"])}</p></div>')


def convergence_html(convergence: dict | None) -> str:
    """The convergence rule, which bases stopped short (their comparisons are left out), and what a second
    full schedule from a base's own weights (BnB+ at the deepest n) gave."""
    if not convergence:
        return ""
    short = convergence["bases_not_converged"]
    if convergence["bases_with_rule"] == 0:
        state = "this table does not record convergence (a sweep of an older version): the findings assume it."
    elif short:
        state = (f'<span class="answer-no">{len(short)} of {convergence["bases_with_rule"]} bases did not converge'
                 f"</span> ({html.escape(', '.join(short[:4]))}{' …' if len(short) > 4 else ''}): every comparison "
                 "against them is not meaningful and is left out of the findings. Train longer: let each net "
                 "train until its plateau (--until-plateau MAX_EPOCHS), or use a recipe with more epochs.")
    else:
        state = f'All {convergence["bases_with_rule"]} bases converged.'
    gain = convergence.get("second_schedule_gain")
    second = ""
    if gain:
        bounds = "" if gain["interval"] is None else (f", 95 % interval {100 * gain['interval'][0]:+.1f} to "
                                                      f"{100 * gain['interval'][1]:+.1f}")
        second = (f" A second full schedule from a base's own weights (BnB+ at n = {gain['n']}) gained "
                  f"{100 * gain['estimate']:+.1f} points{bounds} ({gain['networks']} networks): what a fine-tuned "
                  "net gains from training again rather than from transfer; set it beside AnB+ minus its base.")
    return (f'<p id="convergence">Convergence rule: {html.escape(convergence["rule"])}. {state}'
            f"{html.escape(second)}</p>")


def _div(fig: go.Figure, name: str, post_script: str | None = None) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=name, config=PLOT_CONFIG,
                       post_script=post_script)


def render_page(figs: dict[str, go.Figure], check: dict, rows: pd.DataFrame, notes: list[str], source: str,
                progress: str | None = None, convergence: dict | None = None, diagnostics_section: str = "",
                by_arm: dict | None = None) -> str:
    """The whole report as one HTML string, plotly.js inlined once."""
    created = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    note_items = "".join(f"<li>{html.escape(note)}</li>" for note in notes if note)
    curves_div = _div(figs["fig5_curves"], "fig5_curves", post_script="fillPicker();")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>raytransfer report</title>
<style>{CSS}</style>
<script>{ERROR_HOOK}</script>
<script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>
<script>{get_plotlyjs()}</script>
<script>{CURVES_SCRIPT}</script>
</head><body>
<h1>How transferable are features? — report</h1>
<p class="meta">source: {html.escape(source)} · {len(rows)} finished networks · metric: {METRIC} (mean of the 10
best validation evaluations) · built {html.escape(created)}</p>
{f'<p class="meta" id="sweep-progress"><b>{html.escape(progress)}</b></p>' if progress else ""}
<pre id="report-errors" hidden></pre>
{science_html(check, convergence, by_arm)}
<div class="grid">
  <div>{_div(figs["fig1_similar"], "fig1_similar", CLICK_SCRIPT)}
       {_div(figs["fig2_dissimilar"], "fig2_dissimilar", CLICK_SCRIPT)}</div>
  <div class="side"><p class="notes">Click a network in figure 1 or 2 to see its training curves, or pick
  one: <select id="job-picker"></select> <span id="curves-note"></span></p>{curves_div}</div>
</div>
{_div(figs["fig3_table1"], "fig3_table1")}
{_div(figs["fig4_layer_effects"], "fig4_layer_effects")}
{_div(figs[REDUCED_FIGURE], REDUCED_FIGURE) if REDUCED_FIGURE in figs else ""}
{diagnostics_section}
<section class="notes"><h2>What the rows allow</h2>{coverage_html(rows)}{input_html(rows)}<ul>{note_items}</ul>
<p>Methods. "Its base": the base network trained on the row's target half with the same split and
training seed; random_frozen is compared with the base of its own target half (netbase, the net on all
classes, where it ran on the whole dataset as in the paper). Table 1 pooled: mean of
all AnB+ networks with n in the range minus the mean of all base networks (resp. all BnB+ networks in the
range), as the paper did; paired: each network minus its own base, averaged over the networks in the
range. Figure 4: paired differences; 95% interval = estimate ± t(G − 1) × bootstrap standard error
(× √(G/(G − 1))) over the G independent units, one unit = one split (kind, seed, label), training seed
and target half, because every network of a unit starts from that unit's bases; 2000 resamples with a fixed seed. A
percentile interval would be far too narrow with the few units a sweep has. No interval where one unit
holds all the networks.</p></section>
</body></html>
"""


def format_table1(values: dict) -> str:
    """Table 1 as aligned text, in top-1 points, both normalisations."""
    lines = [f"{'Table 1 (similar split)':<26}{'AnB+ - base':>14}{'AnB+ - BnB+':>14}"]
    for normalisation in ("pooled", "paired"):
        for label, cell in values[normalisation].items():
            fmt = lambda v: "n/a" if v is None else f"{100 * v:+.2f} pts"  # noqa: E731
            lines.append(f"{normalisation + ', layers ' + label:<26}{fmt(cell['AnB+ - base']):>14}"
                         f"{fmt(cell['AnB+ - BnB+']):>14}")
    return "\n".join(lines)
