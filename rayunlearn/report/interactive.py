"""Interactive figures of report.html: the Pareto front of every collection and the G-effect
curves, drawn in the browser by plotly.js, which the page embeds inline once (it opens with no
network). Hovering a trial shows its method string, hyper-parameters and metrics; clicking a
family in the legend hides or shows that family in every trace group at once.

The page also checks itself: a script in the head records every script error in the
``data-script-errors`` attribute of ``<html>`` (a JSON list, ``[]`` when none), and once a plot
is drawn its div gets ``data-marks``, the number of trial marks the browser drew (trial traces
carry ``meta.role == TRIAL_ROLE``), and ``<html>`` gets ``data-plots-rendered``, how many plots are
drawn so far. The browser test (tests/test_report_browser.py) reads these from the rendered DOM.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.colors import to_hex
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from rayunlearn import runs
from rayunlearn.io import dumps
from rayunlearn.report.analysis import front_of
from rayunlearn.report.data import Collection

TRIAL_ROLE = "trial"
PLOT_CLASS = "rayunlearn-plot"
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "triangle-down")   # one per collection
# trials.parquet columns shown on hover beside removal and retention, when a table has them
HOVER_COLUMNS = ("removal_report", "forget_quality", "model_utility", runs.FEASIBLE_COLUMN, runs.SEEDS_COLUMN,
                 runs.STOP_REASON_COLUMN, "time_s")

# Runs before plotly.js: an error anywhere on the page (a broken script, a failed render) is kept
# where a headless browser's DOM dump shows it.
ERROR_RECORDER = """<script>
(function () {
  var root = document.documentElement, errors = [];
  root.setAttribute('data-script-errors', '[]');
  function record(message) {
    errors.push(String(message));
    root.setAttribute('data-script-errors', JSON.stringify(errors));
  }
  window.addEventListener('error', function (e) { record(e.message || 'error loading ' + (e.target && e.target.tagName)); }, true);
  window.addEventListener('unhandledrejection', function (e) { record(e.reason); });
  window.rayunlearnRecordError = record;
})();
</script>"""

RENDERER = """<script>
(function () {
  var root = document.documentElement, rendered = 0;
  document.querySelectorAll('div.%(cls)s').forEach(function (div) {
    var spec = JSON.parse(document.getElementById(div.id + '-spec').textContent);
    Plotly.newPlot(div, spec.data, spec.layout, {responsive: true, displaylogo: false}).then(function (gd) {
      var marks = 0;
      gd._fullData.forEach(function (t) {
        if (t.visible === true && t.meta && t.meta.role === '%(role)s') {
          marks += gd.querySelectorAll('g.trace' + t.uid + ' path.point').length;
        }
      });
      div.setAttribute('data-marks', String(marks));
      rendered += 1;
      root.setAttribute('data-plots-rendered', String(rendered));
    }).catch(window.rayunlearnRecordError);
  });
})();
</script>""" % {"cls": PLOT_CLASS, "role": TRIAL_ROLE}


# ------------------------------------------------------------------------------ page pieces
def head_scripts() -> str:
    """The error recorder and plotly.js, inline: once per page, in its head."""
    return ERROR_RECORDER + "\n<script>" + get_plotlyjs() + "</script>"


def plot_html(fig: go.Figure, plot_id: str, kind: str, name: str) -> str:
    """A plot's div and its figure as JSON (drawn by the RENDERER script at the end of the page).
    ``kind`` ("pareto", "curves") and ``name`` (the collection, or "all") label the div for tests."""
    spec = dumps(fig.to_plotly_json()).replace("</", "<\\/")   # no "</script>" inside the JSON
    return (f"<div class='{PLOT_CLASS}' id='{plot_id}' data-kind='{kind}' data-name='{html.escape(name)}' "
            f"style='width:100%;height:{fig.layout.height or 560}px'></div>\n"
            f"<script type='application/json' id='{plot_id}-spec'>{spec}</script>")


# ------------------------------------------------------------------------------ figures
def _num(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}" if math.isfinite(v) else "–"
    return str(v)


def _missing(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _hover(r: pd.Series, cname: str, hp_columns: list[str], on_front: bool) -> str:
    """Method string, trial, hyper-parameters and metrics of one trial (plotly hover HTML)."""
    def pm(col):
        sd = r.get(col + runs.SD_SUFFIX)
        return _num(r[col]) + ("" if _missing(sd) else f" ± {_num(sd)}")

    lines = [f"<b>{html.escape(str(r['method']))}</b>",
             html.escape(f"{cname}/{r['trial_id']} · {r['family']}" + (" · Pareto front" if on_front else ""))]
    hps = [f"{c[len(runs.HP_PREFIX):]} = {_num(r[c])}" for c in hp_columns if not _missing(r.get(c))]
    if hps:
        lines.append(html.escape(", ".join(hps)))
    lines += [f"removal = {pm('removal')}", f"retention = {pm('retention')}"]
    lines += [html.escape(f"{c} = {_num(r[c])}") for c in HOVER_COLUMNS if c in r.index and not _missing(r[c])]
    return "<br>".join(lines)


def _error(sub: pd.DataFrame, col: str) -> dict | None:
    sd = col + runs.SD_SUFFIX
    if sd not in sub.columns or sub[sd].isna().all():
        return None
    return {"type": "data", "array": sub[sd].to_numpy(float), "visible": True, "thickness": 1, "width": 3}


def noise_band(front: pd.DataFrame, noise: dict[str, float]) -> tuple[list[float], list[float]]:
    """The region within the noise floor of the front: the front (sorted by removal, so retention
    does not increase) widened by ± the half-widths in both objectives: a polygon from the first
    point's upper-left corner along the outer edge to the last point's lower-right corner and back
    along the inner edge."""
    f = front.sort_values(["removal", "retention"], ascending=[True, False])
    x, y = f["removal"].to_numpy(float), f["retention"].to_numpy(float)
    dx, dy = noise["removal"], noise["retention"]
    xs = [x[0] - dx, *(x + dx), x[-1] + dx, *(x - dx)[::-1], x[0] - dx]
    ys = [y[0] + dy, *(y + dy), y[-1] - dy, *(y - dy)[::-1], y[0] + dy]
    return xs, ys


def pareto_plot(collections: list[Collection], colors: dict, title: str) -> go.Figure:
    """Every completed trial of ``collections`` (one trace per collection and family, a marker
    shape per collection, a colour per family, error bars from the ``*_sd`` columns), the front
    over them all, the noise band around it (the collections' noise floor, runs.noise_path), each sweep's retention floor and the
    reference models."""
    fig = go.Figure()
    tagged = len(collections) > 1
    pts = []
    for c in collections:
        t = c.completed.copy()
        t["_collection"], t["_key"] = c.name, c.name + "/" + t["trial_id"]
        pts.append(t)
    allp = pd.concat(pts, ignore_index=True)
    front = front_of(allp)
    front_keys = set(front["_key"])
    n_traces = 0
    for i, c in enumerate(collections):
        for fam, sub in allp[allp["_collection"] == c.name].groupby("family", sort=True):
            fam = str(fam)
            fig.add_trace(go.Scatter(
                x=sub["removal"], y=sub["retention"], mode="markers", name=f"{fam} ({c.name})" if tagged else fam,
                legendgroup=fam, uid=f"trial{n_traces}", meta={"role": TRIAL_ROLE},
                marker={"color": to_hex(colors.get(fam, "k")), "size": 9, "symbol": SYMBOLS[i % len(SYMBOLS)],
                        "opacity": 0.85},
                error_x=_error(sub, "removal"), error_y=_error(sub, "retention"),
                hovertext=[_hover(r, c.name, c.hp_columns, r["_key"] in front_keys) for _, r in sub.iterrows()],
                hovertemplate="%{hovertext}<extra></extra>"))
            n_traces += 1
    f = front.sort_values(["removal", "retention"], ascending=[True, False])
    fig.add_trace(go.Scatter(x=f["removal"], y=f["retention"], mode="lines+markers", name="Pareto front",
                             line={"color": "black", "width": 1}, hoverinfo="skip",
                             marker={"symbol": "circle-open", "size": 15, "color": "black"}))
    noise = next(({k: float(c.noise[k]) for k in ("removal", "retention")} for c in collections
                  if c.noise is not None), None)
    if noise is not None and not f.empty:
        xs, ys = noise_band(f, noise)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", fill="toself", fillcolor="rgba(120,120,120,0.18)",
                                 line={"width": 0}, hoverinfo="skip",
                                 name=f"noise band (± {noise['removal']:.3g} removal, ± {noise['retention']:.3g} "
                                      "retention)"))
    x_range = [float(allp["removal"].min()), float(allp["removal"].max())]
    # collections under one results root share its reference models: one mark per distinct model
    refs: dict[tuple, list[str]] = {}
    for c in collections:
        for which, r in c.reference.items():
            refs.setdefault((which, float(r["removal"]), float(r["retention"])), []).append(c.name)
    for (which, x, y), names in refs.items():
        x_range = [min(x_range[0], x), max(x_range[1], x)]
        fig.add_trace(go.Scatter(
            x=[x], y=[y], mode="markers", legendgroup="references", name=f"{which} model",
            marker={"symbol": "star" if which == "target" else "cross", "size": 16, "color": "gold",
                    "line": {"color": "black", "width": 1}},
            hovertemplate=html.escape(f"{which} model of {', '.join(names)}") + "<br>removal = %{x:.4g}"
                          "<br>retention = %{y:.4g}<extra></extra>"))
    for c in collections:
        frac = (c.space or {}).get("retention_floor")
        if frac is None:
            continue
        if "target" not in c.reference:   # the floor is a fraction of the target's retention
            fig.add_annotation(text=f"retention floor {frac:.3g} × target ({c.name}): not drawn, the target "
                                    "model was not evaluated", xref="paper", yref="paper", x=0, y=1.02,
                               showarrow=False, xanchor="left")
            continue
        level = frac * float(c.reference["target"]["retention"])
        fig.add_trace(go.Scatter(x=x_range, y=[level, level], mode="lines", line={"dash": "dash", "color": "#b22"},
                                 name=f"retention floor {frac:.3g} × target" + (f" ({c.name})" if tagged else ""),
                                 hovertemplate=f"retention floor = {level:.4g}<extra></extra>"))
    fig.update_layout(title=title, height=620, template="plotly_white", hovermode="closest",
                      xaxis_title="removal (higher = more forgotten)", yaxis_title="retention (higher = more kept)",
                      legend={"groupclick": "togglegroup"})
    return fig


def curves_plot(c: Collection, colors: dict, title: str) -> go.Figure | None:
    """Removal and retention G-effect per recorded step (effects/<trial>/steps.parquet), one line
    per completed trial that recorded them; None when no trial did."""
    rows = [(r, c.steps(r["trial_id"])) for _, r in c.completed.iterrows()]
    rows = [(r, s) for r, s in rows if s is not None]
    if not rows:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("removal G-effect e_u (want < 0)",
                                                        "retention G-effect e_r (want ≥ 0)"))
    shown = set()
    for r, s in sorted(rows, key=lambda rs: (str(rs[0]["family"]), rs[0]["trial_id"])):
        fam = str(r["family"])
        head = _hover(r, c.name, c.hp_columns, on_front=False)
        for col, risk in enumerate(("removal", "retention"), start=1):
            fig.add_trace(go.Scatter(
                x=s["step"], y=s[risk], mode="lines+markers", name=fam, legendgroup=fam,
                showlegend=fam not in shown, line={"color": to_hex(colors.get(fam, "k")), "width": 1.4},
                marker={"size": 4}, hovertext=[head] * len(s),
                hovertemplate=f"%{{hovertext}}<br>step %{{x}}: {risk} G-effect = %{{y:.4g}}<extra></extra>"),
                row=1, col=col)
            shown.add(fam)
    for col in (1, 2):
        fig.add_hline(y=0, line={"color": "black", "width": 0.8}, row=1, col=col)
        fig.update_xaxes(title_text="optimiser step", row=1, col=col)
    fig.update_layout(title=title, height=480, template="plotly_white", hovermode="closest",
                      legend={"groupclick": "togglegroup"})
    return fig
