"""The report's robustness section: does the forgetting survive the attacks of ``eval.attacks``
(rayunlearn/eval/attacks.py)?

Per collection with ``attack.<name>.*`` columns: a table per trial of the forget probability
before and after each attack (on the attack's evaluated items), the recovered fraction and the
retention after the attack, with the retain and target models under the same attacks
(``reference/<which>.attacks.json``); the front under each attack (post-attack removal against
post-attack retention) beside the plain front; findings naming the methods whose forgetting
survives each attack (recovered fraction below :data:`SURVIVES`) and those whose forgetting
comes back (at least :data:`COMES_BACK`). Reads results files only.
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
        summary[c.name] = {"attacks": names, "findings": found}
    if not summary:
        doc.note("no attack columns (eval.attacks was empty in every collection).")
    fmt_summary["robustness"] = summary
