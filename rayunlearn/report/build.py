"""Assemble the report: sections of blocks (headings, text, notes, figures, tables) rendered to
one self-contained ``report.html`` (PNGs embedded as base64; the Pareto fronts and G-effect curves
interactive, with plotly.js inline: report/interactive.py) and ``report.md`` (the PNGs); PNGs go to
``figures/`` and the machine-readable answers (Pareto fronts, verdicts) to ``summary.json``.
Reads results files only — no Ray, no model: a report can be rebuilt anywhere the files are.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from rayunlearn import runs
from rayunlearn.io import write_json, write_text
from rayunlearn.report import figures as F
from rayunlearn.report import interactive as I
from rayunlearn.report import robustness
from rayunlearn.report.analysis import (EFFECT_COLUMNS, GROUPS, MIN_IMPORTANCE_TRIALS, NPO_FAMILY, TABLE_COLUMNS,
                                        fidelity_stats, front_data, front_in_words, front_of, ga_effect_by_weight,
                                        group_effects, hp_importance, in_loop_trajectory, instance_effects,
                                        results_table, trial_label)
from rayunlearn.report.data import Collection, discover
from rayunlearn.report.findings import FAILED, HELD, check_claims

MAX_SERIES = 12      # lines per curve figure
MAX_TABLE_ROWS = 40  # results-table rows per collection before keeping only the front
SECTIONS = ("Overview", "Findings", "Pareto frontier", "Results table", robustness.SECTION, "G-effect curves",
            "Layer groups", "Per-instance G-effects", "GA PG-effect by NPO weight", "Trajectories",
            "First-order fidelity", "Hyper-parameter importance")


class Doc:
    """A list of blocks rendered to HTML and Markdown."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def note(self, text: str):
        self.blocks.append(("note", text))

    def img(self, path: Path | None, alt: str, missing: str = "nothing to draw (not recorded)"):
        if path is None:
            self.note(f"{alt}: {missing}.")
        else:
            self.blocks.append(("img", Path(path), alt))

    def plot(self, fig, png: Path, alt: str, kind: str, name: str):
        """An interactive figure (report.html) with its static PNG (report.md, and folded under
        the plot in report.html); ``kind`` and ``name`` label the plot for the browser test."""
        self.blocks.append(("plot", fig, Path(png), alt, kind, name))

    def table(self, df: pd.DataFrame):
        self.blocks.append(("table", df))

    def findings(self, items):
        self.blocks.append(("findings", items))


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, (list, tuple, np.ndarray)):
        return "/".join(fmt(x) for x in v) if len(v) else "–"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{v:.3g}" if (abs(v) >= 1e-3 or v == 0) else f"{v:.2e}"
    return str(v)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_") or "results"


def _anchor(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


# ------------------------------------------------------------------------------ rendering
def _how_judged(f) -> list[tuple[str, str]]:
    """A finding's quantity, runs, threshold, by-construction part and note, those that are set."""
    items = [("quantity", f.quantity), ("runs", ", ".join(map(str, f.runs))), ("threshold", f.threshold),
             ("by construction (not a finding)", f.by_construction), ("note", f.note)]
    return [(k, v) for k, v in items if v]


def _img_html(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def render_html(doc: Doc, title: str) -> str:
    interactive = any(b[0] == "plot" for b in doc.blocks)
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           I.head_scripts() if interactive else "",
           "<style>body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
           "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
           ".note{color:#666;font-style:italic}.HELD{background:#d8f5d8}.DID{background:#f8d7d7}"
           ".NOT{background:#eee}img{max-width:100%;border:1px solid #eee}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]} id='{_anchor(b[2])}'>{html.escape(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(b[1])}</p>")
        elif kind == "note":
            out.append(f"<p class='note'>{html.escape(b[1])}</p>")
        elif kind == "img":
            out.append(f"<figure>{_img_html(b[1], b[2])}<figcaption>{html.escape(b[2])}</figcaption></figure>")
        elif kind == "plot":
            fig, png, alt, plot_kind, name = b[1:]
            out.append(f"<figure>{I.plot_html(fig, f'plot-{len(out)}', plot_kind, name)}"
                       f"<figcaption>{html.escape(alt)}</figcaption>"
                       f"<details><summary>static image</summary>{_img_html(png, alt)}</details></figure>")
        elif kind == "table":
            df = b[1]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns) + "</tr>")
            for _, r in df.iterrows():
                out.append("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>")
            out.append("</table>")
        elif kind == "findings":
            out.append("<table><tr><th>claim</th><th>verdict</th><th>numbers</th><th>how judged</th></tr>")
            for f in b[1]:
                nums = "<br>".join(f"{html.escape(k)}: {html.escape(fmt(v))}" for k, v in f.numbers.items())
                judged = "<br>".join(f"<i>{k}</i>: {html.escape(v)}" for k, v in _how_judged(f))
                out.append(f"<tr><td>{f.claim}. {html.escape(f.title)}</td><td class='{f.verdict.split()[0]}'>"
                           f"<b>{f.verdict}</b></td><td style='text-align:left'>{nums}</td>"
                           f"<td style='text-align:left'>{judged}</td></tr>")
            out.append("</table>")
    out.append((I.RENDERER if interactive else "") + "</body></html>")
    return "\n".join(out)


def _md_cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def render_md(doc: Doc, title: str, fig_dir_rel: str) -> str:
    out = [f"# {title}", ""]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            out += ["#" * b[1] + " " + b[2], ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "note":
            out += [f"_{b[1]}_", ""]
        elif kind in ("img", "plot"):
            path, alt = (b[1], b[2]) if kind == "img" else (b[2], b[3])
            out += [f"![{alt}]({fig_dir_rel}/{path.name})", ""]
        elif kind == "table":
            df = b[1]
            out.append("| " + " | ".join(_md_cell(c) for c in df.columns) + " |")
            out.append("|" + "---|" * len(df.columns))
            for _, r in df.iterrows():
                out.append("| " + " | ".join(_md_cell(v) for v in r) + " |")
            out.append("")
        elif kind == "findings":
            for f in b[1]:
                out.append(f"- **Claim {f.claim} — {f.verdict}**: {f.title}.")
                out.append("  Numbers: " + "; ".join(f"{k} = {fmt(v)}" for k, v in f.numbers.items()))
                for k, v in _how_judged(f):
                    out.append(f"  {k.capitalize()}: {v}.")
            out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------ sections
def _series_trials(c: Collection, front_ids: set[str], has) -> tuple[list[pd.Series], str]:
    """Completed trials for which ``has(trial_id)``; at most MAX_SERIES (front first)."""
    rows = [r for _, r in c.completed.iterrows() if has(r["trial_id"])]
    note = ""
    if len(rows) > MAX_SERIES:
        rows.sort(key=lambda r: (r["trial_id"] not in front_ids, r["trial_id"]))
        note = f"{len(rows)} trials have this record; showing {MAX_SERIES} (Pareto-front trials first)."
        rows = rows[:MAX_SERIES]
    return rows, note


def _short(label: str, n: int = 38) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def build_report(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.html (self-contained), report.md, figures/*.png and summary.json for a
    results directory (one sub-results dir with trials.parquet, or a parent of several);
    returns the path of report.html. Default ``out_dir``: ``<results_dir>/report``."""
    root = Path(results_dir)
    collections = discover(root)
    out = Path(out_dir) if out_dir is not None else root / runs.REPORT_DIR
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()
    families = sorted({f for c in collections for f in c.trials["family"].astype(str)})
    colors = F.family_colors(families)
    doc = Doc()
    summary: dict = {"results_dir": str(root), "collections": [], "figures": []}
    fronts: dict[str, set[str]] = {}
    front_datas = {c.name: front_data(c) for c in collections}
    for c in collections:
        fronts[c.name] = {p["trial_id"] for p in front_datas[c.name]["points"] if p["on_front"]}

    def fig(path):
        if path is not None:
            summary["figures"].append(path.name)
        return path

    # Overview
    doc.h(2, "Overview")
    doc.p("Sign convention (docs/spec/GEFFECT.md): the G-effect is e = ∇R·∇L for a risk R and the objective L; one step "
          "changes R by about −lr·e. Removal wants e_u < 0 (forget risk rises); retention wants e_r ≥ 0 "
          "(a negative retention G-effect is collateral damage). Removal and retention scalars are both maximised.")
    for c in collections:
        n_stopped = int((c.trials["status"] == runs.STOPPED).sum())
        n_fail = len(c.trials) - len(c.completed) - n_stopped
        doc.p(f"{c.name}: {len(c.trials)} trials ({len(c.completed)} completed, {n_stopped} stopped early, "
              f"{n_fail} failed or unfinished), "
              f"families: {', '.join(sorted(c.trials['family'].astype(str).unique()))}; "
              f"references: {', '.join(sorted(c.reference)) or 'none'}.")
        failed = c.trials[~c.trials["trial_id"].isin(c.completed["trial_id"])]
        for _, r in failed.iterrows():
            err = r.get("error") if "error" in r.index else None
            why = r.get(runs.STOP_REASON_COLUMN) if runs.STOP_REASON_COLUMN in r.index else None
            doc.note(f"{c.name}/{r['trial_id']} ({r['method']}): status {r['status']}"
                     + (f", error: {err}" if isinstance(err, str) and err else "")
                     + (f", {why}" if isinstance(why, str) and why else ""))

    # Findings
    findings = check_claims(collections)
    doc.h(2, "Findings")
    held = [f.claim for f in findings if f.verdict == HELD]
    failed_claims = [f.claim for f in findings if f.verdict == FAILED]
    doc.p(f"The paper's claims (docs/spec/GEFFECT.md, claims 1–6) checked on these results: held {held or 'none'}; "
          f"did not hold {failed_claims or 'none'}; not testable "
          f"{[f.claim for f in findings if f.verdict not in (HELD, FAILED)] or 'none'}. As in the paper, G-effects "
          "are those of the unlearning objective alone (the forget terms' share) along unregularised runs; "
          "regularised runs are reported beside, and a part that holds by construction is not counted. "
          "Each claim states the quantity, the runs and the threshold it was judged on.")
    doc.findings(findings)
    summary["findings"] = [f.as_dict() for f in findings]

    # Pareto
    doc.h(2, "Pareto frontier")
    doc.p("Removal vs retention of every completed trial (both maximised). Joined: the non-dominated trials (no "
          "other trial is at least as good on both and better on one). Error bars: ± the standard deviation over "
          "a trial's seeds. Grey boxes: the noise band, ± the noise floor measured between retain models that "
          "differ only in their training seed; ringed and labelled: the front beyond the noise — trials no other "
          "trial beats by more than the band in one objective without being worse by more than it in the other "
          "(rayunlearn/pareto.py). Crosses: trials below the retention floor, left out of both fronts. Removal "
          "is the removal score on the forget authors the sweep selected on; the front's table also gives it on "
          "the held-out report authors — the honest number, and the gap between the two is the selection's "
          "optimism.")
    all_points = []
    for c in collections:
        fd = front_datas[c.name]
        pts = pd.DataFrame([{k: p[k] for k in ("trial_id", "family", "removal", "retention", "removal_sd",
                                               "retention_sd", "feasible")} | {"label": _short(p["label"], 60)}
                            for p in fd["points"]])
        doc.h(3, f"{c.name}")
        if pts.empty:
            doc.note(f"{c.name}: no completed trials.")
            continue
        noise_front = {p["trial_id"] for p in fd["points"] if p["on_noise_front"]}
        doc.plot(I.pareto_plot([c], colors, f"Pareto frontier — {c.name}"),
                 fig(F.pareto_figure(pts, fronts[c.name], colors, c.reference, f"Pareto frontier — {c.name}",
                                     fig_dir / f"{_slug(c.name)}_pareto.png", band=fd["band"], floor=fd["floor"],
                                     noise_front_ids=noise_front if fd["band"] else None)),
                 f"Pareto frontier of {c.name}", "pareto", c.name)
        words = front_in_words(fd)
        for sentence in words:
            doc.p(sentence)
        shown = [p for p in fd["points"] if p["on_front"] or p["on_noise_front"]]
        front_tbl = pd.DataFrame([{"trial_id": p["trial_id"], "method": _short(p["label"], 60),
                                   "removal (selection)": p["removal"], "± sd": p["removal_sd"],
                                   "removal (report)": p["removal_report"], "retention": p["retention"],
                                   "± sd ": p["retention_sd"], "seeds": p["n_seeds"],
                                   "front": "exact + noise" if p["on_front"] and p["on_noise_front"]
                                   else ("exact only" if p["on_front"] else "noise only")}
                                  for p in sorted(shown, key=lambda p: p["removal"])])
        doc.table(front_tbl)
        agree = None
        if c.pareto_file is not None and c.pareto_file.get("trials"):
            agree = set(map(str, c.pareto_file["trials"])) == fronts[c.name]
            if not agree:
                doc.note(f"pareto.json lists {sorted(map(str, c.pareto_file['trials']))}, which differs from the "
                         f"front recomputed here from trials.parquet.")
        summary["collections"].append({"name": c.name, "path": str(c.path), "trials": len(c.trials),
                                       "completed": len(c.completed), "pareto": sorted(fronts[c.name]),
                                       "noise_pareto": sorted(noise_front), "band": fd["band"],
                                       "floor": fd["floor"], "front_in_words": words,
                                       "pareto_json_agrees": agree})
        p2 = pts.copy()
        p2["collection"] = c.name
        p2["trial_id"] = c.name + "/" + p2["trial_id"]
        all_points.append(p2)
    if len(all_points) > 1:
        allp = pd.concat(all_points, ignore_index=True)
        front_all = set(front_of(allp[allp["feasible"].map(lambda v: v is not False)])["trial_id"])
        summary["combined_pareto"] = sorted(front_all)
        ref = next((c.reference for c in collections if c.reference), {})
        doc.h(3, "all results together")
        doc.plot(I.pareto_plot([c for c in collections if not c.completed.empty], colors,
                               "Pareto frontier — all trials"),
                 fig(F.pareto_figure(allp, front_all, colors, ref, "Pareto frontier — all trials",
                                     fig_dir / "all_pareto.png")), "Pareto frontier over every collection",
                 "pareto", "all")

    # Results table
    doc.h(2, "Results table")
    doc.p("Per trial: forget quality (KS p-value against the retain model, with KS statistic and n), model utility "
          "and its nine parts (Ret = retain, RA = real authors, WF = world facts; prob / ROUGE-L recall / truth "
          "ratio), forget-set probability / ROUGE / truth ratio, extraction strength (ES), privleak, and the "
          "cumulative G-effects over recorded steps: Σlr·e (first-order risk change is its negative) and Σe.")
    for c in collections:
        doc.h(3, c.name)
        trials = c.completed
        if len(trials) > MAX_TABLE_ROWS:
            doc.note(f"{len(trials)} completed trials; showing the {len(fronts[c.name])} on the Pareto front.")
            trials = trials[trials["trial_id"].isin(fronts[c.name])]
        tbl = results_table(c, trials)
        if tbl.empty:
            doc.note("no completed trials and no references.")
            continue
        cols = ["method"] + [k for k, _, _ in TABLE_COLUMNS] + [k for k, _ in EFFECT_COLUMNS]
        cols = [k for k in cols if k in tbl.columns]
        heads = {k: h for k, _, h in TABLE_COLUMNS} | dict(EFFECT_COLUMNS)
        doc.table(tbl[cols].rename(columns=heads))
        if not any(c.steps(t) is not None for t in trials["trial_id"]):
            doc.note("cumulative G-effects: not recorded (no effects/<trial>/steps.parquet).")

    # Robustness: the eval.attacks (rayunlearn/report/robustness.py)
    robustness.add_section(doc, collections, colors, fig_dir, fig, _slug, summary)

    def per_trial_series(title, intro, load, draw, name, stem, caption, missing, interactive=None):
        """One section: per collection, a figure of `load(c, trial)` for the trials that have it
        (and, in report.html, `interactive(c, colors, title)`'s plot of every such trial)."""
        doc.h(2, title)
        doc.p(intro)
        for c in collections:
            doc.h(3, c.name)
            rows, note = _series_trials(c, fronts[c.name], lambda t: load(c, t) is not None)
            if note:
                doc.note(note)
            series = {_short(trial_label(r, c.hp_columns)): (load(c, r["trial_id"]), str(r["family"])) for r in rows}
            png = fig(draw(series, colors, f"{name} — {c.name}", fig_dir / f"{_slug(c.name)}_{stem}.png"))
            if interactive is not None and png is not None:
                doc.plot(interactive(c, colors, f"{name} — {c.name}"), png, f"{caption} of {c.name}", stem, c.name)
            else:
                doc.img(png, f"{caption} of {c.name}", missing)

    # G-effect curves
    per_trial_series("G-effect curves",
                     "Removal and retention G-effects per recorded step (exact totals from steps.parquet). "
                     "Zero line drawn; removal wants e_u < 0, retention wants e_r ≥ 0.",
                     lambda c, t: c.steps(t), F.curves_figure, "G-effects per step", "geffect_curves", "G-effect curves",
                     "not recorded (no steps.parquet)", I.curves_plot)

    # Layer groups
    doc.h(2, "Layer groups")
    doc.p("G-effect per layer group (embed / shallow / middle / deep blocks = thirds / lm head, and norms), the sum "
          "of the per-parameter rows of geffects.parquet; and each group's share of Σ|e|.")
    for c in collections:
        doc.h(3, c.name)
        rows, note = _series_trials(c, fronts[c.name], lambda t: group_effects(c.geffects(t)) is not None)
        if note:
            doc.note(note)
        groups = {_short(trial_label(r, c.hp_columns), 30): group_effects(c.geffects(r["trial_id"])) for r in rows}
        for risk in ("removal", "retention"):
            doc.img(fig(F.groups_figure(groups, risk, f"{risk} G-effect per layer group — {c.name}",
                                        fig_dir / f"{_slug(c.name)}_groups_{risk}.png")),
                    f"{risk} G-effect per layer group, {c.name}", "not recorded (no per-parameter rows)")
        if groups:
            shares = {}
            for lab, ge in groups.items():
                a = ge.assign(a=ge["value"].abs()).groupby("group")["a"].sum()
                shares[lab] = a / a.sum() if a.sum() else a
            sh = pd.DataFrame(shares).T.reindex(columns=[g for g in GROUPS]).fillna(0.0)
            doc.img(fig(F.shares_figure(sh, f"share of |G-effect| per layer group — {c.name}",
                                        fig_dir / f"{_slug(c.name)}_group_shares.png")),
                    f"layer-group shares, {c.name}")

    # Instances
    doc.h(2, "Per-instance G-effects")
    doc.p("PG-effects: the removal vs retention G-effect of each forget instance at each recorded step "
          "(rows of kind 'instance'), coloured by the objective's weight for that instance when recorded, else by step.")
    for c in collections:
        doc.h(3, c.name)
        rows, note = _series_trials(c, fronts[c.name], lambda t: instance_effects(c.geffects(t)) is not None)
        if note:
            doc.note(note)
        inst = {_short(trial_label(r, c.hp_columns), 34): instance_effects(c.geffects(r["trial_id"])) for r in rows}
        doc.img(fig(F.instances_figure(inst, f"per-instance G-effects — {c.name}",
                                       fig_dir / f"{_slug(c.name)}_instances.png")),
                f"per-instance G-effects, {c.name}", "not recorded (no instance rows)")

    def npo_ga_by_weight(c, t):
        """Fig. 5(b)'s table of trial `t`, restricted to NPO-family weights (None without any)."""
        binned = ga_effect_by_weight(c.geffects(t))
        if binned is None:
            return None
        binned = binned[binned["term"].map(lambda term: bool(NPO_FAMILY.match(term)))]
        return binned if not binned.empty else None

    per_trial_series("GA PG-effect by NPO weight",
                     "The paper's Fig. 5(b): each forget instance's unweighted GA PG-effect ∇R·∇log π(y_i|x_i) "
                     "(rows of kind 'instance_ga_unweighted') against the weight the NPO-family objective gives "
                     "that instance at the same step (NPO's 2σ(β·log π/π_ref), TNPO/WTNPO's token weights "
                     "averaged; rows of kind 'instance_weight'), pooled over the recorded steps in equal-width "
                     "weight bins: the mean ± one standard error per bin. A weighting that works gives small "
                     "weights to the instances whose GA PG-effect is large (already-unlearned or harmful data).",
                     npo_ga_by_weight, F.ga_effect_by_weight_figure, "GA PG-effect by NPO weight",
                     "ga_by_weight", "GA PG-effect by NPO weight",
                     "not recorded (no NPO-family trial with instance_weight and instance_ga_unweighted rows)")

    # Trajectories
    per_trial_series("Trajectories",
                     "Forget quality and model utility evaluated every k steps during unlearning (trajectory.jsonl). "
                     "The utility line is the harmonic mean of the six non-ROUGE terms at every evaluation "
                     "(the in-loop evaluations generate nothing); the stars are the final evaluation's nine-term "
                     "model utility (with ROUGE), a separate series. Runs that evaluated only at the end "
                     "(unlearn.eval.every = 0, as the demo's study does) have no curve here; their final "
                     "numbers are in the tables.",
                     lambda c, t: in_loop_trajectory(c.trajectory(t)), F.trajectories_figure, "trajectories",
                     "trajectories", "trajectories",
                     "not recorded (no in-loop evaluations: unlearn.eval.every = 0 or no trajectory.jsonl)")

    # Fidelity
    per_trial_series("First-order fidelity",
                     "Predicted against measured probe-risk change over each recorded step. The prediction is "
                     "the realised-update G-effect, −∇R·(θ_t − θ_{t+1}) = −lr·e_real, exact to first order for "
                     "any optimiser (AdamW's momentum, preconditioning, weight decay, clipping); points on "
                     "y = x mean the linearisation behind the G-effect holds.",
                     lambda c, t: c.steps(t), F.fidelity_figure, "first-order fidelity", "fidelity", "first-order fidelity",
                     "not recorded (no predicted/measured columns in steps.parquet)")
    doc.p("How close, per trial: the median of measured / predicted change (1 = exact) and the fraction of "
          "recorded steps where both have the same sign, for the realised-update prediction and, beside it, "
          "the plain-gradient prediction −lr·∇R·∇L (what the G-effect alone predicts under SGD).")
    summary["fidelity"] = {}
    for c in collections:
        rows = []
        for _, r in c.completed.iterrows():
            steps = c.steps(r["trial_id"])
            real, sgd = fidelity_stats(steps, "realised"), fidelity_stats(steps, "sgd")
            if real is None:
                continue
            row = {"method": _short(trial_label(r, c.hp_columns), 40)}
            for risk in ("removal", "retention"):
                row[f"{risk} ratio"] = fmt(real[risk]["median_ratio"])
                row[f"{risk} sign"] = fmt(real[risk]["sign_agreement"])
                if sgd is not None:
                    row[f"{risk} ratio (−lr·e)"] = fmt(sgd[risk]["median_ratio"])
            row["steps"] = real["removal"]["n"]
            rows.append(row)
            summary["fidelity"][str(r["trial_id"])] = {"realised": real, "sgd": sgd}
        if rows:
            doc.h(3, f"{c.name}: how close")
            doc.table(pd.DataFrame(rows))

    # Importance
    doc.h(2, "Hyper-parameter importance")
    doc.p(f"For each family of a sweep with ≥ {MIN_IMPORTANCE_TRIALS} completed trials (configurations; a trial's "
          "seeds count once): Optuna's importance evaluator on an in-memory study rebuilt from trials.parquet "
          "(hp.* columns as parameters, removal and retention — the seed means — as objectives). With fewer, an "
          "importance ranks noise, so the family is skipped and said so.")
    summary["importance"] = {}
    for c in collections:
        doc.h(3, c.name)
        if not c.hp_columns:
            doc.note("no hp.* columns (not a sweep): skipped.")
            continue
        imps, rows = {}, []
        for fam, t in c.completed.groupby("family"):
            res = hp_importance(t, c.hp_columns)
            if isinstance(res, str):
                doc.note(f"{fam}: skipped — {res}.")
                continue
            imps[str(fam)] = res
            for obj in ("removal", "retention"):
                for k, v in res[1][obj].items():
                    rows.append({"family": fam, "objective": obj, "parameter": k, "importance": v,
                                 "evaluator": res[0]})
        summary["importance"][c.name] = {f: v[1] for f, v in imps.items()}
        if imps:
            doc.img(fig(F.importance_figure(imps, f"hyper-parameter importance — {c.name}",
                                            fig_dir / f"{_slug(c.name)}_importance.png")),
                    f"hyper-parameter importance, {c.name}")
            doc.table(pd.DataFrame(rows))

    title = f"rayunlearn report — {root}"
    write_text(out / "report.html", render_html(doc, title))
    write_text(out / "report.md", render_md(doc, title, "figures"))
    write_json(out / runs.REPORT_SUMMARY_FILE, summary)
    return out / "report.html"


def report_command(results_dir: str, summary_md: str | None = None, command: str = "",
                   readme: str | None = None) -> int:
    """CLI entry: `rayunlearn report RESULTS_DIR [--summary-md PATH [--readme README.md]]`
    (``command``: the command line, recorded in the Markdown summary; ``readme``: a file whose
    generated-summary block is replaced by the new summary)."""
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(f"building the report of {results_dir}…"):
        path = build_report(results_dir)
    console.print(f"wrote {path} (and report.md, figures/, {runs.REPORT_SUMMARY_FILE} beside it)")
    if summary_md:
        from rayunlearn.report.summary import write_summary

        md = write_summary(results_dir, summary_md, command, path.parent / runs.REPORT_SUMMARY_FILE)
        console.print(f"wrote the Markdown summary {md}")
        if readme:
            from rayunlearn.report.summary import embed_in_readme

            console.print(f"quoted it in {embed_in_readme(readme, md, summary_md)}")
    return 0
