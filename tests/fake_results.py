"""Fake-but-schema-true results directories for the report tests (docs/ARCHITECTURE.md layout).

`make_fake_results(root)` writes ``root/study`` (the paper's ten methods at default
hyper-parameters, one trial each, family = method string) and ``root/sweep`` (an Optuna sweep
over wga+kl and npo+kl with one failed trial; G-effects recorded for only some trials).
Numbers are built to show the paper's claims (docs/spec/GEFFECT.md, claims 1-6):
GA removal < 0 at every step with retention strongly negative; GA's mean 1/p grows; NPO weights
start at 1 and shrink and its G-effects are ~10x smaller than GA's; WGA/TNPO retention ~ 0;
shallow > middle > deep per layer, embedding ~1%; the KL term's own retention G-effect is the
largest of the regularisers'. Regularised runs split each step's total into the forget term's share
(steps.parquet ``*_forget_terms``, term rows) and the regulariser's. GA's removal cosine is −1 (the
probe is its batch: e_u ≤ 0 by construction) unless ``ga_cosine`` says otherwise.
``claim1_holds=False`` makes GA's removal G-effect positive at two recorded steps.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayunlearn.io import append_jsonl, write_json, write_parquet

PAPER_METHODS = ["ga", "ga+gd", "ga+kl", "npo", "npo+kl", "wga+kl", "tnpo+kl", "wtnpo+kl", "po+kl", "rmu+kl"]
# the demo study's families: the paper's methods, the unregularised weighted objectives (with the
# paper's plotted settings) and the third regulariser
STUDY_METHODS = PAPER_METHODS + ["wga", "tnpo", "wtnpo", "wga(alpha=0.5)", "tnpo(beta=1)", "ga+rr"]
NEAR_ZERO_RETENTION = {"wga", "tnpo", "wtnpo", "wga+kl", "tnpo+kl", "wtnpo+kl", "wga(alpha=0.5)", "tnpo(beta=1)"}
REG_REPAIR = {"gd": 1.5, "kl": 3.0, "rr": 0.5}   # the regulariser term's own retention G-effect (× growth)
N_LAYERS = 6
GROUP_SHARE = {"embed": 0.01, "shallow": 0.46, "middle": 0.30, "deep": 0.14, "lm": 0.08, "norm": 0.01}
INV_P_KEY = "stat.ga.inv_p_mean"  # rayunlearn/objectives/forget.py stats, logged as stat.<label>.<name>
NPO_WEIGHT_KEY = "stat.npo.weight_mean"

# (removal scale, retention scale, growth per recorded step, model utility, forget prob)
PROFILES = {
    "ga": (-5.0, -4.0, 0.40, 0.20, 0.02),
    "ga+gd": (-4.5, -2.5, 0.30, 0.35, 0.03),
    "ga+kl": (-4.5, -0.8, 0.30, 0.45, 0.04),
    "ga+rr": (-4.5, -3.5, 0.30, 0.30, 0.03),
    "npo": (-0.5, -0.3, -0.15, 0.40, 0.10),
    "npo+kl": (-0.45, -0.15, -0.15, 0.48, 0.12),
    "wga+kl": (-1.5, 0.02, 0.0, 0.55, 0.15),
    "wga": (-1.6, 0.02, 0.0, 0.50, 0.12),
    "wga(alpha=0.5)": (-1.8, 0.02, 0.0, 0.48, 0.10),
    "tnpo": (-1.3, 0.02, 0.0, 0.50, 0.12),
    "tnpo(beta=1)": (-1.4, 0.02, 0.0, 0.49, 0.11),
    "wtnpo": (-1.1, 0.02, 0.0, 0.52, 0.15),
    "tnpo+kl": (-1.2, -0.03, 0.0, 0.53, 0.14),
    "wtnpo+kl": (-1.0, 0.01, 0.0, 0.56, 0.18),
    "po+kl": (-0.6, -0.2, 0.0, 0.50, 0.30),
    "rmu+kl": (-0.8, -0.25, 0.0, 0.47, 0.20),
}


def _params():
    """(name, layer, group) of a tiny 6-block Llama-like model (untied embeddings)."""
    out = [("model.embed_tokens.weight", -1, "embed")]
    for i in range(N_LAYERS):
        g = "shallow" if i < 2 else ("middle" if i < 4 else "deep")
        for p in ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight"):
            out.append((f"model.layers.{i}.{p}", i, g))
    out += [("model.norm.weight", -1, "norm"), ("lm_head.weight", -1, "lm")]
    return out


def metrics_dict(mu: float, forget_prob: float, rng, step: int) -> dict:
    """A metrics.json with plausible numbers; removal = 1 - forget prob (prob_removal) on the
    selection part, 0.98 x that on the report part, retention = utility."""
    part = lambda base: {"prob": base, "rouge": min(1.0, base + 0.1), "truth_ratio": min(1.0, base + 0.05)}
    fq = float(10 ** (-6 + 5 * (1 - forget_prob)))
    return {
        "fingerprint": {"template": "fake", "split": "forget05"},
        "step": step,
        "removal": 1.0 - forget_prob,
        "removal_report": 0.98 * (1.0 - forget_prob),   # the held-out authors: a little worse
        "removal_kind": "prob_removal",
        "retention": mu,
        "forget_quality": min(fq, 1.0),
        "ks_statistic": 0.1 + forget_prob,
        "ks_n": [40, 40],
        "model_utility": mu,
        "forget": {"prob": forget_prob, "rouge": forget_prob + 0.1, "truth_ratio": 0.6 - forget_prob,
                   "extraction_strength": forget_prob / 2, "exact_memorization": forget_prob + 0.2},
        "retain": part(mu + 0.1), "real_authors": part(mu), "world_facts": part(mu + 0.05),
        "mia": {"loss_auc": 0.5, "zlib_auc": 0.5, "mink_auc": 0.5, "minkpp_auc": 0.5,
                "privleak": float(rng.normal(0, 5))},
    }


def write_trial(coll: Path, trial_id: str, family: str, method: str, *, n_recorded: int = 6, every: int = 2,
                claim1_holds: bool = True, ga_cosine: float = -1.0, effects: bool = True, rng=None,
                scale: float = 1.0,
                mu: float | None = None, forget_prob: float | None = None) -> dict:
    """Write one trial's files; returns its metrics dict."""
    rng = rng or np.random.default_rng(0)
    rem0, ret0, growth, mu0, fp0 = PROFILES.get(family, PROFILES["ga+kl"])
    mu = mu0 if mu is None else mu
    forget_prob = fp0 if forget_prob is None else forget_prob
    tdir = coll / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "config.yaml").write_text(f"method: {method}\n")
    n_steps = n_recorded * every
    lr = lambda s: 1e-3 * min(s / 3, 1.0) * (1 - (s - 1) / (n_steps + 1))
    for s in range(1, n_steps + 1):
        rec = {"step": s, "epoch": (s - 1) // 4, "lr": lr(s), "loss": -0.5 * s}
        for t in method.split("+"):
            rec[f"term.{t}"] = 0.1 * s
        if family.startswith("ga"):
            rec[INV_P_KEY] = 1.5 * math.exp(0.25 * s)
        if family.startswith("npo"):
            rec[NPO_WEIGHT_KEY] = math.exp(-0.08 * (s - 1))
        append_jsonl(tdir / "log.jsonl", rec)
    steps = [every * (k + 1) for k in range(n_recorded)]
    for k, s in enumerate(steps):
        frac = (k + 1) / n_recorded
        m = metrics_dict(mu + (1 - frac) * 0.2, forget_prob + (1 - frac) * 0.5, rng, s)
        append_jsonl(tdir / "trajectory.jsonl", {"step": s, **{k2: v for k2, v in m.items()
                                                                  if not isinstance(v, (dict, list))}})
    metrics = metrics_dict(mu, forget_prob, rng, n_steps)
    write_json(tdir / "metrics.json", metrics)
    if not effects:
        return metrics
    srows = {c: [] for c in ("trial_id", "method", "step", "lr", "removal", "retention", "removal_adam",
                             "retention_adam", "cosine_removal", "cosine_retention", "predicted_removal_change",
                             "measured_removal_change", "predicted_retention_change",
                             "measured_retention_change", "risk_removal", "risk_retention",
                             "removal_forget_terms", "retention_forget_terms")}
    g = {c: [] for c in ("trial_id", "method", "step", "risk", "parameter", "layer", "group", "kind", "term",
                         "instance", "value", "estimator")}

    def grow(k):
        return math.exp(growth * k)

    def add(step, risk, parameter, layer, group, kind, term, instance, value):
        for est, scale_ in (("exact", 1.0), ("adam", 0.7)):  # the report must keep the exact rows only
            for c, v in zip(g, (trial_id, method, step, risk, parameter, layer, group, kind, term, instance,
                                float(value) * scale_, est)):
                g[c].append(v)

    params = _params()
    labels = [re.sub(r"^[\d.]+\*", "", t).split("(")[0] for t in method.split("+")]   # term labels
    risk_r, risk_u = 1.0, 1.0
    for k, s in enumerate(steps):
        e_u = scale * rem0 * grow(k) * (1 + 0.05 * rng.standard_normal())
        if family in NEAR_ZERO_RETENTION:
            e_r = scale * 0.02 * rng.standard_normal()
        else:
            e_r = scale * ret0 * grow(k) * (1 + 0.05 * rng.standard_normal())
        if family == "ga" and not claim1_holds and k in (1, 3):
            e_u = abs(e_u)
        pred_u, pred_r = -lr(s) * e_u, -lr(s) * e_r
        risk_u += pred_u
        risk_r += pred_r
        # the regulariser's share: a small positive removal effect, and retention repair (GA runs)
        reg = labels[1] if len(labels) > 1 else None
        reg_u = 0.05 * abs(e_u) if reg else 0.0
        reg_r = (REG_REPAIR[reg] * scale * grow(k) if family.startswith("ga+") else 0.1 * abs(e_r)) if reg else 0.0
        shares = {"removal": (e_u - reg_u, reg_u), "retention": (e_r - reg_r, reg_r)}
        cos_u = ga_cosine if family == "ga" else -0.3
        for c, v in zip(srows, (trial_id, method, s, lr(s), e_u, e_r, 0.7 * e_u, 0.7 * e_r, cos_u, -0.1,
                                pred_u, pred_u * (1 + 0.1 * rng.standard_normal()), pred_r,
                                pred_r * (1 + 0.1 * rng.standard_normal()), risk_u, risk_r,
                                shares["removal"][0], shares["retention"][0])):
            srows[c].append(v)
        for risk, total in (("removal", e_u), ("retention", e_r)):
            add(s, risk, "", -1, "", "total", "", -1, total)
            for grp, share in GROUP_SHARE.items():
                members = [p for p in params if p[2] == grp]
                for name, layer, _ in members:
                    add(s, risk, name, layer, grp, "parameter", "", -1, total * share / len(members))
            for label, value in zip(labels, shares[risk]):
                add(s, risk, "", -1, "", "term", label, -1, value)
            w = rng.dirichlet(np.ones(4))
            for i in range(4):
                add(s, risk, "", -1, "", "instance", "", 10 + i, total * w[i])
        if family.startswith("npo"):
            for i in range(4):
                weight = math.exp(-0.1 * k * (1 + i / 4))
                add(s, "", "", -1, "", "instance_weight", labels[0], 10 + i, weight)
                # the unweighted GA PG-effect: larger where NPO gives a smaller weight (Fig. 5(b))
                add(s, "removal", "", -1, "", "instance_ga_unweighted", "", 10 + i, -scale * (2.0 - weight))
                add(s, "retention", "", -1, "", "instance_ga_unweighted", "", 10 + i, -0.1 * scale * (2.0 - weight))
    edir = coll / "effects" / trial_id
    write_parquet(edir / "steps.parquet", pa.table(srows))
    write_parquet(edir / "geffects.parquet", pa.table(g))
    return metrics


def _trials_table(rows: list[dict], path: Path) -> None:
    cols = sorted({k for r in rows for k in r}, key=lambda c: (c not in ("trial_id", "family", "method", "status",
                                                                         "error", "time_s"), c))
    write_parquet(path, pa.table({c: [r.get(c) for r in rows] for c in cols}))


def _flat(m: dict) -> dict:
    out = {}
    for k, v in m.items():
        if isinstance(v, dict) and k != "fingerprint":
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = v2
        elif isinstance(v, (int, float)) and k != "step":
            out[k] = v
    return out


def write_references(coll: Path, rng) -> None:
    write_json(coll / "reference" / "target.json", metrics_dict(0.62, 0.95, rng, 0) | {"forget_quality": 1e-8})
    write_json(coll / "reference" / "retain.json", metrics_dict(0.60, 0.12, rng, 0) | {"forget_quality": 1.0})


def make_fake_results(root: str | Path, *, claim1_holds: bool = True, ga_cosine: float = -1.0, sweep: bool = True,
                      seed: int = 0) -> Path:
    """Write a fake demo results directory (study + sweep) under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    study = root / "study"
    rows = []
    for i, fam in enumerate(STUDY_METHODS):
        tid = f"{i:03d}-{re.sub(r'[^a-z0-9.]+', '_', fam).strip('_')}"
        m = write_trial(study, tid, fam, fam, claim1_holds=claim1_holds, ga_cosine=ga_cosine, rng=rng)
        rows.append({"trial_id": tid, "family": fam, "method": fam, "status": "completed", "error": None,
                     "time_s": 10.0 + i, **_flat(m)})
    _trials_table(rows, study / "trials.parquet")
    write_references(study, rng)
    if sweep:
        sw = root / "sweep"
        rng = np.random.default_rng([seed, 1])   # its own stream: the study's trials do not shift it
        rows = []
        for i in range(7):
            alpha, klw = float(rng.uniform(0.1, 5)), float(rng.uniform(0.1, 2))
            mu, fp = 0.35 + 0.1 * klw + 0.005 * alpha, 0.05 + 0.04 * alpha   # retention mostly from klw
            tid = f"trial-{i:03d}"
            method = f"wga(alpha={alpha:.3g})+{klw:.3g}*kl"
            m = write_trial(sw, tid, "wga+kl", method, effects=i < 3, rng=rng, mu=mu, forget_prob=fp)
            rows.append({"trial_id": tid, "family": "wga+kl", "method": method, "status": "completed",
                         "error": None, "time_s": 5.0, "hp.alpha": alpha, "hp.kl_weight": klw, "hp.beta": None,
                         **_flat(m)})
        for i in range(7, 12):
            beta, klw = float(rng.uniform(0.05, 1)), float(rng.uniform(0.1, 2))
            mu, fp = 0.4 + 0.04 * klw, 0.3 - 0.2 * beta
            tid = f"trial-{i:03d}"
            method = f"npo(beta={beta:.3g})+{klw:.3g}*kl"
            m = write_trial(sw, tid, "npo+kl", method, effects=False, rng=rng, mu=mu, forget_prob=fp)
            rows.append({"trial_id": tid, "family": "npo+kl", "method": method, "status": "completed",
                         "error": None, "time_s": 5.0, "hp.alpha": None, "hp.kl_weight": klw, "hp.beta": beta,
                         **_flat(m)})
        rows.append({"trial_id": "trial-012", "family": "npo+kl", "method": "npo(beta=0.5)+1*kl",
                     "status": "error", "error": "RuntimeError: out of memory", "time_s": 1.0,
                     "hp.alpha": None, "hp.kl_weight": 1.0, "hp.beta": 0.5, "removal": float("nan"),
                     "retention": float("nan")})
        # more configurations of each family, from a stream of their own (the trials above keep
        # their values): hyper-parameter importance needs MIN_IMPORTANCE_TRIALS per family
        more = np.random.default_rng([seed, 2])
        for i in range(13, 21):
            tid = f"trial-{i:03d}"
            if i < 16:
                alpha, klw = float(more.uniform(0.1, 5)), float(more.uniform(0.1, 2))
                mu, fp = 0.35 + 0.1 * klw + 0.005 * alpha, 0.05 + 0.04 * alpha
                fam, method, hp = "wga+kl", f"wga(alpha={alpha:.3g})+{klw:.3g}*kl", {"hp.alpha": alpha, "hp.beta": None}
            else:
                beta, klw = float(more.uniform(0.05, 1)), float(more.uniform(0.1, 2))
                mu, fp = 0.4 + 0.04 * klw, 0.3 - 0.2 * beta
                fam, method, hp = "npo+kl", f"npo(beta={beta:.3g})+{klw:.3g}*kl", {"hp.alpha": None, "hp.beta": beta}
            m = write_trial(sw, tid, fam, method, effects=False, rng=more, mu=mu, forget_prob=fp)
            rows.append({"trial_id": tid, "family": fam, "method": method, "status": "completed", "error": None,
                         "time_s": 5.0, **hp, "hp.kl_weight": klw, **_flat(m)})
        _trials_table(rows, sw / "trials.parquet")
        write_references(sw, rng)
        write_json(sw / "pareto.json", {"objectives": ["removal", "retention"], "trials": [], "points": []})
    return root


# the small results directory of the interactive report's tests (tests/test_report_interactive.py,
# tests/test_report_browser.py): every extra the front can draw, with numbers easy to check by hand
SMALL_NOISE = {"removal": 0.02, "retention": 0.01, "replicates": 3}
SMALL_FLOOR = 0.9                 # sweep.yaml's retention_floor: 0.9 x the target's retention 0.6
SMALL_TARGET = {"removal": 0.05, "retention": 0.6}
SMALL_RETAIN = {"removal": 0.9, "retention": 0.58}
SMALL_COMPLETED = {"study": 4, "sweep": 5}


def make_small_results(root: str | Path) -> Path:
    """``root/study`` (four completed trials, one failed) and ``root/sweep`` (five completed trials
    of two families with seed standard deviations, one stopped early, one failed; G-effect steps for
    two trials; ``sweep.yaml`` sets the retention floor); references and the noise floor in
    ``root/reference``. Returns ``root``."""
    root = Path(root)
    write_json(root / "reference" / "target.json", SMALL_TARGET)
    write_json(root / "reference" / "retain.json", SMALL_RETAIN)
    write_json(root / "reference" / "noise.json", SMALL_NOISE)
    nan = float("nan")
    _trials_table([
        {"trial_id": "000-ga", "family": "ga", "method": "ga", "status": "completed", "removal": 0.95,
         "retention": 0.2},
        {"trial_id": "001-npo", "family": "npo", "method": "npo", "status": "completed", "removal": 0.7,
         "retention": 0.45},
        {"trial_id": "002-wga_kl", "family": "wga+kl", "method": "wga+kl", "status": "completed", "removal": 0.85,
         "retention": 0.5},
        {"trial_id": "003-ga_gd", "family": "ga+gd", "method": "ga+gd", "status": "completed", "removal": 0.6,
         "retention": 0.3},
        {"trial_id": "004-po_kl", "family": "po+kl", "method": "po+kl", "status": "error", "removal": nan,
         "retention": nan, "error": "RuntimeError: out of memory"},
    ], root / "study" / "trials.parquet")
    sweep = []
    for i, (alpha, rem, ret) in enumerate([(0.5, 0.8, 0.56), (1.0, 0.86, 0.55), (2.0, 0.9, 0.5), (4.0, 0.7, 0.4)]):
        sweep.append({"trial_id": f"trial-{i:03d}", "family": "wga+kl", "method": f"wga(alpha={alpha:g})+1*kl",
                      "status": "completed", "removal": rem, "retention": ret, "removal_sd": 0.01 * (i + 1),
                      "retention_sd": 0.005 * (i + 1), "n_seeds": 3, "feasible": ret >= SMALL_FLOOR * 0.6,
                      "hp.alpha": alpha, "hp.beta": None})
    sweep.append({"trial_id": "trial-004", "family": "npo+kl", "method": "npo(beta=0.2)+1*kl", "status": "completed",
                  "removal": 0.75, "retention": 0.52, "removal_sd": 0.03, "retention_sd": 0.02, "n_seeds": 3,
                  "feasible": False, "hp.alpha": None, "hp.beta": 0.2})
    sweep.append({"trial_id": "trial-005", "family": "npo+kl", "method": "npo(beta=0.9)+1*kl", "status": "stopped",
                  "stop_reason": "collapse: retention below the floor", "removal": 0.99, "retention": 0.1,
                  "removal_sd": nan, "retention_sd": nan, "n_seeds": 1, "feasible": False, "hp.alpha": None,
                  "hp.beta": 0.9})
    sweep.append({"trial_id": "trial-006", "family": "npo+kl", "method": "npo(beta=0.5)+1*kl", "status": "error",
                  "error": "RuntimeError: out of memory", "removal": nan, "retention": nan, "hp.alpha": None,
                  "hp.beta": 0.5})
    _trials_table(sweep, root / "sweep" / "trials.parquet")
    (root / "sweep" / "sweep.yaml").write_text(f"name: sweep\nretention_floor: {SMALL_FLOOR}\n")
    for tid, sign in (("trial-000", 1.0), ("trial-004", 0.5)):
        write_parquet(root / "sweep" / "effects" / tid / "steps.parquet", pa.table({
            "step": [2, 4, 6], "lr": [1e-3, 1e-3, 1e-3], "removal": [-1.0 * sign, -2.0 * sign, -3.0 * sign],
            "retention": [0.1 * sign, -0.2 * sign, 0.05 * sign]}))
    return root
