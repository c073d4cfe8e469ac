"""The report's figures, one function per figure, each returning a plotly `go.Figure`.

Every point is one network: hovering shows its job key and config, and its customdata[0] is the
job key, which the report's click handler uses to show that job's training curves (figure 5).
`paper` arguments take the paper's own networks as rows of the same table (`analysis.paper`), drawn
hidden behind a switch. Usage: `fig_similar(with_base(rows), paper=with_base(paper_rows()))`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.results import BASE_TREATMENTS, METRIC, REDUCED, layer_ticks, similar_rows, split_label
from analysis.stats import LAYER_RANGES, layer_effects, table1, table1_counts

STYLE = {  # treatment: colour, marker, x offset (the paper's Fig. 2 layout)
    "base": ("#222222", "circle-open", 0.0),
    "BnB": ("#1f3fbf", "circle", -0.25),
    "BnB+": ("#7f9fff", "circle-cross", -0.09),
    "AnB": ("#d62728", "diamond", 0.09),
    "AnB+": ("#ff8f8f", "diamond-cross", 0.27),
}
SERIES_RELATIVE = (  # figure 2: (label, treatment, split kinds, colour, marker, x offset)
    ("AnB, similar split", "AnB", ("similar",), "#d62728", "diamond", -0.15),
    ("AnB, dissimilar split", "AnB", ("dissimilar",), "#8c564b", "square", 0.0),
    ("random frozen", "random_frozen", ("similar", "dissimilar", "file", "whole"), "#7f7f7f", "x", 0.15),
)
FILE_SPLIT_COLOURS = ("#9467bd", "#17becf", "#bcbd22", "#e377c2", "#2ca02c")  # figure 2: AnB on each split file
EFFECT_COLOURS = {"co-adaptation loss": "#1f3fbf", "specificity loss": "#d62728", "fine-tuning boost": "#2ca02c"}
JITTER = 0.035  # half-width of the random x jitter, in layers


def layer_axis(rows: pd.DataFrame, paper: pd.DataFrame | None = None) -> dict:
    """The n axis, each tick named after its layer in the rows' architecture (n = 3: conv3); the paper's
    overlay adds its n, named only where it is the same architecture."""
    ticks = layer_ticks(rows)
    if paper is not None and len(paper):
        same = rows.empty or set(paper["arch"]) == set(rows["arch"])
        for n, name in layer_ticks(paper).items():
            ticks.setdefault(n, name if same else "")
    if not ticks:
        return dict(title="n: layers copied", tickmode="linear", dtick=1)
    ns = sorted(ticks)
    named = [n for n in ns if ticks[n]]
    span = "" if not named else f" ({ticks[named[0]]})" if len(named) == 1 else f" ({ticks[named[0]]}..{ticks[named[-1]]})"
    return dict(title=f"n: layers copied{span}", tickmode="array",
                tickvals=[0, *ns], ticktext=["0", *(f"{n}<br>{ticks[n]}" if ticks[n] else str(n) for n in ns)])


def describe_job(row: pd.Series) -> str:
    """The config of one job, for hover text."""
    direction = f"{row['source_half']}→{row['target_half']}" if row["source_half"] else f"on {row['target_half']}"
    label = split_label(row)
    split = f"split {label}" if label.startswith(row["split_kind"]) else f"split {label} ({row['split_kind']})"
    lines = [f"{row['treatment']} {direction}, n = {row['n']}, {split}, seed {row['seed']}",
             f"{row['dataset']} · {row['arch']} · recipe {row['recipe']}",
             f"top-1 best-10 {row[METRIC]:.4f}" + (f", final {row['top1_final']:.4f}"
                                                   if not math.isnan(row["top1_final"]) else "")]
    if not math.isnan(row.get("base_value", math.nan)):
        lines.append(f"base {row['base_value']:.4f} → relative {100 * row['rel']:+.2f} points")
    extra = [f"epochs {row['epochs']:.0f}" if not math.isnan(row["epochs"]) else "",
             f"frozen check {row['frozen_check']}" if row["frozen_check"] else ""]
    if any(extra):
        lines.append(", ".join(e for e in extra if e))
    return "<br>".join(lines)


def _customdata(frame: pd.DataFrame) -> np.ndarray:
    return np.array([[row["job_key"], describe_job(row)] for _, row in frame.iterrows()], dtype=object).reshape(-1, 2)


def _jittered(n: pd.Series, offset: float, rng: np.random.Generator) -> np.ndarray:
    return n.to_numpy(dtype=float) + offset + rng.uniform(-JITTER, JITTER, len(n))


def _points(frame, y, name, colour, symbol, offset, rng, group, visible=True, source="sweep") -> go.Scatter:
    return go.Scatter(
        x=_jittered(frame["n"], offset, rng), y=frame[y], mode="markers", name=name,
        legendgroup=group, visible=visible, meta=source,
        marker=dict(color=colour, symbol=symbol, size=10 if source == "sweep" else 9,
                    line=dict(width=1.5, color=colour if source == "sweep" else "#000000")),
        customdata=_customdata(frame),
        hovertemplate="<b>%{customdata[0]}</b><br>%{customdata[1]}<extra></extra>",
    )


def _mean_line(x, y, counts, name, colour, group, visible=True, source="sweep") -> go.Scatter:
    return go.Scatter(
        x=x, y=y, mode="lines", name=f"{name} mean", legendgroup=group, showlegend=False, visible=visible,
        meta=source, line=dict(color=colour, width=2, dash="solid" if source == "sweep" else "dot"),
        customdata=counts,
        hovertemplate=f"{name} mean, n = %{{x}}: %{{y:.4f}} (%{{customdata}} networks)<extra></extra>",
    )


def _overlay_switch(fig: go.Figure) -> None:
    """Buttons that show the sweep, the sweep with the paper's networks, or the paper's alone."""
    sources = [trace.meta for trace in fig.data]
    if "paper" not in sources:
        return
    views = (("this table", {"sweep"}), ("+ paper overlay", {"sweep", "paper"}), ("paper only", {"paper"}))
    fig.update_layout(updatemenus=[dict(
        type="buttons", direction="right", x=1.0, xanchor="right", y=1.02, yanchor="bottom", showactive=True,
        buttons=[dict(label=label, method="restyle", args=[{"visible": [s in shown for s in sources]}])
                 for label, shown in views])])


def _similar_traces(fig: go.Figure, rows: pd.DataFrame, source: str, rng: np.random.Generator) -> None:
    sim = similar_rows(rows)
    visible = source == "sweep"
    label = "" if source == "sweep" else "paper "
    bases = sim[sim["treatment"].isin(BASE_TREATMENTS)]
    colour, symbol, offset = STYLE["base"]
    if not bases.empty:
        fig.add_trace(_points(bases.assign(n=0), METRIC, f"{label}base (n = 0)", colour, symbol, offset, rng,
                              f"{source}-base", visible, source))
    for treatment in ("BnB", "BnB+", "AnB", "AnB+"):
        chosen = sim[sim["treatment"] == treatment]
        if chosen.empty:
            continue
        colour, symbol, offset = STYLE[treatment]
        group = f"{source}-{treatment}"
        fig.add_trace(_points(chosen, METRIC, f"{label}{treatment}", colour, symbol, offset, rng, group,
                              visible, source))
        means = chosen.groupby("n")[METRIC].agg(["mean", "size"])
        x, y, counts = list(means.index), list(means["mean"]), list(means["size"])
        if not bases.empty:
            x, y, counts = [0, *x], [bases[METRIC].mean(), *y], [len(bases), *counts]
        fig.add_trace(_mean_line(x, y, counts, f"{label}{treatment}", colour, group, visible, source))


def fig_similar(rows: pd.DataFrame, paper: pd.DataFrame | None = None) -> go.Figure:
    """Figure 1 (the paper's Fig. 2): every network of the similar split by n, with mean lines."""
    fig = go.Figure()
    rng = np.random.default_rng(0)
    _similar_traces(fig, rows, "sweep", rng)
    if paper is not None:
        _similar_traces(fig, paper, "paper", rng)
    if not fig.data:
        fig.add_annotation(text="no rows of the similar split yet", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    fig.update_layout(title="1 · Similar split: base, selffers (BnB, BnB+) and transfers (AnB, AnB+)",
                      xaxis=layer_axis(rows, paper), yaxis_title="top-1 on the target half (mean of 10 best evaluations)",
                      template="plotly_white", height=560, margin=dict(t=120), clickmode="event",
                      title_y=0.97)
    _overlay_switch(fig)
    return fig


def _relative_traces(fig: go.Figure, rows: pd.DataFrame, source: str, rng: np.random.Generator) -> None:
    visible = source == "sweep"
    label = "" if source == "sweep" else "paper "
    usable = rows[rows["rel"].notna()]
    files = [] if "split" not in usable else sorted(set(usable.loc[usable["split_kind"] == "file", "split"]))
    own = tuple((f"AnB, split {split}", "AnB", ("file",), FILE_SPLIT_COLOURS[i % len(FILE_SPLIT_COLOURS)],
                 "triangle-up", 0.07 + 0.15 * i, split) for i, split in enumerate(files))
    for name, treatment, kinds, colour, symbol, offset, *only_split in (*SERIES_RELATIVE, *own):
        chosen = usable[(usable["treatment"] == treatment) & usable["split_kind"].isin(kinds)]
        if only_split:                             # one series per split file the sweep was given
            chosen = chosen[chosen["split"] == only_split[0]]
        if chosen.empty:
            continue
        group = f"{source}-{name}"
        fig.add_trace(_points(chosen, "rel", f"{label}{name}", colour, symbol, offset, rng, group, visible, source))
        means = chosen.groupby("n")["rel"].agg(["mean", "size"])
        fig.add_trace(_mean_line([0, *means.index], [0.0, *means["mean"]], [0, *means["size"]],
                                 f"{label}{name}", colour, group, visible, source))


def fig_dissimilar(rows: pd.DataFrame, paper: pd.DataFrame | None = None) -> go.Figure:
    """Figure 2 (the paper's Fig. 3, top): AnB relative to its base on the similar and the dissimilar
    split, and random frozen layers relative to their own base, per n."""
    fig = go.Figure()
    rng = np.random.default_rng(1)
    _relative_traces(fig, rows, "sweep", rng)
    if paper is not None:
        _relative_traces(fig, paper, "paper", rng)
    if not fig.data:
        fig.add_annotation(text="no transfer or random_frozen rows with their base yet", showarrow=False,
                           x=0.5, y=0.5, xref="paper", yref="paper")
    fig.add_hline(y=0, line=dict(color="#999999", width=1, dash="dash"))
    fig.update_layout(title="2 · Transfer vs its base: similar and dissimilar split, random frozen layers",
                      xaxis=layer_axis(rows, paper), yaxis_title="top-1 minus the base of its target half (0.01 = 1 point)",
                      template="plotly_white", height=560, margin=dict(t=120), clickmode="event",
                      title_y=0.97)
    _overlay_switch(fig)
    return fig


def _format_points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}"


def fig_table1(rows: pd.DataFrame, paper: pd.DataFrame | None = None) -> go.Figure:
    """Figure 3 (the paper's Table 1): AnB+ − base and AnB+ − BnB+ over layer ranges, pooled and paired."""
    sources = [("this table", rows)] + ([("paper data", paper)] if paper is not None else [])
    cells = [[] for _ in range(7)]
    for name, frame in sources:
        values, counts = table1(frame), table1_counts(frame)
        for label in LAYER_RANGES:
            c = counts[label]
            for column, cell in enumerate([
                    f"{name}: layers {label}",
                    _format_points(values["pooled"][label]["AnB+ - base"]),
                    _format_points(values["pooled"][label]["AnB+ - BnB+"]),
                    _format_points(values["paired"][label]["AnB+ - base"]),
                    _format_points(values["paired"][label]["AnB+ - BnB+"]),
                    f"{c['AnB+']} AnB+, {c['BnB+']} BnB+, {c['base']} bases",
                    f"{c['AnB+ paired']} AnB+, {c['BnB+ paired']} BnB+"]):
                cells[column].append(cell)
    header = ["layers", "pooled: AnB+ − base", "pooled: AnB+ − BnB+", "paired: AnB+ − base",
              "paired: AnB+ − BnB+", "networks (pooled)", "networks (paired)"]
    fig = go.Figure(go.Table(
        header=dict(values=[f"<b>{h}</b>" for h in header], fill_color="#e8e8f0", align="left"),
        cells=dict(values=cells, align="left", height=26),
        columnwidth=[1.6, 1, 1, 1, 1, 1.6, 1.4]))
    fig.update_layout(
        title="3 · Table 1: fine-tuned transfer boost in top-1 points, similar split<br><sup>pooled = mean "
              "of the networks − mean of the bases (as the paper did); paired = each network − its own base</sup>",
        height=150 + 30 * len(cells[0]), margin=dict(t=75, b=10), template="plotly_white")
    return fig


def fig_layer_effects(rows: pd.DataFrame, n_boot: int = 2000, confidence: float = 0.95) -> go.Figure:
    """Figure 4: per layer, co-adaptation loss, specificity loss and fine-tuning boost (similar
    split, paired with each network's base), with bootstrap intervals over (split, seed) units."""
    effects = layer_effects(rows, n_boot=n_boot, confidence=confidence)
    fig = go.Figure()
    for i, (effect, chosen) in enumerate(effects.groupby("effect", sort=False)):
        has_interval = chosen["low"].notna()
        fig.add_trace(go.Scatter(
            x=chosen["n"] + (i - 1) * 0.18, y=chosen["estimate"], mode="markers+text+lines",
            name=f"{effect} ({chosen['label'].iloc[0]})", line=dict(color=EFFECT_COLOURS[effect], width=1),
            marker=dict(color=EFFECT_COLOURS[effect], size=9),
            text=[f"N={k}" for k in chosen["networks"]], textposition="top center", textfont=dict(size=9),
            error_y=dict(type="data", symmetric=False,
                         array=(chosen["high"] - chosen["estimate"]).where(has_interval, 0),
                         arrayminus=(chosen["estimate"] - chosen["low"]).where(has_interval, 0)),
            customdata=np.stack([chosen["low"], chosen["high"], chosen["networks"], chosen["units"]], axis=1),
            hovertemplate=(f"<b>{effect}</b>, n = %{{x:.0f}}<br>estimate %{{y:.4f}}<br>"
                           f"{100 * confidence:.0f}% CI [%{{customdata[0]:.4f}}, %{{customdata[1]:.4f}}]<br>"
                           "%{customdata[2]} networks in %{customdata[3]} (split, seed) units<extra></extra>")))
    if effects.empty:
        fig.add_annotation(text="no BnB / AnB / AnB+ rows with their base on the similar split yet",
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.add_hline(y=0, line=dict(color="#999999", width=1, dash="dash"))
    fig.update_layout(
        title=f"4 · Per layer: what transfer loses and gains ({100 * confidence:.0f}% CI, t × bootstrap SE over "
              "(split, seed, target half) units; N = networks; no bar = one unit)",
        xaxis=layer_axis(rows), yaxis_title="top-1 difference (0.01 = 1 point)", template="plotly_white", height=520)
    return fig


def _curve_xy(job: pd.DataFrame) -> tuple[list, list]:
    clean = lambda s: [None if pd.isna(v) else float(v) for v in s]  # noqa: E731 (JSON has no NaN)
    epochs = clean(job["epoch"])
    return [epochs, epochs, epochs], [clean(job["val_top1"]), clean(job["val_top5"]), clean(job["train_loss"])]


def fig_curves(curves: pd.DataFrame, rows: pd.DataFrame) -> go.Figure:
    """Figure 5: the training curves of one job at a time (validation top-1/top-5, training loss),
    picked from a dropdown of every job (or by clicking its point in figures 1 and 2)."""
    described = rows.set_index("job_key")
    order = [key for key in rows["job_key"] if key in set(curves["job_key"])]
    by_job = {key: frame for key, frame in curves.groupby("job_key", sort=False)}
    fig = go.Figure()
    names = ("val top-1", "val top-5", "train loss")
    first_x, first_y = _curve_xy(by_job[order[0]]) if order else ([[], [], []], [[], [], []])
    for i, name in enumerate(names):
        fig.add_trace(go.Scatter(x=first_x[i], y=first_y[i], name=name, mode="lines+markers",
                                 marker=dict(size=4), yaxis="y2" if name == "train loss" else "y",
                                 line=dict(dash="dot" if name == "val top-5" else "solid")))
    buttons = []
    for key in order:
        x, y = _curve_xy(by_job[key])
        title = f"5 · Curves: {key}<br><sup>{describe_job(described.loc[key]).split('<br>')[0]}</sup>"
        buttons.append(dict(label=key, method="update", args=[{"x": x, "y": y}, {"title.text": title}]))
    title = buttons[0]["args"][1]["title.text"] if buttons else "5 · Curves: no per-epoch metrics (curves.csv) yet"
    fig.update_layout(
        title=title, template="plotly_white", height=480, margin=dict(t=120),
        xaxis_title="epoch", yaxis=dict(title="validation accuracy", rangemode="tozero"),
        yaxis2=dict(title="training loss", overlaying="y", side="right", rangemode="tozero", showgrid=False),
        legend=dict(orientation="h", y=-0.18),
        updatemenus=[dict(type="dropdown", buttons=buttons, active=0, x=0, xanchor="left", y=1.0,
                          yanchor="bottom", pad=dict(b=6))] if buttons else [])
    return fig


def fig_reduced(rows: pd.DataFrame, paper_curve: pd.DataFrame | None = None) -> go.Figure:
    """Figure 6: top-1 of the reduced-volume nets (all classes, the first k training images of each)
    against images per class on a log axis, beside the paper's own curve (its reduced-* runs)."""
    fig = go.Figure()
    reduced = rows[rows["treatment"] == REDUCED]
    if not reduced.empty:
        x = reduced["images_per_class"].where(reduced["images_per_class"].notna(), reduced["k"])
        reduced = reduced.assign(x=x.astype(float))
        fig.add_trace(go.Scatter(x=reduced["x"], y=reduced[METRIC], mode="markers", name="this table", meta="sweep",
                                 marker=dict(color="#1f3fbf", size=10), customdata=_customdata(reduced),
                                 hovertemplate="<b>%{customdata[0]}</b><br>%{customdata[1]}<br>"
                                               "%{x:.0f} images per class<extra></extra>"))
        means = reduced.groupby("x")[METRIC].agg(["mean", "size"])
        fig.add_trace(_mean_line(list(means.index), list(means["mean"]), list(means["size"]), "this table",
                                 "#1f3fbf", "sweep-reduced"))
    if paper_curve is not None and len(paper_curve):
        fig.add_trace(go.Scatter(x=paper_curve["images_per_class"], y=paper_curve["top1_best10"], mode="lines+markers",
                                 name="paper (reduced-k, 1000 classes)", meta="paper",
                                 line=dict(color="#000000", dash="dot"), marker=dict(symbol="circle-open", size=8),
                                 hovertemplate="paper, %{x} images per class: %{y:.4f}<extra></extra>"))
    if reduced.empty:
        fig.add_annotation(text="no reduced_k rows yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(title="Figure 6: top-1 against training images per class (all classes, reduced solver)",
                      xaxis=dict(title="training images per class", type="log"),
                      yaxis=dict(title=f"top-1 ({METRIC})", rangemode="tozero"), template="plotly_white")
    return fig
