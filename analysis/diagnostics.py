"""The report's section on what is transferred: CKA heatmaps, probe curves beside AnB, and each
transferability estimator against the measured AnB / AnB+ accuracy with Kendall's tau.

Reads only the sweep's `diagnostics.{parquet,csv}` (one row per measurement) and `transferability.json`,
plus the results rows the report already holds. One function per figure, each a `go.Figure`.
Usage: `diag, tau = load_diagnostics(results_dir); figs = diagnostic_figures(diag, tau, rows)`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.results import METRIC
from raytransfer.diagnostics import ESTIMATOR_UNIT, estimator_pairs

DIAGNOSTIC_FILES = ("diag1_cka_layers", "diag2_cka_transfers", "diag3_probe", "diag4_estimators")
KIND_COLOURS = {"similar": "#d62728", "dissimilar": "#8c564b", "file": "#9467bd"}
ESTIMATOR_TITLES = {"hscore": "H-score", "logme": "LogME", "leep": "LEEP (softmax, one per split)",
                    "probe": "linear probe"}
CKA_TREATMENTS = ("AnB", "AnB+", "BnB", "BnB+")


def load_diagnostics(results_dir: Path) -> tuple[pd.DataFrame | None, dict | None]:
    """(diagnostics rows, transferability summary), or (None, None) where the sweep measured none."""
    results_dir = Path(results_dir)
    parquet, csv = results_dir / "diagnostics.parquet", results_dir / "diagnostics.csv"
    candidates = [p for p in (parquet, csv) if p.is_file()]
    if not candidates:
        return None, None
    newest = max(candidates, key=lambda p: (p.stat().st_mtime, p.suffix == ".parquet"))
    diag = pd.read_parquet(newest) if newest.suffix == ".parquet" else pd.read_csv(newest)
    for column in ("net_b", "layer_b", "treatment", "split"):
        diag[column] = diag[column].astype(object).where(diag[column].notna(), "").astype(str)
    diag["n"] = pd.to_numeric(diag["n"], errors="coerce")
    diag["value"] = pd.to_numeric(diag["value"], errors="coerce")
    tau_file = results_dir / "transferability.json"
    tau = json.loads(tau_file.read_text()) if tau_file.is_file() else None
    return diag, tau


def _layers(diag: pd.DataFrame) -> list[str]:
    """The layer names in the net's order (n = 1, 2, ... of the A-vs-B rows)."""
    ab = diag[(diag["kind"] == "cka") & (diag["treatment"] == "baseA-baseB")]
    order = ab.drop_duplicates("layer_a").sort_values("n")["layer_a"].tolist()
    return order or sorted(set(diag["layer_a"]))


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig


SHARED_INIT = ("baseA and baseB started from one initialisation (the recipe's independent_bases is off): their CKA "
               "measures a shared start as much as shared features")


def bases_share_init(rows: pd.DataFrame) -> bool:
    """Did the rows' bases start from one init? Each base row's recipe (its name and --set overrides) says."""
    from raytransfer.recipes import RECIPES, RecipeError, get_recipe, parse_overrides

    bases = rows[rows["treatment"].isin(["baseA", "baseB"])]
    for name, overrides in set(zip(bases["recipe"], bases.get("recipe_set", pd.Series("", index=bases.index)))):
        if name not in RECIPES:
            continue
        try:
            recipe = get_recipe(name, **parse_overrides([o for o in str(overrides or "").split(";") if o]))
        except RecipeError:
            recipe = RECIPES[name]
        if not recipe.independent_bases:
            return True
    return False


def fig_cka_layers(diag: pd.DataFrame, shared_init: bool = False) -> go.Figure:
    """CKA of every layer pair of baseA vs baseB, one heatmap per split kind (mean over split seeds,
    training seeds and target halves), on the target half's validation images; `shared_init`: the bases
    started from one init, which the title says."""
    ab = diag[(diag["kind"] == "cka") & (diag["treatment"] == "baseA-baseB")]
    kinds = [k for k in ("similar", "dissimilar", "file") if (ab["split_kind"] == k).any()]
    if not kinds:
        return _empty(go.Figure(), "no CKA rows yet (--diagnostics cka)")
    layers = _layers(diag)
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[f"{k} split" for k in kinds],
                        horizontal_spacing=0.12)
    for col, kind in enumerate(kinds, 1):
        mine = ab[ab["split_kind"] == kind]
        grid = mine.pivot_table(index="layer_b", columns="layer_a", values="value", aggfunc="mean")
        grid = grid.reindex(index=layers, columns=layers)
        units = mine.groupby(["split_seed", "seed", "target_half"]).ngroups
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=layers, y=layers, zmin=0, zmax=1, colorscale="Viridis",
                                 showscale=col == len(kinds), colorbar=dict(title="CKA"), name=f"{kind} split",
                                 hovertemplate=f"{kind}: baseA %{{x}} vs baseB %{{y}}<br>CKA %{{z:.3f}}"
                                               f"<br>mean of {units} split x seed x target<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="baseA layer", row=1, col=col)
        fig.update_yaxes(title_text="baseB layer", row=1, col=col)
    title = "6 · Layer similarity of baseA and baseB (linear CKA, minibatch estimator)"
    if shared_init:
        title += f"<br><sup>{SHARED_INIT}</sup>"
    fig.update_layout(title=title, template="plotly_white", height=480, margin=dict(t=110 if shared_init else 80))
    return fig


def fig_cka_transfers(diag: pd.DataFrame) -> go.Figure:
    """CKA of each transferred net with the base it copied from, at every layer: one panel per
    treatment, one line per (split kind, n); the copied layers of a frozen net are its base's (CKA 1)."""
    rows = diag[(diag["kind"] == "cka") & diag["treatment"].isin(CKA_TREATMENTS)]
    treatments = [t for t in CKA_TREATMENTS if (rows["treatment"] == t).any()]
    if not treatments:
        return _empty(go.Figure(), "no transferred nets with CKA rows yet (--diagnostics cka)")
    layers = _layers(diag)
    ns = sorted(int(n) for n in rows["n"].dropna().unique())
    fig = make_subplots(rows=1, cols=len(treatments), subplot_titles=[f"{t} vs its base" for t in treatments],
                        shared_yaxes=True, horizontal_spacing=0.04)
    for col, treatment in enumerate(treatments, 1):
        mine = rows[rows["treatment"] == treatment]
        for kind, dash in (("similar", "solid"), ("dissimilar", "dash"), ("file", "dot")):
            for n in ns:
                part = mine[(mine["split_kind"] == kind) & (mine["n"] == n)]
                if part.empty:
                    continue
                mean = part.groupby("layer_a")["value"].mean().reindex(layers)
                shade = 0.15 + 0.75 * (ns.index(n) / max(1, len(ns) - 1))
                fig.add_trace(go.Scatter(x=layers, y=mean.to_numpy(), mode="lines+markers", legendgroup=kind,
                                         name=f"{kind}, n = {n}", showlegend=col == 1,
                                         line=dict(dash=dash, color=f"rgba(31, 63, 191, {shade:.2f})"),
                                         hovertemplate=f"{treatment} n = {n} ({kind}) vs its base<br>%{{x}}: "
                                                       "CKA %{y:.3f}<extra></extra>"),
                              row=1, col=col)
    fig.update_yaxes(title_text="CKA with its base", range=[0, 1.05], row=1, col=1)
    fig.update_layout(title="7 · How much of its base each transferred net keeps, layer by layer (darker: larger n)",
                      template="plotly_white", height=460)
    return fig


def fig_probe(diag: pd.DataFrame, rows: pd.DataFrame) -> go.Figure:
    """Linear probes on baseA's layer n (fitted on half B's train images, scored on its val images)
    beside AnB and AnB+ at n, per split kind (means over split seeds, training seeds, target halves)."""
    probes = diag[diag["kind"] == "probe"]
    fig = go.Figure()
    if probes.empty:
        return _empty(fig, "no probe rows yet (--diagnostics probe)")
    layers = probes.drop_duplicates("n").sort_values("n")
    ticks = dict(zip(layers["n"].astype(int), layers["layer_a"]))
    for kind in ("similar", "dissimilar", "file"):
        colour = KIND_COLOURS[kind]
        mine = probes[probes["split_kind"] == kind]
        if mine.empty:
            continue
        curve = mine.groupby("n")["value"].mean()
        fig.add_trace(go.Scatter(x=curve.index, y=curve.to_numpy(), mode="lines+markers", name=f"probe on baseA, {kind}",
                                 line=dict(color=colour, dash="dot"), marker=dict(symbol="square"),
                                 hovertemplate=f"probe on baseA layer n = %{{x}} ({kind})<br>top-1 %{{y:.3f}}<extra></extra>"))
        for treatment, symbol, dash in (("AnB", "diamond", "solid"), ("AnB+", "diamond-cross", "dash")):
            measured = rows[(rows["treatment"] == treatment) & (rows["split_kind"] == kind)]
            if measured.empty:
                continue
            mean = measured.groupby("n")[METRIC].mean()
            fig.add_trace(go.Scatter(x=mean.index, y=mean.to_numpy(), mode="lines+markers",
                                     name=f"{treatment} (trained), {kind}", marker=dict(symbol=symbol),
                                     line=dict(color=colour, dash=dash),
                                     hovertemplate=f"{treatment} n = %{{x}} ({kind})<br>top-1 %{{y:.3f}}<extra></extra>"))
    fig.update_layout(title="8 · Linear probes on baseA's layers beside the trained transfer AnB (target half B)",
                      xaxis=dict(title="n: layer of baseA (AnB: layers copied)", tickmode="array",
                                 tickvals=list(ticks), ticktext=[f"{n}<br>{name}" for n, name in ticks.items()]),
                      yaxis_title="top-1 on the target half", template="plotly_white", height=480)
    return fig


def _tau_text(tau: dict | None, estimator: str, treatment: str) -> str:
    cell = ((tau or {}).get("estimators", {}).get(estimator) or {}).get(treatment)
    if not cell or cell.get("tau") is None:
        return "τ n/a"
    return f"τ = {cell['tau']:+.2f} (p = {cell['p_value']:.2g}, {cell['points']} pts)"


def fig_estimators(diag: pd.DataFrame, tau: dict | None, rows: pd.DataFrame) -> go.Figure:
    """Each estimator from baseA's layer n (LEEP: its softmax) against the measured AnB and AnB+ top-1
    at n, one point per (split, training seed, target half, n), Kendall's tau in each panel's title."""
    estimators = [e for e in ESTIMATOR_TITLES if (diag["kind"] == e).any()]
    if not estimators:
        return _empty(go.Figure(), "no estimator rows yet (--diagnostics estimators)")
    treatments = ("AnB", "AnB+")
    titles = [f"{ESTIMATOR_TITLES[e]} vs {t}<br>{_tau_text(tau, e, t)}" for t in treatments for e in estimators]
    fig = make_subplots(rows=2, cols=len(estimators), subplot_titles=titles, vertical_spacing=0.2,
                        horizontal_spacing=0.06)
    shown = set()
    for r, treatment in enumerate(treatments, 1):
        measured = rows[rows["treatment"] == treatment][ESTIMATOR_UNIT + ["n", METRIC, "job_key"]]
        for c, estimator in enumerate(estimators, 1):
            pairs = estimator_pairs(measured, diag[diag["kind"] == estimator], estimator)
            for kind, part in pairs.groupby("split_kind"):
                fig.add_trace(go.Scatter(
                    x=part["value"], y=part[METRIC], mode="markers", name=f"{kind} split", legendgroup=kind,
                    showlegend=kind not in shown, marker=dict(color=KIND_COLOURS.get(kind, "#333"), size=9),
                    customdata=part[["job_key", "n"]].to_numpy(),
                    hovertemplate=f"{ESTIMATOR_TITLES[estimator]} %{{x:.3g}}<br>{treatment} n = %{{customdata[1]}}: "
                                  "top-1 %{y:.3f}<br>%{customdata[0]}<extra></extra>"), row=r, col=c)
                shown.add(kind)
            fig.update_xaxes(title_text=ESTIMATOR_TITLES[estimator].split(" (")[0], row=r, col=c)
        fig.update_yaxes(title_text=f"{treatment} top-1", row=r, col=1)
    fig.update_layout(title="9 · Could the transfer curve have been predicted without training it? (Kendall's τ "
                            "over n, splits, seeds)", template="plotly_white", height=720, margin=dict(t=130))
    fig.update_annotations(font_size=11)
    return fig


def diagnostic_figures(diag: pd.DataFrame, tau: dict | None, rows: pd.DataFrame) -> dict[str, go.Figure]:
    return dict(zip(DIAGNOSTIC_FILES, (fig_cka_layers(diag, bases_share_init(rows)), fig_cka_transfers(diag),
                                       fig_probe(diag, rows),
                                       fig_estimators(diag, tau, rows))))


def tau_table_html(tau: dict | None) -> str:
    """transferability.json as a small table: estimator x (AnB, AnB+) -> tau (p)."""
    estimators = (tau or {}).get("estimators") or {}
    if not estimators:
        return ""
    cells = []
    for estimator, by_treatment in estimators.items():
        tds = "".join(f"<td>{html.escape(_tau_text(tau, estimator, t))}</td>" for t in ("AnB", "AnB+"))
        cells.append(f"<tr><th>{html.escape(ESTIMATOR_TITLES.get(estimator, estimator))}</th>{tds}</tr>")
    return ('<table class="coverage" id="transferability"><tr><th>estimator</th><th>vs AnB</th><th>vs AnB+</th></tr>'
            + "".join(cells) + "</table>")


def rows_note(diag: pd.DataFrame) -> str:
    kinds = diag.groupby("kind").size()
    nan = int(diag["value"].isna().sum())
    return (", ".join(f"{n} {k}" for k, n in kinds.items()) + " measurements"
            + (f"; {nan} are NaN (a layer whose outputs are constant on these images, e.g. dead ReLUs: "
               "CKA is undefined there)" if nan else ""))


def diagnostics_html(figs: dict[str, go.Figure], diag: pd.DataFrame, tau: dict | None, div,
                     shared_init: bool = False) -> str:
    """The report's section: what was measured, the tau table, the four figures (`div(fig, id)` renders one)."""
    return f"""<section id="diagnostics"><h2>What is transferred (diagnostics)</h2>
<p class="notes">Measured in the same sweep, on the target half's images, from the trained nets' weights:
{html.escape(rows_note(diag))}. Linear CKA (Kornblith et al. 2019) with the minibatch estimator of Nguyen et
al. 2021 on flattened layer outputs; linear probes (logistic regression) on baseA's space-averaged layer
outputs; H-score, LogME and LEEP from baseA's layer n on half B, before any transfer trained; Kendall's τ
pairs each with the measured {METRIC} of AnB / AnB+ at the same n, split, seed and target half.</p>
{tau_table_html(tau)}
{f'<p class="notes" id="shared-init">{html.escape(SHARED_INIT)}.</p>' if shared_init else ""}
{"".join(div(fig, name) for name, fig in figs.items())}
</section>"""
