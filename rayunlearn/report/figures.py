"""Matplotlib figures (Agg backend) of the report. Every function draws from DataFrames the
report already loaded, writes one PNG and returns its path (or None when nothing to draw).

Sign convention in every axis label: removal G-effect e_u (want < 0), retention G-effect
e_r (want ≥ 0); the first-order risk change of a step is -lr·e.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rayunlearn.io import atomic_path  # noqa: E402
from rayunlearn.report.findings import PAPER_FAMILIES  # noqa: E402

REMOVAL_LABEL = "removal G-effect e_u (want < 0)"
RETENTION_LABEL = "retention G-effect e_r (want ≥ 0)"
GROUP_COLORS = {"embed": "#7f7f7f", "shallow": "#1f77b4", "middle": "#2ca02c", "deep": "#d62728",
                "lm": "#9467bd", "norm": "#bcbd22"}
DPI = 110


def family_colors(families) -> dict[str, tuple]:
    """A fixed colour per family: the paper's ten methods first (tab10), then the rest (tab20)."""
    rest = sorted(set(families) - set(PAPER_FAMILIES))
    tab10, tab20 = plt.get_cmap("tab10"), plt.get_cmap("tab20")
    colors = {f: tab10(i) for i, f in enumerate(PAPER_FAMILIES)}
    for i, f in enumerate(rest):
        colors[f] = tab20((2 * i + 1) % 20)
    return colors


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, ncols: int = 5, w: float = 3.2, h: float = 2.6):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def pareto_figure(points: pd.DataFrame, front_ids: set[str], colors: dict, reference: dict[str, dict],
                  title: str, path: Path, *, band: dict | None = None, floor: dict | None = None,
                  noise_front_ids: set[str] | None = None) -> Path:
    """Removal vs retention of every trial, the non-dominated ones joined (``front_ids``).
    ``points``: trial_id, family, label, removal, retention (optional: ``collection``; the seeds'
    ``removal_sd`` / ``retention_sd``, drawn as error bars; ``feasible``, False drawn as a cross).
    ``band``: the noise half-widths {"removal", "retention", "replicates"}, drawn as a box of ±h
    around every point of the noise-aware front (``noise_front_ids``, ringed and numbered, the
    numbers' labels listed beside the axes; the exact front when None); ``floor``:
    {"retention": threshold} drawn as a dotted line."""
    fig, ax = plt.subplots(figsize=(9.5, 6.5))
    markers = {}
    if "collection" in points.columns:
        for i, cname in enumerate(sorted(points["collection"].unique())):
            markers[cname] = "osD^v"[i % 5]
    infeasible = points["feasible"].map(lambda v: v is False or v is np.False_) if "feasible" in points.columns \
        else pd.Series(False, index=points.index)
    for fam, grp in points.groupby("family", sort=False):
        for cname, sub in (grp.groupby("collection") if markers else [(None, grp)]):
            ok = sub[~infeasible.loc[sub.index]]
            ax.scatter(ok["removal"], ok["retention"], s=36, color=colors.get(fam, "k"), alpha=0.75,
                       marker=markers.get(cname, "o"), label=fam if cname is None else f"{fam} ({cname})",
                       edgecolors="none", zorder=2)
            if "removal_sd" in sub.columns:
                ax.errorbar(sub["removal"], sub["retention"], xerr=sub["removal_sd"].fillna(0.0),
                            yerr=sub["retention_sd"].fillna(0.0), fmt="none", ecolor=colors.get(fam, "k"),
                            elinewidth=0.9, capsize=2.5, alpha=0.6, zorder=1)
    bad = points[infeasible]
    if not bad.empty:
        ax.scatter(bad["removal"], bad["retention"], s=46, marker="x", color="0.35", lw=1.4, zorder=2,
                   label="below the retention floor")
    if floor is not None and np.isfinite(floor.get("retention", np.nan)):
        ax.axhline(floor["retention"], color="0.35", ls=":", lw=1.2, zorder=0,
                   label=f"retention floor ({floor['fraction']:g} × target)")
    front = points[points["trial_id"].isin(front_ids)].sort_values("removal")
    if not front.empty:
        ax.plot(front["removal"], front["retention"], "-", color="k", lw=1, alpha=0.6, zorder=1,
                label="Pareto front")
    ringed = points[points["trial_id"].isin(front_ids if noise_front_ids is None else noise_front_ids)]
    ringed = ringed.sort_values("removal")
    if band is not None:
        for k, (_, r) in enumerate(ringed.iterrows()):
            ax.add_patch(matplotlib.patches.Rectangle(
                (r["removal"] - band["removal"], r["retention"] - band["retention"]), 2 * band["removal"],
                2 * band["retention"], facecolor="0.5", alpha=0.12, edgecolor="0.5", lw=0.6, zorder=0,
                label=(f"noise band (±half-width, {band.get('replicates', '?')} retain replicates)" if k == 0 else None)))
    if not ringed.empty:
        ax.scatter(ringed["removal"], ringed["retention"], s=130, facecolors="none", edgecolors="k", lw=1.4,
                   zorder=3, label=None if noise_front_ids is None else "front beyond the noise")
    for which, marker in (("target", "*"), ("retain", "P")):
        if which in reference:
            r = reference[which]
            ax.scatter([r["removal"]], [r["retention"]], marker=marker, s=220, color="gold", edgecolors="k",
                       zorder=4, label=f"{which} model")
            ax.annotate(f"{which} model", (r["removal"], r["retention"]), xytext=(8, -4),
                        textcoords="offset points", fontsize=8, fontweight="bold")
    if not ringed.empty:   # once every mark is drawn: the axes' limits are final
        _number_front(ax, ringed, points[["removal", "retention"]].to_numpy(float))
    ax.set_xlabel("removal (higher = more forgotten)" + ("; error bars: ± sd over seeds" if "removal_sd" in
                                                          points.columns and points["removal_sd"].notna().any() else ""))
    ax.set_ylabel("retention (higher = more kept)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, frameon=False)
    return _save(fig, path)


def _number_front(ax, front: pd.DataFrame, avoid: np.ndarray, fontsize: float = 7.5) -> None:
    """Number the front's points 1..n (by removal) and list the numbers' labels beside the axes:
    full labels at the points overlap wherever the front is dense. Each number goes to the first
    of a ring of offsets where its box overlaps no number placed before and no trial's marker."""
    ax.autoscale_view()
    to_px = ax.transData.transform
    px_per_pt = ax.figure.dpi / 72
    markers = to_px(avoid)
    placed: list[tuple[float, float, float, float]] = []
    candidates = [(r * math.cos(a), r * math.sin(a)) for r in (9, 16, 24)
                  for a in np.deg2rad([45, 135, -45, -135, 90, -90, 0, 180])]
    xy = front[["removal", "retention"]].to_numpy(float)
    for k, ((x, y), at) in enumerate(zip(to_px(xy), xy), start=1):
        w, h = (0.6 * len(str(k)) + 0.4) * fontsize * px_per_pt, 1.2 * fontsize * px_per_pt

        def box_at(offset):
            cx, cy = x + offset[0] * px_per_pt, y + offset[1] * px_per_pt
            return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

        def clear(box):
            return (all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in placed)
                    and not np.any((markers[:, 0] > box[0] - 3) & (markers[:, 0] < box[2] + 3)
                                   & (markers[:, 1] > box[1] - 3) & (markers[:, 1] < box[3] + 3)))

        # crowded all round: the first offset, which at least never sits on its own point
        dx, dy = next((o for o in candidates if clear(box_at(o))), candidates[0])
        box = box_at((dx, dy))
        placed.append(box)
        ax.annotate(str(k), at, xytext=(dx, dy), textcoords="offset points",
                    ha="center", va="center", fontsize=fontsize, fontweight="bold",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.4", shrinkA=0, shrinkB=4))
    key = "\n".join(f"{k}  {label}" for k, label in enumerate(front["label"], start=1))
    ax.text(1.02, 1.0, "Pareto front\n" + key, transform=ax.transAxes, va="top", ha="left", fontsize=fontsize,
            family="monospace")


def curves_figure(series: dict[str, tuple[pd.DataFrame, str]], colors: dict, title: str, path: Path) -> Path | None:
    """Removal and retention G-effect per recorded step, one line per trial. ``series``:
    label -> (steps.parquet frame, family)."""
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, risk, ylab in ((axes[0], "removal", REMOVAL_LABEL), (axes[1], "retention", RETENTION_LABEL)):
        for label, (s, fam) in series.items():
            ax.plot(s["step"], s[risk], "-o", ms=3, lw=1.4, color=colors.get(fam, "k"), label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylab)
        ax.set_title(f"{risk} G-effect per step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def groups_figure(groups: dict[str, pd.DataFrame], risk: str, title: str, path: Path) -> Path | None:
    """Small multiples: per trial, the ``risk`` G-effect of each layer group against the step."""
    if not groups:
        return None
    fig, axes = _grid(len(groups))
    for ax, (label, ge) in zip(axes, groups.items()):
        sub = ge[ge["risk"] == risk]
        for g in GROUP_COLORS:
            gs = sub[sub["group"] == g].sort_values("step")
            if not gs.empty:
                ax.plot(gs["step"], gs["value"], "-o", ms=2.5, lw=1.3, color=GROUP_COLORS[g], label=g)
        ax.axhline(0, color="k", lw=0.7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
    axes[0].set_ylabel(REMOVAL_LABEL if risk == "removal" else RETENTION_LABEL, fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, path)


def shares_figure(shares: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Stacked bars: share of Σ|e| carried by each layer group, per trial (both risks pooled)."""
    if shares.empty:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(shares) + 2), 4.2))
    bottom = np.zeros(len(shares))
    for g in GROUP_COLORS:
        if g in shares.columns:
            ax.bar(shares.index, shares[g], bottom=bottom, color=GROUP_COLORS[g], label=g)
            bottom += shares[g].to_numpy(float)
    ax.set_ylabel("share of Σ|G-effect| (removal + retention)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=40, labelsize=8)
    for lab in ax.get_xticklabels():
        lab.set_ha("right")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def instances_figure(inst: dict[str, pd.DataFrame], title: str, path: Path) -> Path | None:
    """Small multiples: per trial, the removal vs retention PG-effect of each forget instance,
    coloured by the objective's per-instance weight when recorded, else by step."""
    if not inst:
        return None
    fig, axes = _grid(len(inst), ncols=4, w=3.6, h=3.1)
    for ax, (label, df) in zip(axes, inst.items()):
        by_weight = "weight" in df.columns and df["weight"].notna().any()
        cvals = df["weight"] if by_weight else df["step"]
        sc = ax.scatter(df["removal"], df["retention"], c=cvals, cmap="viridis", s=14, alpha=0.85)
        cb = fig.colorbar(sc, ax=ax, fraction=0.05, pad=0.02)
        cb.set_label("instance weight" if by_weight else "step", fontsize=7)
        cb.ax.tick_params(labelsize=6)
        ax.axhline(0, color="k", lw=0.6)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("removal PG-effect (want < 0)", fontsize=7.5)
        ax.set_ylabel("retention PG-effect (want ≥ 0)", fontsize=7.5)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, path)


def ga_effect_by_weight_figure(series: dict[str, tuple[pd.DataFrame, str]], colors: dict, title: str,
                               path: Path) -> Path | None:
    """The paper's Fig. 5(b): per trial (``series``: label -> (``analysis.ga_effect_by_weight``'s
    table, family)), the mean unweighted GA PG-effect of the forget instances in each bin of the
    objective's instance weight, ± one standard error, removal and retention side by side."""
    series = {k: v for k, v in series.items() if v[0] is not None and not v[0].empty}
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, risk, want in ((axes[0], "removal", "want < 0"), (axes[1], "retention", "want ≥ 0")):
        for label, (df, fam) in series.items():
            d = df[df["risk"] == risk].sort_values("mid")
            if d.empty:
                continue
            ax.errorbar(d["mid"], d["mean"], yerr=d["sem"].fillna(0.0), fmt="-o", ms=4, lw=1.4, capsize=3,
                        color=colors.get(fam, "k"), label=label)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("the objective's weight of the instance (bin centre)")
        ax.set_ylabel(f"unweighted GA PG-effect on {risk} ({want})", fontsize=9)
        ax.set_title(f"{risk} risk")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def trajectories_figure(series: dict[str, tuple[pd.DataFrame, str]], colors: dict, title: str,
                        path: Path) -> Path | None:
    """Forget quality (log scale) and model utility against the step, one line per trial. The
    utility line is the six non-ROUGE terms at every evaluation (the in-loop ones have no
    generation); the final nine-term model utility is a separate series of stars
    (``analysis.trajectory_utility``), so no line jumps between two definitions."""
    from matplotlib.lines import Line2D

    from rayunlearn.report.analysis import trajectory_utility

    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    ax = axes[0]
    drew = False
    for label, (tr, fam) in series.items():
        if "forget_quality" in tr.columns and tr["forget_quality"].notna().any():
            ax.plot(tr["step"], tr["forget_quality"], "-o", ms=3, lw=1.4, color=colors.get(fam, "k"), label=label)
            drew = True
    if drew:
        ax.set_yscale("log")
    ax.set_ylabel("forget quality (KS p-value, higher = closer to retain)", fontsize=9)
    ax.set_title("forget quality")
    ax = axes[1]
    handles, stars = [], False
    for label, (tr, fam) in series.items():
        same, full = trajectory_utility(tr)
        color = colors.get(fam, "k")
        if not same.empty:
            handles += ax.plot(same["step"], same["value"], "-o", ms=3, lw=1.4, color=color, label=label)
        if not full.empty:
            ax.plot(full["step"], full["value"], "*", ms=11, color=color, markeredgecolor="k", markeredgewidth=0.5)
            stars = True
    if stars:
        handles.append(Line2D([], [], ls="", marker="*", ms=11, color="w", markeredgecolor="k",
                              label="final model utility (9 terms, with ROUGE)"))
    ax.set_ylabel("model utility without ROUGE (6 terms, every evaluation)", fontsize=9)
    ax.set_title("model utility")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[1].legend(handles=handles, fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def fidelity_figure(series: dict[str, tuple[pd.DataFrame, str]], colors: dict, title: str, path: Path) -> Path | None:
    """First-order fidelity: the realised-update prediction −lr·e_real = −∇R·(θ_t − θ_{t+1}) against
    the measured probe-risk change per recorded step, with y = x (older results without the
    realised columns fall back to the plain-gradient prediction −lr·e)."""
    def pred_col(s, risk):
        col = f"predicted_{risk}_change_realised"
        return col if col in s.columns else f"predicted_{risk}_change"

    series = {k: v for k, v in series.items()
              if all(c in v[0].columns for risk in ("removal", "retention")
                     for c in (pred_col(v[0], risk), f"measured_{risk}_change"))}
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5))
    for ax, risk in zip(axes, ("removal", "retention")):
        allv = []
        for label, (s, fam) in series.items():
            x, y = s[pred_col(s, risk)].to_numpy(float), s[f"measured_{risk}_change"].to_numpy(float)
            ax.scatter(x, y, s=16, color=colors.get(fam, "k"), label=label, alpha=0.8)
            allv += [x[np.isfinite(x)], y[np.isfinite(y)]]
        v = np.concatenate(allv) if allv else np.zeros(1)
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (-1.0, 1.0)
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x")
        ax.set_xlabel(f"predicted {risk} risk change  −∇R·Δθ (realised update)")
        ax.set_ylabel(f"measured {risk} risk change")
        ax.set_title(f"{risk} risk ({'want increase' if risk == 'removal' else 'want ≤ 0 change'})")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def importance_figure(importances: dict[str, tuple[str, dict]], title: str, path: Path) -> Path | None:
    """Per family, horizontal bars of each hyper-parameter's importance for removal and retention."""
    if not importances:
        return None
    fig, axes = _grid(len(importances), ncols=3, w=4.4, h=2.9)
    for ax, (fam, (evaluator, imp)) in zip(axes, importances.items()):
        params = sorted(set(imp["removal"]) | set(imp["retention"]))
        y = np.arange(len(params))
        ax.barh(y - 0.18, [imp["removal"].get(p, 0) for p in params], height=0.36, color="#d62728", label="removal")
        ax.barh(y + 0.18, [imp["retention"].get(p, 0) for p in params], height=0.36, color="#1f77b4",
                label="retention")
        ax.set_yticks(y, params, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"importance ({evaluator.replace('ImportanceEvaluator', '')})", fontsize=8)
        ax.set_title(fam, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].legend(fontsize=7.5, frameon=False)
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)
