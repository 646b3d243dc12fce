"""Removal scores: what a sweep's ``removal`` objective measures, chosen by name
(``eval.removal_score``; in a search space ``unlearn.eval.removal_score``). Every score is
oriented *higher = better removal* (the sweep maximises it) and is computed on a set of forget
items (a part of the held-out split, ``rayunlearn.eval.heldout``).

Two questions, two families (docs/spec/TOFU_METRICS.md):

* **indistinguishable from the retain model** (TOFU's goal: the unlearned model should look like
  a model that never saw the forget authors) — compares the per-item forget truth ratios R with
  the retain model's on the same items:

  - ``forget_quality``: TOFU's KS p-value. Discrete (values of p(D = k/n)), uniform on [0, 1]
    between two samples of one distribution, not monotone in forgetting: report it, do not
    select on it.
  - ``ks_closeness``: 1 − D, D the KS statistic. Moves in steps of 1/n.
  - ``tr_closeness`` (the default): exp(−W₁), W₁ the 1-Wasserstein distance between the
    empirical distributions of log R of the model and of the retain model. Continuous in every
    item's losses; 1 exactly when the two distributions are equal; e.g. 0.5 when log R is off
    by ln 2 on average (a truth ratio off by a factor 2).

* **full removal** (the G-effect paper's view: the forget answers should become unlikely):

  - ``nll_rise``: mean per-token NLL of the forget answers minus the target model's on the same
    items (nats; 0 = the target, > 0 = forgotten). Strictly increasing as any forget answer's
    probability falls; unbounded, and it rewards over-unlearning.
  - ``es_removal``: 1 − mean extraction strength (1 = no answer can be completed from any
    prefix). Non-decreasing in forgetting, piecewise constant.
  - ``prob_removal``: 1 − mean forget probability P̄(a). Strictly increasing as any forget
    answer's probability falls; needs no reference (the fallback when a score's reference is
    missing, named in ``removal_kind``).

* **privacy** — ``privleak_closeness``: 1 − |privleak|/100, privleak (MUSE) from the Min-K%
  AUC of these forget items against the holdout items, relative to the retain model's AUC on
  the same items. 1 = exactly the retain model's membership leakage; under- and over-unlearning
  both lower it (a target model ≈ 0). Rank-based (an AUC), so not continuous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from rayunlearn.eval import metrics as M
from rayunlearn.registry import UnknownNameError

RETAIN, TARGET, MIA = "retain", "target", "mia"   # what a score needs besides the model's raw
DEFAULT_SCORE = "tr_closeness"
FALLBACK_SCORE = "prob_removal"
INDISTINGUISHABLE = "indistinguishable from the retain model"   # needs nothing: used (and named) when a reference is missing


@dataclass(frozen=True)
class ScoreInputs:
    """Per-item arrays of one set of forget items (the model's, the references' on the same
    items) and the holdout items' membership scores."""

    truth_ratio: np.ndarray
    avg_nll: np.ndarray
    extraction_strength: np.ndarray
    mink: Optional[np.ndarray] = None                 # Min-K% of these forget items (model)
    holdout_mink: Optional[np.ndarray] = None         # Min-K% of the holdout items (model)
    retain_truth_ratio: Optional[np.ndarray] = None
    retain_mink: Optional[np.ndarray] = None
    retain_holdout_mink: Optional[np.ndarray] = None
    target_avg_nll: Optional[np.ndarray] = None

    def has(self, need: str) -> bool:
        if need == RETAIN:
            return self.retain_truth_ratio is not None
        if need == TARGET:
            return self.target_avg_nll is not None
        return all(x is not None for x in (self.mink, self.holdout_mink, self.retain_mink, self.retain_holdout_mink))


@dataclass(frozen=True)
class RemovalScore:
    name: str
    family: str                 # "indistinguishable from the retain model", "full removal" or "privacy"
    needs: tuple[str, ...]
    continuous: bool            # changes with any small change of one item's losses
    fn: Callable[[ScoreInputs], Optional[float]]


def _w1_log(a, b) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(np.log(a), np.log(b)))


def _privleak(x: ScoreInputs) -> Optional[float]:
    auc = M.roc_auc(x.mink, x.holdout_mink)
    auc_retain = M.roc_auc(x.retain_mink, x.retain_holdout_mink)
    return M.privleak(auc, auc_retain)


def _privleak_closeness(x: ScoreInputs) -> Optional[float]:
    pl = _privleak(x)
    return None if pl is None else 1.0 - abs(pl) / 100.0


REMOVAL_SCORES: dict[str, RemovalScore] = {s.name: s for s in (
    RemovalScore("tr_closeness", INDISTINGUISHABLE, (RETAIN,), True,
                 lambda x: float(np.exp(-_w1_log(x.truth_ratio, x.retain_truth_ratio)))),
    RemovalScore("ks_closeness", INDISTINGUISHABLE, (RETAIN,), False,
                 lambda x: 1.0 - M.forget_quality(x.truth_ratio, x.retain_truth_ratio)["statistic"]),
    RemovalScore("forget_quality", INDISTINGUISHABLE, (RETAIN,), False,
                 lambda x: M.forget_quality(x.truth_ratio, x.retain_truth_ratio)["pvalue"]),
    RemovalScore("nll_rise", "full removal", (TARGET,), True,
                 lambda x: float(np.mean(x.avg_nll) - np.mean(x.target_avg_nll))),
    RemovalScore("es_removal", "full removal", (), False,
                 lambda x: 1.0 - float(np.mean(x.extraction_strength))),
    RemovalScore("prob_removal", "full removal", (), True,
                 lambda x: 1.0 - M.answer_prob(x.avg_nll)),
    RemovalScore("privleak_closeness", "privacy", (RETAIN, MIA), False,
                 _privleak_closeness),
)}


def check_score_name(name: str, where: str = "removal_score") -> RemovalScore:
    """The score called ``name``; a clear error listing the valid names otherwise."""
    if name not in REMOVAL_SCORES:
        families: dict[str, list[str]] = {}
        for s in REMOVAL_SCORES.values():
            families.setdefault(s.family, []).append(s.name)
        valid = "; ".join(f"{fam}: {', '.join(names)}" for fam, names in families.items())
        raise UnknownNameError(f"{where}: unknown removal score {name!r}; valid ({valid}) — rayunlearn/eval/scores.py "
                          f"documents each")
    return REMOVAL_SCORES[name]


def score_inputs(raw: dict, items, reference_raw: Optional[dict] = None,
                 target_raw: Optional[dict] = None) -> ScoreInputs:
    """The :class:`ScoreInputs` of forget items ``items`` (indices) from raw per-item arrays
    (``raw.json``'s layout) of the model and of the retain / target references. The references
    hold the same items in the same order (their fingerprints' split hashes are equal)."""
    idx = np.asarray(list(items), dtype=np.int64)
    f = raw["forget"]

    def take(d, key):
        return np.asarray(d[key], dtype=np.float64)[idx]

    def mink(r):
        if r is None or "mia" not in r["forget"] or "holdout" not in r or "mia" not in r["holdout"]:
            return None, None
        return take(r["forget"]["mia"], "mink"), np.asarray(r["holdout"]["mia"]["mink"], dtype=np.float64)

    m, hm = mink(raw)
    rm, rhm = mink(reference_raw)
    return ScoreInputs(truth_ratio=take(f, "truth_ratio"), avg_nll=take(f, "avg_gt_loss"),
                       extraction_strength=take(f, "extraction_strength"), mink=m, holdout_mink=hm,
                       retain_truth_ratio=take(reference_raw["forget"], "truth_ratio") if reference_raw else None,
                       retain_mink=rm, retain_holdout_mink=rhm,
                       target_avg_nll=take(target_raw["forget"], "avg_gt_loss") if target_raw else None)


def part_scores(x: ScoreInputs) -> dict:
    """Every removal score of one set of forget items (None where its reference is missing),
    with the KS statistic, privleak and the number of items behind them."""
    out: dict = {name: (s.fn(x) if all(x.has(n) for n in s.needs) else None) for name, s in REMOVAL_SCORES.items()}
    out["ks_statistic"] = (M.forget_quality(x.truth_ratio, x.retain_truth_ratio)["statistic"]
                           if x.has(RETAIN) else None)
    out["privleak"] = _privleak(x) if x.has(RETAIN) and x.has(MIA) else None
    out["n_items"] = int(x.truth_ratio.size)
    return out


def removal_kind(name: str, scores: dict) -> str:
    """The score the ``removal`` objective holds: ``name``, or the reference-free fallback when
    ``name`` could not be computed (its reference is missing)."""
    return name if scores.get(name) is not None else FALLBACK_SCORE
