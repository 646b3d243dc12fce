"""Check the paper's claims (docs/spec/GEFFECT.md, "Claims a correct implementation reproduces") on the
results just produced. Each check returns HELD / DID NOT HOLD / NOT TESTABLE with the numbers
it used and the thresholds, stated in words.

Sign convention: e = ∇R·∇L; removal wants e_u < 0, retention wants e_r ≥ 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rayunlearn.report.analysis import (GROUPS, INV_P_PATTERNS, NPO_WEIGHT_PATTERNS, cumulative_effects,
                                        find_stat, group_effects, instance_effects)
from rayunlearn.report.data import Collection

HELD, FAILED, UNTESTABLE = "HELD", "DID NOT HOLD", "NOT TESTABLE"
PAPER_FAMILIES = ("ga", "ga+gd", "ga+kl", "npo", "npo+kl", "wga+kl", "tnpo+kl", "wtnpo+kl", "po+kl", "rmu+kl")

# thresholds (stated in the report)
STRONG_RETENTION = 0.10   # GA retention "strongly negative": most negative e_r ≥ 10% of max |e_u|
NEG_FRACTION = 0.5        # ... and e_r < 0 at ≥ half the recorded steps
FAR_SMALLER = 0.5         # NPO mean |e| ≤ 50% of GA's
NEAR_ZERO = 0.10          # WGA/TNPO mean |e_r| ≤ 10% of GA's mean |e_r|
REMOVAL_NEG_FRACTION = 0.8
EMBED_NEAR_ZERO = 0.05    # embedding share of Σ|e| over groups ≤ 5%
WEIGHT_START_TOL = 0.05   # NPO's first logged weight within 0.05 of 1


@dataclass
class Finding:
    claim: int
    title: str
    verdict: str
    numbers: dict = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict:
        return {"claim": self.claim, "title": self.title, "verdict": self.verdict,
                "numbers": self.numbers, "note": self.note}


def _r(x, nd=4):
    if isinstance(x, (float, np.floating)):
        return float(f"{float(x):.{nd}g}") if math.isfinite(x) else None
    return x


class Picker:
    """Chooses, per family, the trial the claims are checked on: from the collection that
    covers most of the paper's ten families (the study), the first completed trial by id."""

    def __init__(self, collections: list[Collection]):
        def cover(c: Collection) -> int:
            return len(set(c.completed["family"]) & set(PAPER_FAMILIES))
        self.collections = sorted(collections, key=cover, reverse=True)

    def get(self, *families: str):
        """(collection, trial row) for the first of ``families`` found, or None."""
        for fam in families:
            for c in self.collections:
                t = c.completed[c.completed["family"] == fam].sort_values("trial_id")
                if not t.empty:
                    with_steps = [i for i, r in t.iterrows() if c.steps(r["trial_id"]) is not None]
                    return c, t.loc[with_steps[0] if with_steps else t.index[0]]
        return None

    def steps(self, *families: str):
        got = self.get(*families)
        if got is None:
            return None, None
        c, row = got
        return row, c.steps(row["trial_id"])


def claim1(p: Picker) -> Finding:
    title = "GA: removal G-effect ≤ 0 at every recorded step; retention G-effect turns strongly negative"
    row, s = p.steps("ga")
    if s is None:
        return Finding(1, title, UNTESTABLE, note="no GA trial with effects/<trial>/steps.parquet" if row is None
                       else f"GA trial {row['trial_id']}: steps.parquet not recorded")
    eu, er = s["removal"].to_numpy(float), s["retention"].to_numpy(float)
    scale = float(np.max(np.abs(eu))) if len(eu) else 0.0
    tol = 1e-12 * max(scale, 1e-300)
    pos_steps = s.loc[eu > tol, "step"].tolist()
    removal_ok = len(pos_steps) == 0
    neg_frac = float(np.mean(er < 0)) if len(er) else math.nan
    min_er = float(np.min(er)) if len(er) else math.nan
    strong = bool(min_er < 0 and abs(min_er) >= STRONG_RETENTION * scale and neg_frac >= NEG_FRACTION)
    nums = {"trial": row["trial_id"], "recorded steps": len(s), "max e_u": _r(float(np.max(eu))),
            "min e_u": _r(float(np.min(eu))), "steps with e_u > 0": pos_steps, "min e_r": _r(min_er),
            "fraction of steps with e_r < 0": _r(neg_frac), "|min e_r| / max|e_u|": _r(abs(min_er) / scale if scale else math.nan)}
    note = (f"'strongly negative' = e_r < 0 at ≥ {NEG_FRACTION:.0%} of recorded steps and its most negative value "
            f"≥ {STRONG_RETENTION:.0%} of the largest |e_u|")
    return Finding(1, title, HELD if removal_ok and strong else FAILED, nums, note)


def claim2(p: Picker) -> Finding:
    title = "GA's inverse-confidence weighting: mean 1/p over forget tokens grows during GA"
    got = p.get("ga")
    if got is None:
        return Finding(2, title, UNTESTABLE, note="no GA trial")
    c, row = got
    log = c.log(row["trial_id"])
    key = find_stat(log, INV_P_PATTERNS, prefer="ga")
    if key is None:
        return Finding(2, title, UNTESTABLE, note=f"GA trial {row['trial_id']}: no stat.* key for mean 1/p in log.jsonl")
    v = log[["step", key]].dropna()
    if len(v) < 2:
        return Finding(2, title, UNTESTABLE, note=f"fewer than two logged values of {key}")
    x, y = v["step"].to_numpy(float), v[key].to_numpy(float)
    slope = float(np.polyfit(x, y, 1)[0])
    held = y[-1] > y[0] and slope > 0
    nums = {"trial": row["trial_id"], "key": key, "first": _r(y[0]), "last": _r(y[-1]),
            "least-squares slope per step": _r(slope), "logged steps": len(v)}
    return Finding(2, title, HELD if held else FAILED, nums, "held = last > first and the fitted slope > 0")


def _mean_abs(s: pd.DataFrame, col: str) -> float:
    return float(np.mean(np.abs(s[col].to_numpy(float)))) if s is not None and len(s) else math.nan


def _npo_weights(c: Collection, row) -> tuple[str | None, np.ndarray | None]:
    log = c.log(row["trial_id"])
    key = find_stat(log, NPO_WEIGHT_PATTERNS, prefer="npo")
    if key is not None:
        v = log[key].dropna().to_numpy(float)
        if len(v) >= 2:
            return f"log.jsonl {key}", v
    inst = instance_effects(c.geffects(row["trial_id"]))
    if inst is not None and "weight" in inst.columns and inst["weight"].notna().any():
        v = inst.groupby("step")["weight"].mean().sort_index().to_numpy(float)
        if len(v) >= 2:
            return "geffects.parquet instance weights (mean per step)", v
    return None, None


def claim3(p: Picker) -> Finding:
    title = "NPO's per-sequence weights start at 1 and shrink; its G-effects are far smaller than GA's"
    got = p.get("npo")
    if got is None:
        return Finding(3, title, UNTESTABLE, note="no NPO trial")
    c, row = got
    nums: dict = {"trial": row["trial_id"]}
    parts, untested = [], []
    src, w = _npo_weights(c, row)
    if w is None:
        untested.append("NPO weights (no stat.* weight key in log.jsonl, no instance weights)")
    else:
        ok = abs(w[0] - 1.0) <= WEIGHT_START_TOL and w[-1] < w[0]
        nums.update({"weights from": src, "first weight": _r(w[0]), "last weight": _r(w[-1])})
        parts.append(ok)
    s_npo = c.steps(row["trial_id"])
    _, s_ga = p.steps("ga")
    if s_npo is None or s_ga is None:
        untested.append("G-effect magnitudes (steps.parquet of NPO or GA missing)")
    else:
        for risk in ("removal", "retention"):
            a, b = _mean_abs(s_npo, risk), _mean_abs(s_ga, risk)
            ratio = a / b if b else math.nan
            nums[f"mean|e_{risk[:3]}| NPO / GA"] = f"{_r(a)} / {_r(b)} = {_r(ratio, 3)}"
            parts.append(bool(ratio <= FAR_SMALLER))
    note = f"'start at 1' = first weight within {WEIGHT_START_TOL} of 1; 'far smaller' = mean |e| ≤ {FAR_SMALLER:.0%} of GA's, for both risks"
    if not parts:
        return Finding(3, title, UNTESTABLE, nums, note + "; not recorded: " + "; ".join(untested))
    if untested:
        note += "; partly tested, not recorded: " + "; ".join(untested)
    return Finding(3, title, HELD if all(parts) else FAILED, nums, note)


def claim4(p: Picker) -> Finding:
    title = "WGA and TNPO keep the retention G-effect near 0 while removal stays negative"
    _, s_ga = p.steps("ga")
    if s_ga is None:
        return Finding(4, title, UNTESTABLE, note="'near 0' is relative to GA, whose steps.parquet is missing")
    ga_r = _mean_abs(s_ga, "retention")
    nums: dict = {"GA mean|e_r|": _r(ga_r)}
    parts, used = [], []
    for fams in (("wga", "wga+kl"), ("tnpo", "tnpo+kl")):
        row, s = p.steps(*fams)
        if s is None:
            continue
        fam = row["family"]
        used.append(fam)
        r = _mean_abs(s, "retention")
        eu = s["removal"].to_numpy(float)
        neg = float(np.mean(eu < 0))
        ok = r <= NEAR_ZERO * ga_r and neg >= REMOVAL_NEG_FRACTION and float(np.mean(eu)) < 0
        nums[f"{fam} mean|e_r| / GA's"] = _r(r / ga_r if ga_r else math.nan, 3)
        nums[f"{fam} mean e_u"] = _r(float(np.mean(eu)))
        nums[f"{fam} fraction of steps with e_u < 0"] = _r(neg)
        parts.append(ok)
    note = (f"'near 0' = mean |e_r| ≤ {NEAR_ZERO:.0%} of GA's mean |e_r|; 'removal stays negative' = mean e_u < 0 and "
            f"e_u < 0 at ≥ {REMOVAL_NEG_FRACTION:.0%} of recorded steps; checked on {', '.join(used) or 'nothing'}")
    if not parts:
        return Finding(4, title, UNTESTABLE, nums, "no WGA/TNPO trial with steps.parquet")
    if len(parts) < 2:
        note += "; partly tested (only one of WGA/TNPO recorded)"
    return Finding(4, title, HELD if all(parts) else FAILED, nums, note)


def claim5(collections: list[Collection]) -> Finding:
    title = "Shallow blocks carry more G-effect than deep ones; the embedding's share is near 0"
    totals = {g: 0.0 for g in GROUPS}
    n_trials = n_shallow = 0
    for c in collections:
        for _, row in c.completed.iterrows():
            ge = group_effects(c.geffects(row["trial_id"]))
            if ge is None:
                continue
            absg = ge.assign(a=ge["value"].abs()).groupby("group")["a"].sum()
            n_trials += 1
            n_shallow += int(absg.get("shallow", 0.0) > absg.get("deep", 0.0))
            for g in GROUPS:
                totals[g] += float(absg.get(g, 0.0))
    if n_trials == 0:
        return Finding(5, title, UNTESTABLE, note="no geffects.parquet with per-parameter rows")
    total = sum(totals.values())
    share = {g: totals[g] / total if total else math.nan for g in GROUPS}
    held = share["shallow"] > share["deep"] and share["embed"] <= EMBED_NEAR_ZERO
    nums = {f"share {g}": _r(share[g], 3) for g in GROUPS if totals[g] or g in ("embed", "shallow", "deep")}
    nums.update({"trials pooled": n_trials, "trials with shallow > deep": n_shallow})
    note = (f"shares of Σ_steps |Σ_group e| pooled over both risks and all trials with per-parameter rows; "
            f"'near 0' = embedding share ≤ {EMBED_NEAR_ZERO:.0%}")
    return Finding(5, title, HELD if held else FAILED, nums, note)


def claim6(p: Picker) -> Finding:
    title = "Among regularisers, KL preserves retention best"
    kl = p.get("ga+kl")
    others = [(f, p.get(f)) for f in ("ga+gd", "ga+rr")]
    others = [(f, g) for f, g in others if g is not None]
    if kl is None or not others:
        return Finding(6, title, UNTESTABLE, note="needs ga+kl and ga+gd (or ga+rr) trials")

    def measures(got):
        c, row = got
        cum = cumulative_effects(c.steps(row["trial_id"]))
        return {"model utility": c.metric(row, ("model_utility",)), "retention": float(row["retention"]),
                "Σlr·e_r": cum["cum_lr_retention"]}

    mk = measures(kl)
    nums: dict = {f"ga+kl {k}": _r(v) for k, v in mk.items()}
    wins, losses = [], []
    for fam, got in others:
        mo = measures(got)
        nums.update({f"{fam} {k}": _r(v) for k, v in mo.items()})
        for k in mk:
            if math.isfinite(mk[k]) and math.isfinite(mo[k]):
                (wins if mk[k] > mo[k] else losses).append(f"{k} vs {fam}")
    # the KL variants: X+kl against X alone, where both exist (supporting numbers)
    for base in ("ga", "npo", "wga", "tnpo", "wtnpo", "po", "rmu"):
        a, b = p.get(base), p.get(base + "+kl")
        if a is not None and b is not None:
            nums[f"MU {base} → {base}+kl"] = f"{_r(a[0].metric(a[1], ('model_utility',)))} → {_r(b[0].metric(b[1], ('model_utility',)))}"
    note = "higher is better for every measure (model utility, retention scalar, cumulative retention G-effect Σlr·e_r)"
    if not wins and not losses:
        return Finding(6, title, UNTESTABLE, nums, "no measure recorded for both")
    if losses:
        note += "; KL not best on: " + ", ".join(losses)
    return Finding(6, title, HELD if not losses else FAILED, nums, note)


def check_claims(collections: list[Collection]) -> list[Finding]:
    """Verdicts on docs/spec/GEFFECT.md claims 1-6, with the numbers used."""
    p = Picker(collections)
    return [claim1(p), claim2(p), claim3(p), claim4(p), claim5(p.collections), claim6(p)]
