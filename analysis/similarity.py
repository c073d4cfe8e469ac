"""Graded task similarity: how fast transferability falls as the two tasks move apart, layer by layer.

Beyond the paper, which measured two points (random halves; man-made vs natural). A sweep over graded splits
(`sweeps/similarity_surface.py`, `--splits graded:1/6,...`) trains bases and frozen AnB at every n on halves
whose A takes a share p (`split_level`) of its classes from the other family: p = 0 is the dissimilar split,
p = 1/2 a random split balanced over the families. Here, from its rows:

- the surface: AnB minus its base over n x p, the mean over independent units (split x training seed x target
  half) with its t interval;
- per n, the slope of that difference against p (points of top-1 per unit of p) with its interval, from an
  ordinary least-squares fit over the units of every level;
- the reading: from which n up to the deepest layer every slope is resolved (transfer depends on similarity
  from that layer on), and
  whether the fall is gradual (every level's mean lies within its interval of the fitted line) or sudden;
- each transferability estimator (H-score, LogME, LEEP from the source base) against p, beside the measured
  drop, with Kendall's tau.

    summary = similarity_summary(with_base(rows), diag)      # {"surface": [...], "slopes": [...], ...}
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.findings import CONFIDENCE, interval, usable
from analysis.stats import t_quantile
from raytransfer.diagnostics import UNIT, estimator_pairs, kendall_tau

LEVEL = "split_level"
TREATMENT = "AnB"
ESTIMATORS = ("hscore", "logme", "leep")


def graded_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows on the graded axis: graded splits, and the dissimilar split as its level 0 (tables written before
    the sweep recorded `split_level` say nothing for it)."""
    if "split_level" not in rows.columns:
        return rows.iloc[0:0].assign(**{LEVEL: pd.Series(dtype=float)})
    level = pd.to_numeric(rows[LEVEL], errors="coerce")
    level = level.where(level.notna() | (rows["split_kind"] != "dissimilar"), 0.0)
    on_axis = level.notna() & rows["split_kind"].isin(["graded", "dissimilar"])
    return rows[on_axis].assign(**{LEVEL: level[on_axis]})


def has_graded_levels(rows: pd.DataFrame) -> bool:
    """A surface needs graded splits and at least two levels."""
    axis = graded_rows(rows)
    return bool((axis["split_kind"] == "graded").any()) and axis[LEVEL].nunique() >= 2


def unit_values(rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Per unit, level and n: AnB minus its base (mean over the unit's networks there, normally one); and how
    many networks were left out for a base that did not converge or whose convergence is unknown."""
    nets, left_out = usable(graded_rows(rows))
    anb = nets[nets["treatment"] == TREATMENT]
    if anb.empty:
        return pd.DataFrame(columns=list(UNIT) + [LEVEL, "n", "rel", "networks"]), int(left_out)
    grouped = anb.groupby(list(UNIT) + [LEVEL, "n"])
    values = grouped["rel"].mean().rename("rel").to_frame().join(grouped.size().rename("networks")).reset_index()
    return values, int(left_out)


def surface(values: pd.DataFrame) -> pd.DataFrame:
    """level x n: mean AnB minus base over units, its interval, units and networks."""
    out = []
    for (level, n), part in values.groupby([LEVEL, "n"]):
        estimate, low, high = interval(part["rel"])
        out.append({"level": float(level), "n": int(n), "estimate": estimate, "low": low, "high": high,
                    "units": int(len(part)), "networks": int(part["networks"].sum())})
    return pd.DataFrame(out, columns=["level", "n", "estimate", "low", "high", "units", "networks"])


def slope(x, y) -> tuple[float, float, float, float]:
    """Least-squares slope of y on x with its t interval (NaN bounds from fewer than three points or one x),
    and the intercept."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan, math.nan
    b, a = np.polyfit(x, y, 1)
    if len(x) < 3:
        return float(b), math.nan, math.nan, float(a)
    residual = y - (a + b * x)
    se = math.sqrt(float(residual @ residual) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    half = t_quantile((1 + CONFIDENCE) / 2, len(x) - 2) * se
    return float(b), float(b - half), float(b + half), float(a)


def slopes(values: pd.DataFrame) -> pd.DataFrame:
    """Per n: the slope of AnB minus base against p over every unit of every level."""
    out = []
    for n, part in values.groupby("n"):
        b, low, high, a = slope(part[LEVEL], part["rel"])
        out.append({"n": int(n), "slope": b, "low": low, "high": high, "intercept": a, "units": int(len(part)),
                    "levels": int(part[LEVEL].nunique())})
    return pd.DataFrame(out, columns=["n", "slope", "low", "high", "intercept", "units", "levels"])


def reading(cells: pd.DataFrame, fits: pd.DataFrame) -> dict:
    """Where the dependence on similarity starts and whether the fall is gradual or sudden, in one sentence.

    Resolved: a slope whose interval excludes zero. Gradual at n: the fitted line passes through every level's
    interval; sudden: it misses a level, and the largest step between adjacent levels is named."""
    resolved = fits[(fits["low"] > 0) | (fits["high"] < 0)]
    if fits.empty:
        return {"onset_n": None, "shape": "not enough rows", "text": "not enough rows: no frozen AnB on two levels."}
    if resolved.empty:
        widest = fits.loc[fits["slope"].abs().idxmax()]
        return {"onset_n": None, "shape": "unresolved", "sudden_at": [],
                "text": (f"unresolved: at no n does the slope against p exclude zero (the steepest, n = "
                         f"{int(widest['n'])}: {_slope_text(widest)}); more training or split seeds narrow it.")}
    onset = _onset(fits)
    if onset is None:
        return {"onset_n": None, "shape": "unresolved", "sudden_at": [],
                "text": (f"unresolved: slopes are resolved at n = {', '.join(str(int(n)) for n in resolved['n'])} "
                         "but not at the deepest layer, so no run of layers up to the top depends on similarity.")}
    sudden = []
    for _, fit in resolved.iterrows():
        mine = cells[cells["n"] == fit["n"]].sort_values("level").reset_index(drop=True)
        line = fit["intercept"] + fit["slope"] * mine["level"]
        missed = mine[(line < mine["low"]) | (line > mine["high"])]
        if len(missed):
            at = int(mine["estimate"].diff().abs().iloc[1:].idxmax())
            sudden.append({"n": int(fit["n"]), "missed_levels": [float(v) for v in missed["level"]],
                           "largest_step": [float(mine.loc[at - 1, "level"]), float(mine.loc[at, "level"])],
                           "step": float(mine.loc[at, "estimate"] - mine.loc[at - 1, "estimate"])})
    shape = "sudden" if sudden else "gradual"
    layers = ", ".join(str(int(n)) for n in resolved["n"])
    text = (f"transferability depends on task similarity from n = {onset} (slopes resolved at n = {layers}; "
            f"at n = {onset}: {_slope_text(resolved[resolved['n'] == onset].iloc[0])}); ")
    if sudden:
        first = sudden[0]
        low, high = first["largest_step"]
        text += (f"the fall is sudden: at n = {first['n']} the straight line misses level(s) "
                 f"{', '.join(f'{v:.3g}' for v in first['missed_levels'])}, and the largest step, "
                 f"{100 * first['step']:+.1f} points, lies between p = {low:.3g} and p = {high:.3g}.")
    else:
        text += "the fall is gradual: at every resolved n the straight line passes through every level's interval."
    return {"onset_n": onset, "shape": shape, "sudden_at": sudden, "text": text}


def _onset(fits: pd.DataFrame) -> int | None:
    """The first n of the run of layers, up to the deepest, whose slopes are all resolved with one sign: where
    the dependence on similarity starts and stays. A lone resolved layer below an unresolved one does not count
    (seven intervals at 95 % give a false one now and then)."""
    ordered = fits.sort_values("n", ascending=False)
    sign = lambda f: 1 if f["low"] > 0 else (-1 if f["high"] < 0 else 0)
    deepest = sign(ordered.iloc[0])
    if deepest == 0:
        return None
    onset = None
    for _, fit in ordered.iterrows():
        if sign(fit) != deepest:
            break
        onset = int(fit["n"])
    return onset


def _slope_text(fit) -> str:
    bounds = ("no interval" if math.isnan(fit["low"]) else
              f"95 % interval {100 * fit['low']:+.1f} to {100 * fit['high']:+.1f}")
    return f"{100 * fit['slope']:+.1f} points of top-1 per unit of p ({bounds}; {int(fit['units'])} units)"


def estimators_against_level(rows: pd.DataFrame, diag: pd.DataFrame | None) -> dict:
    """Per estimator: its values by level (mean over units and n), Kendall's tau against p, and against the
    measured AnB minus base at the same unit and n (LEEP: one value per unit, beside every n)."""
    if diag is None or diag.empty:
        return {}
    levels = graded_rows(rows).drop_duplicates("split")[["split", LEVEL]]
    values, _ = unit_values(rows)
    out = {}
    for estimator in ESTIMATORS:
        mine = diag[diag["kind"] == estimator].merge(levels, on="split")
        if mine.empty:
            continue
        tau_level = kendall_tau(mine[LEVEL], mine["value"])
        pairs = estimator_pairs(values.drop(columns=[LEVEL]), mine, estimator)
        tau_drop = kendall_tau(pairs["value"], pairs["rel"])
        by_level = mine.groupby(LEVEL)["value"].mean()
        out[estimator] = {"by_level": {f"{k:.6g}": float(v) for k, v in by_level.items()},
                          "tau_with_level": _tau(tau_level), "tau_with_measured": _tau(tau_drop)}
    return out


def _tau(result) -> dict:
    tau, p, points = result
    return {"tau": None if math.isnan(tau) else tau, "p_value": None if math.isnan(p) else p, "points": points}


def similarity_summary(rows: pd.DataFrame, diag: pd.DataFrame | None = None) -> dict:
    """Everything the report shows about graded similarity, as plain data (similarity.json)."""
    values, left_out = unit_values(rows)
    cells, fits = surface(values), slopes(values)
    return {"treatment": TREATMENT, "confidence": CONFIDENCE, "left_out_for_their_base": left_out,
            "levels": sorted(float(v) for v in cells["level"].unique()), "networks": int(values["networks"].sum()),
            "surface": _records(cells), "slopes": _records(fits), "reading": reading(cells, fits),
            "estimators": estimators_against_level(rows, diag)}


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")]


# -- figures and the report's section -----------------------------------------------------------------

def fig_surface(summary: dict, layers: dict[int, str] | None = None):
    """10: AnB minus its base over n (x) and p (y), interval and counts on hover."""
    import plotly.graph_objects as go

    cells = pd.DataFrame(summary["surface"])
    fig = go.Figure()
    if cells.empty:
        return fig
    levels, ns = sorted(cells["level"].unique()), sorted(cells["n"].unique())
    grid = cells.set_index(["level", "n"])

    def at(level, n, column):
        return grid[column].get((level, n), math.nan)

    z = [[100 * at(p, n, "estimate") for n in ns] for p in levels]
    text = [[(f"{100 * at(p, n, 'estimate'):+.1f} points"
              + ("" if at(p, n, "low") != at(p, n, "low") else
                 f" [{100 * at(p, n, 'low'):+.1f}, {100 * at(p, n, 'high'):+.1f}]")
              + f"<br>{int(at(p, n, 'units'))} units, {int(at(p, n, 'networks'))} networks") if (p, n) in grid.index
             else "" for n in ns] for p in levels]
    bound = max(1.0, float(np.nanmax(np.abs(z))))
    fig.add_trace(go.Heatmap(x=[f"{n} {layers.get(n, '')}".strip() if layers else str(n) for n in ns],
                             y=[f"p = {p:.3g}" for p in levels], z=z, text=text, zmid=0, zmin=-bound, zmax=bound,
                             colorscale="RdBu", colorbar=dict(title="AnB − base<br>(points)"),
                             hovertemplate="n = %{x}, %{y}<br>%{text}<extra></extra>"))
    fig.update_layout(title="10 · Transferability over task similarity: frozen AnB minus its base, by layer n and "
                            "mixing level p (0: dissimilar, 1/2: balanced random)",
                      xaxis_title="layers copied and frozen (n)", yaxis_title="share of A's classes from the other "
                      "family (p)", template="plotly_white", height=420)
    return fig


def fig_slopes(summary: dict):
    """11: per n, the slope of AnB minus base against p, with its interval."""
    import plotly.graph_objects as go

    fits = pd.DataFrame(summary["slopes"])
    fig = go.Figure()
    if fits.empty:
        return fig
    fits = fits.fillna({"low": fits["slope"], "high": fits["slope"]})
    fig.add_trace(go.Scatter(
        x=fits["n"], y=100 * fits["slope"], mode="markers+lines", name="slope",
        error_y=dict(type="data", symmetric=False, array=100 * (fits["high"] - fits["slope"]),
                     arrayminus=100 * (fits["slope"] - fits["low"])),
        customdata=fits[["units", "levels"]].to_numpy(),
        hovertemplate="n = %{x}: %{y:+.1f} points per unit of p<br>%{customdata[0]} units over %{customdata[1]} "
                      "levels<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="#888", dash="dot"))
    fig.update_layout(title="11 · How fast transfer falls as the tasks move apart: slope of AnB − base against p "
                            "per layer (95 % interval; the reading is above the figures)",
                      xaxis_title="layers copied and frozen (n)", yaxis_title="points of top-1 per unit of p",
                      template="plotly_white", height=420)
    return fig


def fig_estimators_vs_level(summary: dict, values: pd.DataFrame | None = None):
    """12: each estimator's mean by level beside the measured drop's, Kendall's tau in the panel titles."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    estimators = summary["estimators"]
    cells = pd.DataFrame(summary["surface"])
    names = {"hscore": "H-score", "logme": "LogME", "leep": "LEEP"}
    titles = ["measured:<br>AnB − base (mean over n)"] + [
        f"{names[e]}<br>τ with p {_tau_short(v['tau_with_level'])}<br>τ with the drop {_tau_short(v['tau_with_measured'])}"
        for e, v in estimators.items()]
    fig = make_subplots(rows=1, cols=1 + len(estimators), subplot_titles=titles, horizontal_spacing=0.07)
    if not cells.empty:
        measured = cells.groupby("level")["estimate"].mean()
        fig.add_trace(go.Scatter(x=measured.index, y=100 * measured.values, mode="markers+lines", name="measured",
                                 hovertemplate="p = %{x:.3g}: %{y:+.1f} points<extra></extra>"), row=1, col=1)
    for col, (estimator, v) in enumerate(estimators.items(), 2):
        levels = [float(k) for k in v["by_level"]]
        fig.add_trace(go.Scatter(x=levels, y=list(v["by_level"].values()), mode="markers+lines", name=names[estimator],
                                 hovertemplate="p = %{x:.3g}: %{y:.4g}<extra></extra>"), row=1, col=col)
    fig.update_xaxes(title_text="p")
    fig.update_layout(title="12 · Do the transferability estimators see the similarity? (each from the source base, "
                            "before any transfer trained)", template="plotly_white", height=440, margin=dict(t=140),
                      showlegend=False)
    fig.update_annotations(font_size=11)
    return fig


def _tau_short(tau: dict) -> str:
    return "n/a" if tau["tau"] is None else f"{tau['tau']:+.2f} (p = {tau['p_value']:.2g}, {tau['points']} pts)"


SIMILARITY_FILES = ("sim1_surface", "sim2_slopes", "sim3_estimators")


def similarity_figures(summary: dict, layers: dict[int, str] | None = None) -> dict:
    figs = {"sim1_surface": fig_surface(summary, layers), "sim2_slopes": fig_slopes(summary)}
    if summary["estimators"]:
        figs["sim3_estimators"] = fig_estimators_vs_level(summary)
    return figs


def similarity_html(figs: dict, summary: dict, div) -> str:
    """The report's section: what was measured, the reading in one sentence, the figures."""
    import html

    levels = ", ".join(f"{p:.3g}" for p in summary["levels"])
    left = summary["left_out_for_their_base"]
    return f"""<section id="similarity"><h2>Transferability over graded task similarity</h2>
<p class="notes">Beyond the paper: frozen AnB at every n on splits whose half A takes a share p of its classes from
the other family (p = {levels}; p = 0 is the dissimilar split). {summary['networks']} networks; each point is the
mean over independent units of split × training seed × target half, with its 95 % t interval; slopes are
least-squares fits over every unit of every level.{f' {left} networks left out: their base did not converge or does not say.' if left else ''}</p>
<p class="science" id="similarity-reading"><b>{html.escape(summary['reading']['shape'])}</b>:
{html.escape(summary['reading']['text'])}</p>
{"".join(div(fig, name) for name, fig in figs.items())}
</section>"""
