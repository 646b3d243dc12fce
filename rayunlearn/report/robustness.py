"""The report's robustness section: does the forgetting survive the attacks of ``eval.attacks``
(rayunlearn/eval/attacks.py)?

Per collection with ``attack.<name>.*`` columns: a table per trial of the forget probability
before and after each attack (on the attack's evaluated items), the recovered fraction and the
retention after the attack, with the retain and target models under the same attacks
(``reference/<which>.attacks.json``); the front under each attack (post-attack removal against
post-attack retention) beside the plain front; findings naming the methods whose forgetting
survives each attack (recovered fraction below :data:`SURVIVES`) and those whose forgetting
comes back (at least :data:`COMES_BACK`); for relearning attacks, the relearning steps' G-effects
on the forget probe (how fast the forgotten risk falls back) and how the per-instance GA
PG-effects during unlearning relate to which forget items come back first. Reads results files
only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from rayunlearn import runs
from rayunlearn.io import read_json
from rayunlearn.report.analysis import front_of, trial_label

SURVIVES = 0.25      # recovered fraction below: the forgetting survives the attack
COMES_BACK = 0.5     # at or above: most of the forgotten knowledge came back
SECTION = "Robustness"


def attack_names(trials: pd.DataFrame) -> list[str]:
    """The attacks with columns in a trials table (``attack.<name>.forget.prob``), sorted."""
    suffix = ".forget.prob"
    return sorted({c[len(runs.ATTACK_PREFIX):-len(suffix)] for c in trials.columns
                   if c.startswith(runs.ATTACK_PREFIX) and c.endswith(suffix) and ".unattacked." not in c
                   and ".target." not in c})


def _col(trials: pd.DataFrame, name: str, metric: str) -> np.ndarray:
    key = f"{runs.ATTACK_PREFIX}{name}.{metric}"
    if key not in trials.columns:
        return np.full(len(trials), np.nan)
    return pd.to_numeric(trials[key], errors="coerce").to_numpy(float)


def attacked_references(path: Path) -> dict[str, dict]:
    """{which: {attack name: metrics}} of the reference models' attacked evaluations."""
    out = {}
    for which in ("target", "retain"):
        p = runs.attacked_reference(runs.reference_eval(path, which))
        if p.exists():
            out[which] = {name: entry.get("metrics", {}) for name, entry in read_json(p).items()}
    return out


def robustness_table(trials: pd.DataFrame, hp_columns: list[str], names: list[str],
                     references: dict[str, dict]) -> pd.DataFrame:
    """One row per trial (and reference model): forget prob before / after each attack, the
    recovered fraction and the retention after it."""
    rows = []
    for which, attacked in references.items():
        row = {"method": f"({which} model)"}
        for name in names:
            m = attacked.get(name, {})
            row[f"{name}: forget prob before"] = m.get("unattacked.forget.prob")
            row[f"{name}: after"] = m.get("forget.prob")
            row[f"{name}: recovered"] = None       # measured against the target: not defined for it
            row[f"{name}: retention after"] = m.get("retention")
        rows.append(row)
    for i, (_, r) in enumerate(trials.iterrows()):
        row = {"method": trial_label(r, hp_columns)}
        for name in names:
            row[f"{name}: forget prob before"] = _col(trials, name, "unattacked.forget.prob")[i]
            row[f"{name}: after"] = _col(trials, name, "forget.prob")[i]
            row[f"{name}: recovered"] = _col(trials, name, "recovered")[i]
            row[f"{name}: retention after"] = _col(trials, name, "retention")[i]
            err = r.get(f"{runs.ATTACK_PREFIX}{name}.error")
            if isinstance(err, str) and err:
                row[f"{name}: after"] = f"failed: {err}"
        rows.append(row)
    return pd.DataFrame(rows)


def verdicts(trials: pd.DataFrame, hp_columns: list[str], names: list[str]) -> list[str]:
    """One sentence per attack: which methods' forgetting survives it and which comes back."""
    out = []
    for name in names:
        rec = _col(trials, name, "recovered")
        labels = [trial_label(r, hp_columns) for _, r in trials.iterrows()]
        ok = [(lab, v) for lab, v in zip(labels, rec) if math.isfinite(v)]
        if not ok:
            out.append(f"{name}: no recovered fraction (no attacked target reference, or the attack failed).")
            continue
        survive = [f"{lab} ({v:.2f})" for lab, v in ok if v < SURVIVES]
        back = [f"{lab} ({v:.2f})" for lab, v in ok if v >= COMES_BACK]
        out.append(f"{name}: the forgetting of {len(survive)} of {len(ok)} runs survives (recovered < {SURVIVES}: "
                   f"{', '.join(survive) or 'none'}); in {len(back)} most of it comes back (recovered ≥ "
                   f"{COMES_BACK}: {', '.join(back) or 'none'}). Median recovered fraction "
                   f"{float(np.median([v for _, v in ok])):.2f}.")
    return out


def attacked_points(trials: pd.DataFrame, hp_columns: list[str], name: str) -> pd.DataFrame:
    """Post-attack (removal, retention) points of the trials where the attack produced both."""
    pts = pd.DataFrame({"trial_id": trials["trial_id"].astype(str).to_numpy(),
                        "family": trials["family"].astype(str).to_numpy(),
                        "label": [trial_label(r, hp_columns)[:60] for _, r in trials.iterrows()],
                        "removal": _col(trials, name, "removal"), "retention": _col(trials, name, "retention")})
    return pts[np.isfinite(pts["removal"]) & np.isfinite(pts["retention"])].reset_index(drop=True)


def per_trial_attacks(c, trial_id: str) -> dict:
    """The trial's attacks.json ({} when absent)."""
    path = c.trial_dir(trial_id) / runs.ATTACKS_FILE
    return read_json(path) if path.exists() else {}


def relearn_curves(c, trials: pd.DataFrame, name: str) -> dict[str, pd.DataFrame]:
    """{trial label: its relearning steps' probe risks and G-effects} for attack ``name``."""
    out = {}
    for _, r in trials.iterrows():
        effects = per_trial_attacks(c, str(r["trial_id"])).get(name, {}).get("effects")
        if effects:
            out[trial_label(r, c.hp_columns)] = pd.DataFrame(effects)
    return out


def instance_recovery(c, trials: pd.DataFrame, name: str) -> pd.DataFrame:
    """Per trial: how the per-instance GA PG-effects on the removal risk during unlearning
    (geffects rows of kind ``instance_ga_unweighted``, summed over the recorded steps) relate to
    how much of each evaluated forget item came back under attack ``name`` (its probability
    after − before): Spearman's ρ over the items with both, and the items that came back most.
    Instances are forget rows, the evaluated items forget-split items in the same order."""
    from scipy.stats import spearmanr

    rows = []
    for _, r in trials.iterrows():
        tid = str(r["trial_id"])
        entry = per_trial_attacks(c, tid).get(name)
        g = c.geffects(tid)
        if not entry or g is None or "instance" not in g.columns:
            continue
        ga = g[(g["kind"] == runs.INSTANCE_GA_KIND) & (g["risk"] == "removal")]
        if ga.empty:
            continue
        effect = ga.groupby("instance")["value"].sum()
        after, before = np.asarray(entry["forget_prob"]), np.asarray(entry["unattacked_forget_prob"])
        items = [i for i in entry["items"] if i in effect.index]
        if len(items) < 3:
            continue
        back = after[items] - before[items]
        rho = float(spearmanr(effect.loc[items].to_numpy(float), back).statistic)
        first = [items[k] for k in np.argsort(-back)[:3]]
        rows.append({"method": trial_label(r, c.hp_columns), "items": len(items), "spearman rho": rho,
                     "came back first (item: +prob)": ", ".join(f"{i}: {after[i] - before[i]:+.3f}" for i in first)})
    return pd.DataFrame(rows)


def relearn_figure(curves: dict[str, pd.DataFrame], title: str, path: Path) -> Path:
    """Forget-probe risk and the relearning steps' removal G-effect, per trial."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, df in list(curves.items())[:12]:
        axes[0].plot(df["step"], df["forget_risk"], marker="o", ms=3, label=label[:40])
        axes[1].plot(df["step"], df["forget_effect"], marker="o", ms=3, label=label[:40])
    axes[0].set(xlabel="relearning step", ylabel="forget-probe risk R_u (NLL)", title="forgotten risk falls back")
    axes[1].set(xlabel="relearning step", ylabel="G-effect ∇R_u·∇L (> 0: R_u falls)", title="relearning G-effect")
    axes[1].axhline(0, color="k", lw=0.6)
    axes[0].legend(fontsize=6.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_section(doc, collections, colors: dict, fig_dir: Path, fig, slug, fmt_summary: dict) -> None:
    """Append the robustness section to ``doc`` (see the module docstring); ``fig`` registers a
    figure path, ``slug`` names files; the section's answers go to ``fmt_summary["robustness"]``."""
    from rayunlearn.report import figures as F

    doc.h(2, SECTION)
    doc.p("Does the forgetting survive? Each attack of eval.attacks (rayunlearn/eval/attacks.py) acts on a copy of "
          "the unlearned model: relearning = a few finetuning steps on held-out forget authors (the evaluated "
          "authors are never relearned) or on unrelated retain / world rows; quantization = torchao weight-only "
          "rounding of every linear layer but the LM head. Forget probabilities are on the attack's evaluated items, "
          "before and after. Recovered fraction = (p_after − p_before) / (p_target,attacked − p_before): the share "
          "of the gap to the equally attacked target model that came back (0 = none, 1 = all).")
    summary = {}
    for c in collections:
        names = attack_names(c.trials)
        if not names:
            continue
        doc.h(3, c.name)
        trials = c.completed
        table = robustness_table(trials, c.hp_columns, names, attacked_references(c.path))
        doc.table(table)
        found = verdicts(trials, c.hp_columns, names)
        for line in found:
            doc.p(line)
        plain_front = set(front_of(trials)["trial_id"]) if not trials.empty else set()
        for name in names:
            pts = attacked_points(trials, c.hp_columns, name)
            if pts.empty:
                doc.note(f"{name}: no post-attack (removal, retention) point.")
                continue
            front = set(front_of(pts)["trial_id"])
            doc.img(fig(F.pareto_figure(pts, front, colors, {}, f"front under {name} — {c.name}",
                                        fig_dir / f"{slug(c.name)}_front_{name}.png")),
                    f"Pareto front of {c.name} after {name}")
            kept = sorted(plain_front & front)
            doc.p(f"{name}: {len(front)} trials on the front after the attack, {len(kept)} of the plain front's "
                  f"{len(plain_front)} stay on it.")
        relations = {}
        for name in names:
            curves = relearn_curves(c, trials, name)
            if not curves:
                continue
            doc.p(f"{name}: the relearning steps seen through the G-effect — the forget-probe risk at the weights "
                  "each step starts from, and the step's G-effect on it (∇R_u·∇L; the risk changes by about −lr·e, "
                  "so a positive effect is forgotten risk falling back).")
            doc.img(fig(relearn_figure(curves, f"relearning ({name}) — {c.name}",
                                       fig_dir / f"{slug(c.name)}_relearn_{name}.png")),
                    f"relearning G-effects of {c.name}")
            rel = instance_recovery(c, trials, name)
            if rel.empty:
                doc.note(f"{name}: no per-instance GA PG-effects (geffects kind instance_ga_unweighted) for the "
                         "evaluated items: the per-instance relation is not drawn.")
                continue
            doc.p(f"{name}: which forget items come back first, against their per-instance GA PG-effect during "
                  "unlearning (summed over the recorded steps): Spearman's ρ over the evaluated items in the "
                  "G-effect probe; ρ < 0 = items pushed harder up in risk during unlearning come back more.")
            doc.table(rel)
            relations[name] = rel.to_dict(orient="records")
        summary[c.name] = {"attacks": names, "findings": found, "instances": relations}
    if not summary:
        doc.note("no attack columns (eval.attacks was empty in every collection).")
    fmt_summary["robustness"] = summary
