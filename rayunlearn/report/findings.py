"""Check the paper's claims (docs/spec/GEFFECT.md, "Claims a correct implementation reproduces") on the
results just produced. Each check returns HELD / DID NOT HOLD / NOT TESTABLE with the quantity it
read, the runs it read it from, the threshold it applied (in words) and the numbers it found.

The paper's G-effects are those of the unlearning objective alone along unregularised runs, so the
checks read the objective-only columns of steps.parquet (``removal_forget_terms``,
``retention_forget_terms``: the forget terms' share of e), the per-term rows and the per-parameter
rows of geffects.parquet of the runs the claim names; a regularised run's total is reported beside
them, never in their place. A part of a claim that holds by construction of the estimator is
labelled so and not counted as a finding.

Sign convention: e = ∇R·∇L; removal wants e_u < 0, retention wants e_r ≥ 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rayunlearn.report.analysis import (INV_P_PATTERNS, NPO_WEIGHT_PATTERNS, find_stat, front_of,
                                        instance_effects)
from rayunlearn.report.data import Collection

HELD, FAILED, UNTESTABLE = "HELD", "DID NOT HOLD", "NOT TESTABLE"
PAPER_FAMILIES = ("ga", "ga+gd", "ga+kl", "npo", "npo+kl", "wga+kl", "tnpo+kl", "wtnpo+kl", "po+kl", "rmu+kl")
REGULARISERS = ("gd", "kl", "rr")   # the paper's regulariser terms (claim 6), by term label

# the objective-only G-effects in steps.parquet (runs.STEP_FIELDS): the forget-side terms' share of e
OBJECTIVE_ONLY = {"removal": "removal_forget_terms", "retention": "retention_forget_terms"}

# thresholds (stated in the report)
STRONG_RETENTION = 0.10   # GA retention "strongly negative": most negative e_r ≥ 10% of max |e_u|
NEG_FRACTION = 0.5        # ... and e_r < 0 at ≥ half the recorded steps
FAR_SMALLER = 0.5         # NPO mean |e| ≤ 50% of GA's
NEAR_ZERO = 0.10          # WGA/TNPO mean |e_r| ≤ 10% of GA's mean |e_r|
REMOVAL_NEG_FRACTION = 0.8
EMBED_NEAR_ZERO = 0.05    # embedding share of Σ|e| over GA's parameter groups ≤ 5%
WEIGHT_START_TOL = 0.05   # NPO's first logged weight within 0.05 of 1
# GA's removal cosine within this of −1 at every step: ∇L ∥ −∇R_u (by construction); float32 dot
# products over ~10⁶ weights leave ~1e-6 of rounding, a probe distinct from GA's batch gives far less
COSINE_TOL = 1e-4


@dataclass
class Finding:
    claim: int
    title: str
    verdict: str
    numbers: dict = field(default_factory=dict)
    note: str = ""
    quantity: str = ""                 # what was read (column / row kind, objective-only or total)
    runs: list = field(default_factory=list)   # the trials it was read from ("family: trial id")
    threshold: str = ""                # the rule that decides the verdict, in words
    by_construction: str = ""          # a part that holds by construction (not a finding)

    def as_dict(self) -> dict:
        return {"claim": self.claim, "title": self.title, "verdict": self.verdict, "numbers": self.numbers,
                "note": self.note, "quantity": self.quantity, "runs": list(self.runs),
                "threshold": self.threshold, "by_construction": self.by_construction}


def _r(x, nd=4):
    if isinstance(x, (float, np.floating)):
        return float(f"{float(x):.{nd}g}") if math.isfinite(x) else None
    return x


def _run_name(row: pd.Series) -> str:
    return f"{row['method']} ({row['trial_id']})"


class Picker:
    """Chooses the trials the claims are checked on: per family, from the collection that covers
    most of the paper's ten families (the study), the first completed trial by id."""

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

    def matching(self, pattern: str) -> list[tuple[Collection, pd.Series]]:
        """Every completed trial (all collections) whose family fully matches the regex ``pattern``."""
        out = []
        for c in self.collections:
            for _, row in c.completed.sort_values("trial_id").iterrows():
                if re.fullmatch(pattern, str(row["family"]).replace(" ", "")):
                    out.append((c, row))
        return out


def unregularised(name: str) -> str:
    """The family pattern of a run of objective ``name`` alone: ``wga`` or ``wga(alpha=0.5)``."""
    return rf"{re.escape(name)}(\([^()]*\))?"


def objective_only(steps: pd.DataFrame | None, risk: str) -> np.ndarray | None:
    """The objective-only G-effect per recorded step (the forget terms' share), or None when the
    steps table does not record it."""
    col = OBJECTIVE_ONLY[risk]
    if steps is None or col not in steps.columns or steps.empty:
        return None
    v = steps[col].to_numpy(float)
    return None if np.isnan(v).all() else v


def _mean_abs(v: np.ndarray | None) -> float:
    return float(np.nanmean(np.abs(v))) if v is not None and len(v) else math.nan


# ------------------------------------------------------------------------------------- claim 1
def claim1(p: Picker) -> Finding:
    title = "GA: removal G-effect ≤ 0 at every recorded step; retention G-effect turns strongly negative"
    quantity = "objective-only G-effects per recorded step (steps.parquet removal_forget_terms, retention_forget_terms)"
    threshold = (f"'strongly negative' = e_r < 0 at ≥ {NEG_FRACTION:.0%} of recorded steps and its most negative "
                 f"value ≥ {STRONG_RETENTION:.0%} of the largest |e_u|; removal: e_u ≤ 0 at every recorded step")
    row, s = p.steps("ga")
    if s is None:
        return Finding(1, title, UNTESTABLE, quantity=quantity, threshold=threshold,
                       note="no GA trial with effects/<trial>/steps.parquet" if row is None
                       else f"GA trial {row['trial_id']}: steps.parquet not recorded")
    eu, er = objective_only(s, "removal"), objective_only(s, "retention")
    runs_ = [_run_name(row)]
    if eu is None or er is None:
        return Finding(1, title, UNTESTABLE, quantity=quantity, runs=runs_, threshold=threshold,
                       note="steps.parquet has no objective-only columns")
    scale = float(np.max(np.abs(eu)))
    pos_steps = s.loc[eu > 1e-12 * max(scale, 1e-300), "step"].tolist()
    neg_frac = float(np.mean(er < 0))
    min_er = float(np.min(er))
    strong = bool(min_er < 0 and abs(min_er) >= STRONG_RETENTION * scale and neg_frac >= NEG_FRACTION)
    nums = {"trial": row["trial_id"], "recorded steps": len(s), "max e_u": _r(float(np.max(eu))),
            "min e_u": _r(float(np.min(eu))), "steps with e_u > 0": pos_steps, "min e_r": _r(min_er),
            "fraction of steps with e_r < 0": _r(neg_frac),
            "|min e_r| / max|e_u|": _r(abs(min_er) / scale if scale else math.nan)}
    # GA's objective is −R_u on its batch: when the G-effect's objective gradient is taken on the
    # removal probe itself, ∇L = −c·∇R_u and e_u = −c‖∇R_u‖² ≤ 0 whatever the model does.
    cos = s["cosine_removal"].to_numpy(float) if "cosine_removal" in s.columns else np.array([math.nan])
    tautology = bool(np.all(np.isfinite(cos)) and np.all(np.abs(cos + 1.0) <= COSINE_TOL))
    if tautology:
        by_construction = (f"e_u ≤ 0 is true by construction here: the removal cosine is −1 (within "
                           f"{COSINE_TOL:g}) at every recorded step, i.e. the objective gradient is taken on the "
                           "removal probe and e_u = −‖∇R_u‖²; the verdict rests on the retention part alone")
        return Finding(1, title, HELD if strong else FAILED, nums, quantity=quantity, runs=runs_,
                       threshold=threshold, by_construction=by_construction)
    return Finding(1, title, HELD if not pos_steps and strong else FAILED, nums, quantity=quantity, runs=runs_,
                   threshold=threshold,
                   note="the probe is not GA's own batch (removal cosine ≠ −1): e_u ≤ 0 is a finding")


# ------------------------------------------------------------------------------------- claim 2
def claim2(p: Picker) -> Finding:
    title = "GA's inverse-confidence weighting: mean 1/p over forget tokens grows during GA"
    quantity, threshold = "mean 1/p over forget tokens (a stat.* key of GA's log.jsonl)", \
        "last logged value > first and the least-squares slope > 0"
    got = p.get("ga")
    if got is None:
        return Finding(2, title, UNTESTABLE, note="no GA trial", quantity=quantity, threshold=threshold)
    c, row = got
    runs_ = [_run_name(row)]
    log = c.log(row["trial_id"])
    key = find_stat(log, INV_P_PATTERNS, prefer="ga")
    if key is None:
        return Finding(2, title, UNTESTABLE, quantity=quantity, runs=runs_, threshold=threshold,
                       note=f"GA trial {row['trial_id']}: no stat.* key for mean 1/p in log.jsonl")
    v = log[["step", key]].dropna()
    if len(v) < 2:
        return Finding(2, title, UNTESTABLE, quantity=quantity, runs=runs_, threshold=threshold,
                       note=f"fewer than two logged values of {key}")
    x, y = v["step"].to_numpy(float), v[key].to_numpy(float)
    slope = float(np.polyfit(x, y, 1)[0])
    held = y[-1] > y[0] and slope > 0
    nums = {"trial": row["trial_id"], "key": key, "first": _r(y[0]), "last": _r(y[-1]),
            "least-squares slope per step": _r(slope), "logged steps": len(v)}
    return Finding(2, title, HELD if held else FAILED, nums, quantity=quantity, runs=runs_, threshold=threshold)


# ------------------------------------------------------------------------------------- claim 3
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
    quantity = ("NPO's mean per-sequence weight per logged step; objective-only G-effects (steps.parquet "
                "removal_forget_terms, retention_forget_terms) of the unregularised NPO and GA runs")
    threshold = (f"'start at 1' = first weight within {WEIGHT_START_TOL} of 1, and last < first; 'far smaller' = "
                 f"mean |e| ≤ {FAR_SMALLER:.0%} of GA's, for both risks")
    got = p.get("npo")
    if got is None:
        return Finding(3, title, UNTESTABLE, note="no NPO trial", quantity=quantity, threshold=threshold)
    c, row = got
    runs_ = [_run_name(row)]
    nums: dict = {"trial": row["trial_id"]}
    parts, untested = [], []
    src, w = _npo_weights(c, row)
    if w is None:
        untested.append("NPO weights (no stat.* weight key in log.jsonl, no instance weights)")
    else:
        ok = abs(w[0] - 1.0) <= WEIGHT_START_TOL and w[-1] < w[0]
        nums.update({"weights from": src, "first weight": _r(w[0]), "last weight": _r(w[-1])})
        parts.append(ok)
    ga_row, s_ga = p.steps("ga")
    s_npo = c.steps(row["trial_id"])
    pairs = [(objective_only(s_npo, r), objective_only(s_ga, r)) for r in ("removal", "retention")]
    if any(a is None or b is None for a, b in pairs):
        untested.append("G-effect magnitudes (objective-only steps.parquet columns of NPO or GA missing)")
    else:
        runs_.append(_run_name(ga_row))
        for risk, (a, b) in zip(("removal", "retention"), pairs):
            ma, mb = _mean_abs(a), _mean_abs(b)
            ratio = ma / mb if mb else math.nan
            nums[f"mean|e_{risk[:3]}| NPO / GA"] = f"{_r(ma)} / {_r(mb)} = {_r(ratio, 3)}"
            parts.append(bool(ratio <= FAR_SMALLER))
    note = ""
    if not parts:
        return Finding(3, title, UNTESTABLE, nums, "not recorded: " + "; ".join(untested), quantity, runs_, threshold)
    if untested:
        note = "partly tested, not recorded: " + "; ".join(untested)
    return Finding(3, title, HELD if all(parts) else FAILED, nums, note, quantity, runs_, threshold)


# ------------------------------------------------------------------------------------- claim 4
CLAIM4_OBJECTIVES = ("wga", "tnpo", "wtnpo")


def claim4(p: Picker) -> Finding:
    title = "WGA and TNPO keep the retention G-effect near 0 while removal stays negative"
    quantity = ("objective-only G-effects per recorded step (steps.parquet removal_forget_terms, "
                "retention_forget_terms) of every unregularised wga, tnpo and wtnpo run, against GA's")
    threshold = (f"per run: mean |e_r| ≤ {NEAR_ZERO:.0%} of the unregularised GA run's mean |e_r|, mean e_u < 0 and "
                 f"e_u < 0 at ≥ {REMOVAL_NEG_FRACTION:.0%} of recorded steps; held = every such run passes")
    ga_row, s_ga = p.steps("ga")
    ga_r = _mean_abs(objective_only(s_ga, "retention"))
    if not math.isfinite(ga_r) or ga_r == 0:
        return Finding(4, title, UNTESTABLE, quantity=quantity, threshold=threshold,
                       note="'near 0' is relative to GA's objective-only retention effect, which is not recorded")
    nums: dict = {"GA mean|e_r|": _r(ga_r)}
    runs_ = [_run_name(ga_row)]
    passed, missing = [], []

    def judge(s: pd.DataFrame, label: str, column_of) -> bool | None:
        er, eu = column_of(s, "retention"), column_of(s, "removal")
        if er is None or eu is None:
            return None
        ratio = _mean_abs(er) / ga_r
        neg = float(np.mean(eu < 0))
        nums[f"{label} mean|e_r| / GA's"] = _r(ratio, 3)
        nums[f"{label} mean e_u"] = _r(float(np.mean(eu)))
        nums[f"{label} fraction of steps with e_u < 0"] = _r(neg)
        return bool(ratio <= NEAR_ZERO and neg >= REMOVAL_NEG_FRACTION and float(np.mean(eu)) < 0)

    for name in CLAIM4_OBJECTIVES:
        found = [(c, r) for c, r in p.matching(unregularised(name)) if c.steps(r["trial_id"]) is not None]
        if not found:
            missing.append(name)
        for c, row in found:
            ok = judge(c.steps(row["trial_id"]), str(row["method"]), objective_only)
            if ok is not None:
                passed.append(ok)
                runs_.append(_run_name(row))
    # reported beside, not judged: the +KL runs, objective only and whole method
    beside = []
    for name in CLAIM4_OBJECTIVES:
        row, s = p.steps(f"{name}+kl")
        if s is not None:
            beside.append(_run_name(row))
            judge(s, f"{row['method']} [objective only]", objective_only)
            judge(s, f"{row['method']} [whole method]",
                  lambda s_, risk: s_[risk].to_numpy(float) if risk in s_.columns else None)
    note = ""
    if beside:
        note = "reported beside, not judged: " + ", ".join(beside) + " (objective only and whole method incl. KL)"
    if missing:
        note = (note + "; " if note else "") + "no unregularised run of " + ", ".join(missing)
    if not passed:
        return Finding(4, title, UNTESTABLE, nums, note, quantity, runs_, threshold)
    if {"wga", "tnpo"} & set(missing):
        note += " (partly tested)"
    return Finding(4, title, HELD if all(passed) else FAILED, nums, note, quantity, runs_, threshold)


# ------------------------------------------------------------------------------------- claim 5
def _block_split(params: pd.DataFrame) -> tuple[int, dict[str, list[int]]]:
    """(number of blocks, {third: its block indices}) as the recorder grouped them (``group``)."""
    blocks = params[params["layer"] >= 0]
    n = int(blocks["layer"].max()) + 1 if not blocks.empty else 0
    split = {g: sorted(int(k) for k in blocks.loc[blocks["group"] == g, "layer"].unique())
             for g in ("shallow", "middle", "deep")}
    return n, split


def claim5(p: Picker) -> Finding:
    title = "Shallow blocks carry more G-effect than deep ones; the embedding's share is near 0"
    quantity = ("per-block G-effect of the unregularised GA run (geffects.parquet kind 'parameter' rows summed "
                "per block via `layer`, |·| per step, summed over steps), per risk; GA's total is its objective")
    threshold = (f"for both risks: mean per block of the shallow third > that of the deep third, and the embedding's "
                 f"share of Σ|e| over all parameter groups ≤ {EMBED_NEAR_ZERO:.0%}")
    got = p.get("ga")
    ge = got[0].geffects(got[1]["trial_id"]) if got is not None else None
    params = ge[ge["kind"] == "parameter"] if ge is not None else None
    if params is None or params.empty:
        return Finding(5, title, UNTESTABLE, quantity=quantity, threshold=threshold,
                       runs=[_run_name(got[1])] if got is not None else [],
                       note="no GA run with per-parameter rows in geffects.parquet")
    runs_ = [_run_name(got[1])]
    n, split = _block_split(params)
    if n < 3 or not all(split.values()):
        return Finding(5, title, UNTESTABLE, quantity=quantity, runs=runs_, threshold=threshold,
                       note=f"{n} block(s): no shallow / middle / deep thirds")
    nums: dict = {"blocks": n, "thirds (shallow/middle/deep)": "/".join(",".join(map(str, split[g]))
                                                                       for g in ("shallow", "middle", "deep"))}
    parts = []
    for risk in ("removal", "retention"):
        r = params[params["risk"] == risk]
        if r.empty:
            continue
        per_block = (r[r["layer"] >= 0].groupby(["step", "layer"])["value"].sum().abs()
                     .groupby("layer").sum())
        by_group = r.groupby(["step", "group"])["value"].sum().abs().groupby("group").sum()
        third = {g: float(per_block.reindex(split[g]).fillna(0.0).mean()) for g in split}
        embed = float(by_group.get("embed", 0.0)) / float(by_group.sum()) if by_group.sum() else math.nan
        for g in ("shallow", "middle", "deep"):
            nums[f"{risk}: mean Σ|e| per {g} block"] = _r(third[g])
        nums[f"{risk}: embedding share"] = _r(embed, 3)
        parts.append(third["shallow"] > third["deep"] and embed <= EMBED_NEAR_ZERO)
    note = ""
    if "embed" in set(params["group"]) and "lm" not in set(params["group"]):
        note = "tied input/output embeddings: the embedding's share includes the LM head's; "
    if n % 3:
        sizes = "/".join(str(len(split[g])) for g in ("shallow", "middle", "deep"))
        note += (f"{n} blocks are not a multiple of 3: the thirds hold {sizes} blocks (block k in third ⌊3k/{n}⌋), "
                 "compared by their mean per block; with so few blocks per third the test is weak")
    note = note.rstrip("; ")
    if not parts:
        return Finding(5, title, UNTESTABLE, nums, "no removal or retention parameter rows", quantity, runs_, threshold)
    return Finding(5, title, HELD if all(parts) else FAILED, nums, note, quantity, runs_, threshold)


# ------------------------------------------------------------------------------------- claim 6
def _hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by ``points`` (both coordinates maximised) above the reference point."""
    pts = points[np.argsort(-points[:, 0])]
    area, best_y = 0.0, ref[1]
    for x, y in pts:
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return float(area)


def _regulariser_weight(row: pd.Series, reg: str) -> float:
    """The weight of term ``reg`` in a trial: its sampled ``hp.<reg>.weight``, else the one its family
    string fixes (``ga+kl(weight=0.5)``), else the default 1."""
    col = f"hp.{reg}.weight"
    if col in row.index and pd.notna(row[col]):
        return float(row[col])
    fixed = re.search(rf"\+{reg}\([^()]*\bweight=([^,)]+)", str(row["family"]).replace(" ", ""))
    return float(fixed.group(1)) if fixed else 1.0


def _regulariser_fronts(p: Picker, nums: dict, runs_: list) -> bool | None:
    """KL's front over its weight against GD's and RR's (ga+<reg> trials, all collections):
    None when fewer than two regularisers were run at two or more weights."""
    sets = {}
    for reg in REGULARISERS:
        rows = p.matching(rf"ga\+{reg}(\([^()]*\))?")
        weights = {_regulariser_weight(r, reg) for _, r in rows}
        if len(weights) >= 2:
            sets[reg] = pd.DataFrame([{"trial_id": f"{c.name}/{r['trial_id']}", "removal": float(r["removal"]),
                                       "retention": float(r["retention"])} for c, r in rows])
            nums[f"ga+{reg} weights run"] = len(weights)
    if "kl" not in sets or len(sets) < 2:
        return None
    allp = pd.concat(sets.values())[["removal", "retention"]].to_numpy(float)
    ref = allp.min(axis=0)
    hv = {}
    for reg, df in sets.items():
        runs_.extend(df["trial_id"])
        hv[reg] = _hypervolume(front_of(df)[["removal", "retention"]].to_numpy(float), ref)
        nums[f"ga+{reg} front hypervolume"] = _r(hv[reg])
    return all(hv["kl"] > v for reg, v in hv.items() if reg != "kl")


def claim6(p: Picker) -> Finding:
    title = "Among regularisers (GD, KL, RR), KL preserves retention best"
    quantity = ("each regulariser's own retention G-effect: geffects.parquet kind 'term' rows of the term gd / kl / "
                "rr, risk retention, in the ga+gd / ga+kl / ga+rr runs (mean over recorded steps); and, where "
                "the results hold ga+<reg> runs at two or more weights, each regulariser's Pareto front "
                "(removal, retention) over its weight")
    threshold = ("KL's mean own retention G-effect > each other regulariser's (higher = more repair); fronts: KL's "
                 "hypervolume (reference point = the worst removal and retention among those runs) > each other's; "
                 "held = every tested part holds")
    nums: dict = {}
    runs_, own = [], {}
    for reg in REGULARISERS:
        got = p.get(f"ga+{reg}")
        if got is None:
            continue
        c, row = got
        ge = c.geffects(row["trial_id"])
        if ge is None or "term" not in ge.columns:
            continue
        terms = ge[(ge["kind"] == "term") & (ge["risk"] == "retention")]
        mine = terms[terms["term"] == reg].groupby("step")["value"].sum()
        ga_term = terms[terms["term"] == "ga"].groupby("step")["value"].sum()
        if mine.empty:
            continue
        runs_.append(_run_name(row))
        own[reg] = float(mine.mean())
        nums[f"{reg}: mean own e_r"] = _r(own[reg])
        if not ga_term.empty:
            nums[f"{reg}: mean e_r of its run's ga term"] = _r(float(ga_term.mean()))
    parts, note = [], []
    if "kl" in own and len(own) >= 2:
        parts.append(all(own["kl"] > v for reg, v in own.items() if reg != "kl"))
        missing = [r for r in REGULARISERS if r not in own]
        if missing:
            note.append("no term rows for " + ", ".join(f"ga+{r}" for r in missing))
    else:
        note.append("own G-effects: needs term rows of ga+kl and of ga+gd or ga+rr")
    fronts = _regulariser_fronts(p, nums, runs_)
    if fronts is None:
        note.append("fronts over the regulariser weight: not testable (fewer than two regularisers run at two or "
                    "more weights)")
    else:
        parts.append(fronts)
    if not parts:
        return Finding(6, title, UNTESTABLE, nums, "; ".join(note), quantity, runs_, threshold)
    return Finding(6, title, HELD if all(parts) else FAILED, nums, "; ".join(note), quantity, runs_, threshold)


def check_claims(collections: list[Collection]) -> list[Finding]:
    """Verdicts on docs/spec/GEFFECT.md claims 1-6, each with its quantity, runs, threshold and numbers."""
    p = Picker(collections)
    return [claim1(p), claim2(p), claim3(p), claim4(p), claim5(p), claim6(p)]
