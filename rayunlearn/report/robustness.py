"""The report's robustness section: does the forgetting survive the attacks of ``eval.attacks``
(rayunlearn/eval/attacks.py)?

Per collection with ``attack.<name>.*`` columns: a table per trial of the forget probability
before and after each attack (on the attack's evaluated items), the recovered fraction (recomputed
from those probabilities by the one definition, ``rayunlearn.eval.attacks.recovery``: against the
unattacked target, guarded, and beyond the retain model's own rise) and the retention after the
attack, with the retain and target models under the same attacks
(``reference/<which>.attacks.json``); the front under each attack (post-attack removal against
post-attack retention) beside the plain front; findings naming the definition and the guards,
the methods whose forgetting survives each attack (recovered beyond the retain model's rise below
:data:`SURVIVES`), those whose forgetting comes back (at least :data:`COMES_BACK`) and the runs
where it is not defined, with the reason; for relearning attacks, the relearning steps' G-effects
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
    """The attacks with columns in a trials table (``attack.<name>.forget.prob``; an attack's
    name has no dot, so ``attack.<name>.target.forget.prob`` and the like are not names), sorted."""
    suffix = ".forget.prob"
    return sorted({c[len(runs.ATTACK_PREFIX):-len(suffix)] for c in trials.columns
                   if c.startswith(runs.ATTACK_PREFIX) and c.endswith(suffix)
                   and "." not in c[len(runs.ATTACK_PREFIX):-len(suffix)]})


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


def _reference_value(references: dict[str, dict], which: str, name: str, key: str) -> float:
    value = references.get(which, {}).get(name, {}).get(key)
    return np.nan if value is None else float(value)


def recoveries(trials: pd.DataFrame, name: str, references: dict[str, dict]) -> list[dict]:
    """Per trial, attack ``name``'s recovered fraction and its guards, recomputed by the one
    definition (:func:`rayunlearn.eval.attacks.recovery`) from the probability columns: the
    trial's own before / after, and the target and retain models unattacked and attacked on the
    same items (the trial's ``target.*`` / ``retain.*`` columns; results written before a column
    existed take it from the references' ``.attacks.json``: the same items and attack)."""
    from rayunlearn.eval.attacks import recovery

    def col(metric: str, which: str, key: str) -> np.ndarray:
        if f"{runs.ATTACK_PREFIX}{name}.{metric}" in trials.columns:
            return _col(trials, name, metric)
        return np.full(len(trials), _reference_value(references, which, name, key))

    after, before = _col(trials, name, "forget.prob"), _col(trials, name, "unattacked.forget.prob")
    t0, t1 = col("target.unattacked.forget.prob", "target", "unattacked.forget.prob"), col("target.forget.prob", "target", "forget.prob")
    r0, r1 = col("retain.unattacked.forget.prob", "retain", "unattacked.forget.prob"), col("retain.forget.prob", "retain", "forget.prob")
    errors = trials.get(f"{runs.ATTACK_PREFIX}{name}.error", pd.Series([""] * len(trials), index=trials.index))
    out = []
    for i, err in enumerate(errors):
        rec = recovery(*(float(v[i]) for v in (after, before, t0, t1, r0, r1)))
        out.append({**rec, "why": "the attack failed"} if isinstance(err, str) and err else rec)
    return out


def robustness_table(trials: pd.DataFrame, hp_columns: list[str], names: list[str],
                     references: dict[str, dict]) -> pd.DataFrame:
    """One row per trial (and reference model): forget prob before / after each attack, the
    recovered fraction (:func:`recoveries`; the reason in words where it is not defined), what
    of it is beyond the retain model's own rise, and the retention after the attack."""
    rows = []
    for which, attacked in references.items():
        row = {"method": f"({which} model)"}
        for name in names:
            m = attacked.get(name, {})
            row[f"{name}: forget prob before"] = m.get("unattacked.forget.prob")
            row[f"{name}: after"] = m.get("forget.prob")
            row[f"{name}: recovered"] = None       # measured against the target: not defined for a reference
            row[f"{name}: beyond retain"] = None
            row[f"{name}: retention after"] = m.get("retention")
        rows.append(row)
    found = {name: recoveries(trials, name, references) for name in names}
    for i, (_, r) in enumerate(trials.iterrows()):
        row = {"method": trial_label(r, hp_columns)}
        for name in names:
            rec = found[name][i]
            row[f"{name}: forget prob before"] = _col(trials, name, "unattacked.forget.prob")[i]
            row[f"{name}: after"] = _col(trials, name, "forget.prob")[i]
            row[f"{name}: recovered"] = rec["recovered"] if math.isfinite(rec["recovered"]) else f"n/a: {rec['why']}"
            row[f"{name}: beyond retain"] = rec["recovered_beyond_retain"]
            row[f"{name}: retention after"] = _col(trials, name, "retention")[i]
            err = r.get(f"{runs.ATTACK_PREFIX}{name}.error")
            if isinstance(err, str) and err:
                row[f"{name}: after"] = f"failed: {err}"
        rows.append(row)
    return pd.DataFrame(rows)


DEFINITION = ("recovered = (p_after − p_before) / (p_target − p_before), the share of the gap between the "
              "unattacked target and the unlearned model that came back; the verdicts read it beyond the retain "
              "model's own rise under the same attack (recovered − max(0, retain rise / gap)); not defined (n/a) "
              "when the gap is below {min_gap:g} or when the attacked target keeps less than {guard:g} of its gap "
              "(the attack itself destroyed the knowledge)")


def definition() -> str:
    """The recovered fraction's definition and guards, in words (the report and the summary)."""
    from rayunlearn.eval.attacks import GUARD, MIN_GAP

    return DEFINITION.format(min_gap=MIN_GAP, guard=GUARD)


def verdicts(trials: pd.DataFrame, hp_columns: list[str], names: list[str],
             references: dict[str, dict]) -> list[str]:
    """One sentence per attack: which methods' forgetting survives it and which comes back
    (recovered beyond the retain model's own rise, :func:`recoveries`), the reference models'
    own change under it, and the runs where the fraction is not defined, with the reason."""
    out = []
    labels = [trial_label(r, hp_columns) for _, r in trials.iterrows()]
    for name in names:
        found = recoveries(trials, name, references)
        ok = [(lab, rec["recovered_beyond_retain"]) for lab, rec in zip(labels, found)
              if math.isfinite(rec["recovered_beyond_retain"])]
        undefined = sorted({rec["why"] for rec in found if not math.isfinite(rec["recovered_beyond_retain"])})
        moved = "; ".join(f"the {which} model's forget prob under it {_num(m.get('unattacked.forget.prob'))} → "
                          f"{_num(m.get('forget.prob'))}" for which, attacked in references.items()
                          for m in [attacked.get(name, {})] if m)
        head = f"{name} ({moved or 'no attacked reference models'})"
        if not ok:
            out.append(f"{head}: no recovered fraction ({'; '.join(undefined) or 'no run'}).")
            continue
        survive = [f"{lab} ({v:.2f})" for lab, v in ok if v < SURVIVES]
        back = [f"{lab} ({v:.2f})" for lab, v in ok if v >= COMES_BACK]
        line = (f"{head}: the forgetting of {len(survive)} of {len(ok)} runs survives (recovered beyond the retain "
                f"model's rise < {SURVIVES}: {', '.join(survive) or 'none'}); in {len(back)} most of it comes back "
                f"(≥ {COMES_BACK}: {', '.join(back) or 'none'}). Median {float(np.median([v for _, v in ok])):.2f}.")
        if len(ok) < len(found):
            line += f" Not defined for {len(found) - len(ok)} runs: {'; '.join(undefined)}."
        out.append(line)
    return out


def _num(v) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{float(v):.3g}"


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
    doc.p("Does the forgetting survive? Each attack of eval.attacks (rayunlearn/eval/attacks.py, docs/spec/ATTACKS.md) "
          "acts on a copy of the unlearned model: relearning = a few finetuning steps on held-out forget authors (the "
          "evaluated authors are never relearned) or on unrelated retain / world rows; quantization = torchao "
          "weight-only rounding of every linear layer but the LM head. Forget probabilities are on the attack's "
          f"evaluated items, before and after. Recovered fraction: {definition()}. The target and retain models' rows "
          "show their own change under the same attack.")
    summary = {}
    for c in collections:
        names = attack_names(c.trials)
        if not names:
            continue
        doc.h(3, c.name)
        trials = c.completed
        references = attacked_references(c.path)
        table = robustness_table(trials, c.hp_columns, names, references)
        doc.table(table)
        found = verdicts(trials, c.hp_columns, names, references)
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
