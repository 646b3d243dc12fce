"""Numbers the report shows, computed from loaded results only (no Ray, no model): the Pareto
front, the paper-style results table, cumulative / per-group / per-instance G-effects,
hyper-parameter importances (Optuna evaluators on a rebuilt in-memory study).

Sign convention (docs/spec/GEFFECT.md): e = ∇R · ∇L; removal wants e_u < 0, retention wants e_r ≥ 0;
the first-order risk change of one step is -lr·e.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd

from rayunlearn import runs
from rayunlearn.report.data import Collection, ReportDataError

GROUPS = ("embed", "shallow", "middle", "deep", "lm", "norm")
# hyper-parameter importance is computed per family from at least this many completed trials
# (configurations): an fANOVA / PED-ANOVA fit on fewer ranks noise
MIN_IMPORTANCE_TRIALS = 10


# ----------------------------------------------------------------------------- Pareto front
def pareto_mask(points) -> np.ndarray:
    """Boolean mask of the non-dominated points (both objectives maximised), via
    ``rayunlearn.pareto.pareto_front`` (the sweep's own definition: ties all kept, NaN excluded)."""
    from rayunlearn.pareto import pareto_front

    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    mask = np.zeros(len(pts), dtype=bool)
    if len(pts):
        mask[pareto_front(pts.tolist(), maximize=(True, True))] = True
    return mask


def front_of(coll_trials: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated completed trials (removal, retention maximised)."""
    if coll_trials.empty:
        return coll_trials
    return coll_trials[pareto_mask(coll_trials[["removal", "retention"]].to_numpy(float))]


def _num(v) -> float:
    """A table cell as a float (NaN for missing or non-numeric)."""
    if isinstance(v, (bool, np.bool_)) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _flag(v):
    """A `feasible` cell: True / False, or None (no floor, or unknown)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.floating)) and not math.isnan(v):
        return bool(v)
    return None


def retention_floor(c: Collection) -> dict | None:
    """The sweep's retention floor: {"fraction", "retention"} (the threshold: the fraction times
    the target model's retention; the fraction itself for a sweep without a preparation), or
    None when its space sets none."""
    frac = (c.space or {}).get("retention_floor")
    if frac is None:
        return None
    if "target" in c.reference:
        threshold = float(frac) * float(c.reference["target"]["retention"])
    elif not ((c.space or {}).get("prepare") or {}).get("enabled", True):
        threshold = float(frac)
    else:
        threshold = math.nan
    return {"fraction": float(frac), "retention": threshold}


def front_data(c: Collection) -> dict:
    """The Pareto front of one collection with its uncertainty, as plain data (what the static
    front figure, the interactive one and the report's text draw from):

    - ``points``: one dict per completed trial: trial_id, family, method, label, hps
      ({term.param: value}), removal, retention, removal_sd, retention_sd (the seeds' standard
      deviations; NaN for one seed), n_seeds, removal_report (held-out authors), feasible
      (True / False against the retention floor, None without one), on_front (the exact front)
      and on_noise_front (no other point clearly better beyond the band:
      ``rayunlearn.pareto.noisy_pareto_front``); both fronts are over the feasible points only;
    - ``band``: {"removal", "retention": half-widths, "replicates", "removal_kind"} from the
      noise floor between retain replicates (``runs.noise_path``), or None when not measured;
    - ``floor``: :func:`retention_floor`;
    - ``reference``: {"target" / "retain": {"removal", "retention"}} where evaluated."""
    from rayunlearn.pareto import noisy_pareto_front, pareto_front

    points = []
    for _, r in c.completed.iterrows():
        hps = {col[len(runs.HP_PREFIX):]: (r[col].item() if hasattr(r[col], "item") else r[col])
               for col in c.hp_columns if r[col] is not None and not (isinstance(r[col], float) and math.isnan(r[col]))}
        n = _num(r.get(runs.SEEDS_COLUMN))
        points.append({"trial_id": str(r["trial_id"]), "family": str(r["family"]), "method": str(r["method"]),
                       "label": trial_label(r, c.hp_columns), "hps": hps,
                       "removal": float(r["removal"]), "retention": float(r["retention"]),
                       "removal_sd": _num(r.get(f"removal{runs.SD_SUFFIX}")),
                       "retention_sd": _num(r.get(f"retention{runs.SD_SUFFIX}")),
                       "n_seeds": int(n) if math.isfinite(n) else 1,
                       "removal_report": c.metric(r, ("removal_report",)),
                       "feasible": _flag(r.get(runs.FEASIBLE_COLUMN))})
    band = None
    if c.noise is not None:
        band = {"removal": float(c.noise["removal"]), "retention": float(c.noise["retention"]),
                "replicates": int(c.noise.get("replicates", 0)), "removal_kind": c.noise.get("removal_kind")}
    eligible = [i for i, p in enumerate(points) if p["feasible"] is not False]
    xy = [[points[i]["removal"], points[i]["retention"]] for i in eligible]
    exact = {eligible[k] for k in pareto_front(xy)}
    noisy = {eligible[k] for k in noisy_pareto_front(xy, (band["removal"], band["retention"]) if band else (0.0, 0.0))}
    for i, p in enumerate(points):
        p["on_front"], p["on_noise_front"] = i in exact, i in noisy
    reference = {w: {"removal": float(m["removal"]), "retention": float(m["retention"])}
                 for w, m in c.reference.items()}
    return {"points": points, "band": band, "floor": retention_floor(c), "reference": reference}


def _diff(a: float, b: float, h: float | None) -> str:
    d = b - a
    if h is None:
        return f"{d:+.3g}"
    return f"{d:+.3g} ({'real' if abs(d) > h else 'within noise'})"


def front_in_words(data: dict) -> list[str]:
    """Sentences saying which differences on a front (:func:`front_data`) are real: beyond the
    noise band between retain replicates."""
    pts, band, floor = data["points"], data["band"], data["floor"]
    if not pts:
        return []
    out = []
    name = {p["trial_id"]: f"{p['label']} ({p['trial_id']})" for p in pts}
    multi = [p for p in pts if p["n_seeds"] > 1]
    if multi:
        out.append(f"{len(multi)} of {len(pts)} trials ran {max(p['n_seeds'] for p in multi)} seeds; the median "
                   f"spread between seeds (sd) is {np.nanmedian([p['removal_sd'] for p in multi]):.3g} in removal "
                   f"and {np.nanmedian([p['retention_sd'] for p in multi]):.3g} in retention (the error bars).")
    else:
        out.append("Every trial ran one seed: the figure has no error bars.")
    if floor is not None:
        bad = [p for p in pts if p["feasible"] is False]
        out.append(f"Retention floor {floor['fraction']:g} × the target's = {floor['retention']:.3g}: {len(bad)} of "
                   f"{len(pts)} trials miss it (drawn as crosses) and are left out of both fronts"
                   + (f": {', '.join(name[p['trial_id']] for p in bad)}." if bad else "."))
    exact = sorted((p for p in pts if p["on_front"]), key=lambda p: p["removal"])
    noisy = sorted((p for p in pts if p["on_noise_front"]), key=lambda p: p["removal"])
    if band is None:
        out.append(f"No noise floor was measured (set prepare.retain_replicates >= 2): no difference between "
                   f"trials can be called real. The exact front has {len(exact)} trial(s).")
        return out
    out.append(f"Noise band from {band['replicates']} retain replicates (the mean difference between two retain "
               f"models that differ only in their seed): removal ({band['removal_kind']}) ±{band['removal']:.3g}, "
               f"retention ±{band['retention']:.3g}. A difference larger than that is called real.")
    dropped = [p for p in exact if not p["on_noise_front"]]
    kept = [p for p in noisy if not p["on_front"]]
    text = (f"The exact front has {len(exact)} trial(s); {len(noisy)} remain once differences inside the band "
            f"are ignored (no other trial is better beyond the band in one objective and not worse beyond it "
            f"in the other).")
    if dropped:
        text += f" Dropped, their only advantage being within the noise: {', '.join(name[p['trial_id']] for p in dropped)}."
    if kept:
        text += (f" Kept although dominated on the exact numbers (the trial that beats them does so within the noise): "
                 f"{', '.join(name[p['trial_id']] for p in kept)}.")
    out.append(text)
    for a, b in zip(noisy, noisy[1:]):
        out.append(f"From {name[a['trial_id']]} to {name[b['trial_id']]}: removal {_diff(a['removal'], b['removal'], band['removal'])}, "
                   f"retention {_diff(a['retention'], b['retention'], band['retention'])}.")
    if len(noisy) > 1 and all(abs(a["removal"] - b["removal"]) <= band["removal"] and
                              abs(a["retention"] - b["retention"]) <= band["retention"] for a in noisy for b in noisy):
        out.append("Every trial on the noise-aware front lies within the band of every other: these results do not "
                   "tell the front's trials apart.")
    return out


def trial_label(row: pd.Series, hp_columns: list[str]) -> str:
    """The method string, with the hyper-parameters appended when the string does not show them."""
    label = str(row["method"])
    extra = []
    for c in hp_columns:
        v = row.get(c)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        name = c[3:]
        text = f"{v:.3g}" if isinstance(v, (float, np.floating)) else str(v)
        if f"{name}=" in label or text in label:
            continue
        extra.append(f"{name}={text}")
    return label + (f" [{', '.join(extra)}]" if extra else "")


# ----------------------------------------------------------------------------- G-effects
def cumulative_effects(steps: pd.DataFrame | None) -> dict[str, float]:
    """Σ over recorded steps of lr·e (removal, retention) and Σ of raw e."""
    out = {k: math.nan for k in ("cum_lr_removal", "cum_lr_retention", "sum_removal", "sum_retention")}
    if steps is None or steps.empty:
        return out
    for risk in ("removal", "retention"):
        e = steps[risk].to_numpy(float)
        out[f"sum_{risk}"] = float(np.nansum(e))
        if "lr" in steps.columns:
            out[f"cum_lr_{risk}"] = float(np.nansum(steps["lr"].to_numpy(float) * e))
    return out


def group_effects(geffects: pd.DataFrame | None) -> pd.DataFrame | None:
    """G-effect per (step, risk, group): the sum of the per-parameter rows of each group."""
    if geffects is None or "group" not in geffects.columns:
        return None
    p = geffects[(geffects["kind"] == "parameter") & geffects["group"].isin(GROUPS)]
    if p.empty:  # a table holding only per-group rows
        p = geffects[(geffects["kind"] == "group") & geffects["group"].isin(GROUPS)]
    if p.empty:
        return None
    return p.groupby(["step", "risk", "group"], as_index=False)["value"].sum()


def instance_effects(geffects: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per (step, instance): removal and retention PG-effects, plus ``weight`` when recorded
    (rows of kind "instance_weight", or a ``weight`` column on instance rows)."""
    if geffects is None:
        return None
    inst = geffects[geffects["kind"] == "instance"]
    if inst.empty or "instance" not in inst.columns:
        return None
    wide = inst.pivot_table(index=["step", "instance"], columns="risk", values="value", aggfunc="sum")
    wide = wide.reset_index()
    for r in ("removal", "retention"):
        if r not in wide.columns:
            wide[r] = np.nan
    weights = None
    if "weight" in inst.columns and inst["weight"].notna().any():
        weights = inst.groupby(["step", "instance"])["weight"].first()
    wr = geffects[geffects["kind"] == "instance_weight"]
    if not wr.empty:
        weights = wr.groupby(["step", "instance"])["value"].first()
    if weights is not None:
        wide = wide.merge(weights.rename("weight").reset_index(), on=["step", "instance"], how="left")
    return wide


NPO_FAMILY = re.compile(r"^(npo|tnpo|wtnpo)\b")   # the forget terms whose weight is NPO's (token-)weighting


def ga_effect_by_weight(geffects: pd.DataFrame | None, bins: int = 6) -> pd.DataFrame | None:
    """The paper's Fig. 5(b): each forget instance's unweighted GA PG-effect (rows of kind
    ``runs.INSTANCE_GA_KIND``, ∇R·∇log π(y_i|x_i) summed over the instance's tokens) against the
    objective's weight of that instance at the same step (kind ``runs.INSTANCE_WEIGHT_KIND``),
    pooled over the recorded steps and binned by weight into ``bins`` equal-width bins over the
    observed range (the last bin closed). One row per (term, risk, non-empty bin): ``term`` (the
    weighted forget term's label), ``risk``, ``lo``/``hi`` (bin edges), ``mid``, ``n`` (instance-steps),
    ``mean`` and ``sem`` (standard error of the mean; NaN for one value) of the PG-effect.
    None when the table has no weight rows or no unweighted GA rows."""
    from rayunlearn.runs import INSTANCE_GA_KIND, INSTANCE_WEIGHT_KIND

    if geffects is None or bins < 1:
        return None
    w = geffects[geffects["kind"] == INSTANCE_WEIGHT_KIND][["step", "instance", "term", "value"]]
    ga = geffects[geffects["kind"] == INSTANCE_GA_KIND][["step", "instance", "risk", "value"]]
    if w.empty or ga.empty:
        return None
    joined = ga.rename(columns={"value": "effect"}).merge(w.rename(columns={"value": "weight"}),
                                                           on=["step", "instance"], how="inner")
    rows = []
    for term, sub in joined.groupby("term", sort=True):
        lo, hi = float(sub["weight"].min()), float(sub["weight"].max())
        edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.array([lo, hi])
        # the bin of each weight: right-open bins, the last closed (np.digitize against the inner edges)
        idx = np.digitize(sub["weight"].to_numpy(float), edges[1:-1], right=False)
        for risk, by_risk in sub.assign(bin=idx).groupby("risk", sort=True):
            for b, g in by_risk.groupby("bin", sort=True):
                e = g["effect"].to_numpy(float)
                rows.append({"term": term, "risk": risk, "lo": float(edges[b]), "hi": float(edges[b + 1]),
                             "mid": float((edges[b] + edges[b + 1]) / 2), "n": int(e.size),
                             "mean": float(e.mean()),
                             "sem": float(e.std(ddof=1) / math.sqrt(e.size)) if e.size > 1 else math.nan})
    return pd.DataFrame(rows) if rows else None


def in_loop_trajectory(tr: pd.DataFrame | None) -> pd.DataFrame | None:
    """A trajectory.jsonl frame when it is a curve, else None: a run that evaluated only at the
    end (``unlearn.eval.every = 0``, the demo's study) has one row, the final evaluation, which the
    results tables already show."""
    return tr if tr is not None and len(tr) >= 2 else None


def trajectory_utility(tr: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Model utility along a trajectory.jsonl frame as two separately named series: ``same_terms``
    (step, value) = the six non-ROUGE terms at every evaluation (``model_utility_no_rouge``; an
    in-loop evaluation has no generation, so this is the one curve its points and the final
    evaluation share), and ``full`` (step, value) = ``model_utility`` of the evaluations that had
    all nine terms (the final one). Files written before ``model_utility_no_rouge`` existed give
    their in-loop rows (``model_utility_terms`` = 6) as ``same_terms``."""
    from rayunlearn.eval.evaluate import NO_ROUGE_UTILITY_TERMS, UTILITY_SPLITS

    n_fast = len(UTILITY_SPLITS) * len(NO_ROUGE_UTILITY_TERMS)
    empty = pd.DataFrame({"step": [], "value": []})
    if "model_utility" not in tr.columns:
        return empty, empty
    terms = tr["model_utility_terms"] if "model_utility_terms" in tr.columns else pd.Series(math.nan, index=tr.index)
    with_rouge = terms.to_numpy(float) > n_fast
    if "model_utility_no_rouge" in tr.columns:
        same = tr[["step", "model_utility_no_rouge"]].rename(columns={"model_utility_no_rouge": "value"})
    else:
        same = tr.loc[~with_rouge, ["step", "model_utility"]].rename(columns={"model_utility": "value"})
    full = tr.loc[with_rouge, ["step", "model_utility"]].rename(columns={"model_utility": "value"})
    return same.dropna().reset_index(drop=True), full.dropna().reset_index(drop=True)


# ----------------------------------------------------------------------------- results table
TABLE_COLUMNS = [
    ("removal", ("removal",), "removal (sel)"),
    ("removal_report", ("removal_report",), "removal (report)"),
    ("forget_quality", ("forget_quality",), "FQ"),
    ("ks_statistic", ("ks_statistic",), "KS"),
    ("ks_n", ("ks_n",), "n"),
    ("model_utility", ("model_utility",), "MU"),
    *[(f"{s}.{m}", (s, m), f"{sh} {mh}") for s, sh in (("retain", "Ret"), ("real_authors", "RA"), ("world_facts", "WF"))
      for m, mh in (("prob", "prob"), ("rouge", "ROUGE"), ("truth_ratio", "TR"))],
    ("forget.prob", ("forget", "prob"), "Fgt prob"),
    ("forget.rouge", ("forget", "rouge"), "Fgt ROUGE"),
    ("forget.truth_ratio", ("forget", "truth_ratio"), "Fgt TR"),
    ("forget.extraction_strength", ("forget", "extraction_strength"), "ES"),
    ("mia.privleak", ("mia", "privleak"), "privleak"),
]
EFFECT_COLUMNS = [("cum_lr_removal", "Σlr·e_u"), ("cum_lr_retention", "Σlr·e_r"),
                  ("sum_removal", "Σe_u"), ("sum_retention", "Σe_r")]


PREDICTIONS = {"realised": "predicted_{risk}_change_realised",   # -∇R·(θ_t − θ_{t+1}): any optimiser
               "sgd": "predicted_{risk}_change"}                  # -lr·∇R·∇L: plain gradient descent only


def fidelity_stats(steps: pd.DataFrame | None, prediction: str = "realised") -> dict[str, dict] | None:
    """How well a first-order prediction of the probe-risk change matches the measured change over
    the same step, per risk: ``median_ratio`` = median of measured / predicted over steps with a
    finite, non-zero prediction (1 = exact), ``sign_agreement`` = fraction of those steps where
    both have the same sign, ``n`` = how many steps. None when the columns are absent."""
    if steps is None:
        return None
    out = {}
    for risk in ("removal", "retention"):
        pcol, mcol = PREDICTIONS[prediction].format(risk=risk), f"measured_{risk}_change"
        if pcol not in steps.columns or mcol not in steps.columns:
            return None
        pred, meas = steps[pcol].to_numpy(float), steps[mcol].to_numpy(float)
        ok = np.isfinite(pred) & np.isfinite(meas) & (pred != 0)
        n = int(ok.sum())
        out[risk] = {"median_ratio": float(np.median(meas[ok] / pred[ok])) if n else math.nan,
                     "sign_agreement": float(np.mean(np.sign(meas[ok]) == np.sign(pred[ok]))) if n else math.nan,
                     "n": n}
    return out


def _metric_from_dict(m: dict, path):
    from rayunlearn.report.data import as_float, get_path

    v = get_path(m, path)
    if path[-1] == "ks_n":
        return v
    return as_float(v, ".".join(path))


def results_table(coll: Collection, trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per completed trial (plus the target / retain references): the paper's metrics
    and the cumulative removal / retention G-effects."""
    trials = coll.completed if trials is None else trials
    rows = []
    for which in ("target", "retain"):
        if which in coll.reference:
            r = {"trial_id": f"({which} model)", "family": "reference", "method": f"{which} model",
                 "removal": coll.reference[which]["removal"], "retention": coll.reference[which]["retention"]}
            for key, path, _ in TABLE_COLUMNS:
                r[key] = _metric_from_dict(coll.reference[which], path)
            rows.append(r)
    for _, t in trials.iterrows():
        r = {"trial_id": t["trial_id"], "family": t["family"], "method": trial_label(t, coll.hp_columns),
             "removal": float(t["removal"]), "retention": float(t["retention"])}
        for key, path, _ in TABLE_COLUMNS:
            r[key] = coll.metric(t, path)
        r.update(cumulative_effects(coll.steps(t["trial_id"])))
        rows.append(r)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- importance
def infer_distribution(values: pd.Series):
    """An Optuna distribution covering the observed values (None when the column is constant)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    v = values.dropna()
    if v.nunique() < 2:
        return None
    if pd.api.types.is_bool_dtype(v) or not pd.api.types.is_numeric_dtype(v):
        return CategoricalDistribution(sorted(map(str, v.unique())))
    lo, hi = float(v.min()), float(v.max())
    if pd.api.types.is_integer_dtype(v) or all(float(x).is_integer() for x in v):
        if pd.api.types.is_integer_dtype(v):
            return IntDistribution(int(lo), int(hi))
    log = lo > 0 and hi / lo > 100
    return FloatDistribution(lo, hi, log=log)


def hp_importance(trials: pd.DataFrame, hp_columns: list[str], min_trials: int = MIN_IMPORTANCE_TRIALS):
    """Importances of the hyper-parameters for removal and retention, from an in-memory Optuna
    study rebuilt from ``trials`` (completed trials of one family). Returns
    ``(evaluator name, {"removal": {param: imp}, "retention": {...}})`` or a string saying why not."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if len(trials) < min_trials:
        return f"{len(trials)} completed trial(s) (< {min_trials})"
    dists = {}
    for c in hp_columns:
        d = infer_distribution(trials[c])
        if d is not None and trials[c].notna().all():
            dists[c[3:]] = (c, d)
    if not dists:
        return "no hyper-parameter varies across its trials"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    for _, t in trials.iterrows():
        params = {}
        for name, (col, d) in dists.items():
            v = t[col]
            params[name] = str(v) if isinstance(d, CategoricalDistribution) else (
                int(v) if isinstance(d, IntDistribution) else float(v))
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: d for k, (_, d) in dists.items()},
                                                  values=[float(t["removal"]), float(t["retention"])]))
    try:
        import sklearn  # noqa: F401

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        sign = 1.0
    except ImportError:
        # PED-ANOVA explains *low* target values: negate the maximised objectives. It compares the
        # top quantile's parameter distribution with all trials': keep at least 4 trials in it
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=max(0.1, min(0.5, 4.0 / len(trials))))
        sign = -1.0
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, obj in enumerate(("removal", "retention")):
            try:
                imp = optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                              target=lambda ft, i=i: sign * ft.values[i])
            except Exception as exc:  # an evaluator failing on degenerate data is not fatal
                return f"Optuna's {type(evaluator).__name__} failed: {exc}"
            out[obj] = {k: float(v) for k, v in imp.items()}
    return type(evaluator).__name__, out


# ----------------------------------------------------------------------------- log.jsonl stats
INV_P_PATTERNS = (r"inv_?p", r"1/p", r"inv(erse)?_?prob", r"inverse_?p")
NPO_WEIGHT_PATTERNS = (r"npo.*weight", r"weight.*npo", r"^stat\.(w|weight)(_mean)?$", r"npo.*\bw\b")


def find_stat(log: pd.DataFrame | None, patterns, prefer: str = "") -> str | None:
    """The first ``stat.*`` column of ``log`` matching one of ``patterns`` (case-insensitive);
    columns containing ``prefer`` and "mean" rank first."""
    if log is None:
        return None
    cols = [c for c in log.columns if c.startswith("stat.")]
    hits = [c for c in cols if any(re.search(p, c.lower()) for p in patterns)]
    if not hits:
        return None
    hits.sort(key=lambda c: (prefer not in c.lower(), "mean" not in c.lower(), c))
    return hits[0]


def require_columns(df: pd.DataFrame, cols, where: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ReportDataError(f"{where}: missing column(s) {missing}")
