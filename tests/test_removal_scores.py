"""Removal scores (rayunlearn.eval.scores) and the held-out selection/report split by author
(rayunlearn.eval.heldout) on hand-made per-item numbers."""

import json
import math

import numpy as np
import pytest

from rayunlearn.config import ConfigError
from rayunlearn.eval import metrics as M
from rayunlearn.eval import scores as S
from rayunlearn.eval.evaluate import metrics_from_raw
from rayunlearn.eval.heldout import block_authors, item_authors, split_items

LN2 = math.log(2.0)


def inputs(**kw):
    base = dict(truth_ratio=np.ones(2), avg_nll=np.ones(2), extraction_strength=np.zeros(2))
    base.update({k: None if v is None else np.asarray(v, dtype=float) for k, v in kw.items()})
    return S.ScoreInputs(**base)


def score(name, **kw):
    return S.REMOVAL_SCORES[name].fn(inputs(**kw))


# ----------------------------------------------------------------------------- each score


def test_tr_closeness_is_exp_minus_w1_of_log_truth_ratios():
    # log R off by ln 2 on every item: W1 = ln 2, closeness 1/2
    assert score("tr_closeness", truth_ratio=[1.0, 1.0], retain_truth_ratio=[2.0, 2.0]) == pytest.approx(0.5, rel=1e-12)
    # W1 between {0, ln 4} and {ln 2, ln 2}: mean |x_(i) − y_(i)| = (ln2 + ln2)/2 = ln 2
    assert score("tr_closeness", truth_ratio=[1.0, 4.0], retain_truth_ratio=[2.0, 2.0]) == pytest.approx(0.5, rel=1e-12)
    assert score("tr_closeness", truth_ratio=[0.3, 3.0], retain_truth_ratio=[3.0, 0.3]) == 1.0


def test_ks_closeness_and_forget_quality():
    x = dict(truth_ratio=[1.0, 2.0, 3.0, 4.0], retain_truth_ratio=[3.0, 4.0, 5.0, 6.0])
    assert score("ks_closeness", **x) == pytest.approx(0.5)          # D = 2/4
    from scipy.stats import ks_2samp

    assert score("forget_quality", **x) == pytest.approx(ks_2samp([1, 2, 3, 4], [3, 4, 5, 6]).pvalue)


def test_full_removal_scores():
    assert score("nll_rise", avg_nll=[1.0, 2.0], target_avg_nll=[0.5, 0.5]) == pytest.approx(1.0)
    assert score("es_removal", extraction_strength=[0.25, 0.75]) == pytest.approx(0.5)
    # P̄ = 1/2 and 1/4: 1 − 3/8
    assert score("prob_removal", avg_nll=[LN2, 2 * LN2]) == pytest.approx(0.625, rel=1e-12)


def test_privleak_closeness():
    # the model: every forget item scores below every holdout item (AUC 0); the retain model:
    # AUC 1/2 (forget {1, 4} vs holdout {2, 3}) -> privleak = 100 * (1 − 0.5) / 0.5 = 100
    x = dict(mink=[1, 2], holdout_mink=[3, 4], retain_mink=[1, 4], retain_holdout_mink=[2, 3],
             retain_truth_ratio=[1, 1])
    assert score("privleak_closeness", **x) == pytest.approx(0.0)
    assert S.part_scores(inputs(**x))["privleak"] == pytest.approx(100.0)
    same = dict(x, mink=[1, 4], holdout_mink=[2, 3])
    assert score("privleak_closeness", **same) == pytest.approx(1.0)


def test_full_removal_scores_rise_as_a_forget_answer_becomes_less_likely():
    target = [0.5, 0.5, 0.5]
    nll_rise, prob = [], []
    for nll0 in (0.5, 0.6, 1.0, 3.0, 10.0):          # item 0's probability falls
        nll = [nll0, 0.7, 0.9]
        nll_rise.append(score("nll_rise", avg_nll=nll, target_avg_nll=target))
        prob.append(score("prob_removal", avg_nll=nll))
    assert np.all(np.diff(nll_rise) > 0) and np.all(np.diff(prob) > 0)
    assert nll_rise[0] == pytest.approx((0.5 + 0.7 + 0.9) / 3 - 0.5)
    es = [score("es_removal", extraction_strength=[e, 0.5]) for e in (1.0, 0.8, 0.8, 0.2, 0.0)]
    assert np.all(np.diff(es) >= 0) and es[-1] - es[0] == pytest.approx(0.5)


def test_closeness_is_continuous_where_the_ks_pvalue_is_not():
    rng = np.random.default_rng(0)
    model = np.exp(rng.normal(0.3, 1.0, 30))
    retain = np.exp(rng.normal(0.0, 1.0, 30))
    nudged = model.copy()
    nudged[0] *= math.exp(1e-3)           # log R of one item moves by 0.001: no order change
    for x in (model, nudged):
        assert not np.any(np.isin(x, retain))
    a = dict(truth_ratio=model, retain_truth_ratio=retain)
    b = dict(truth_ratio=nudged, retain_truth_ratio=retain)
    assert score("forget_quality", **a) == score("forget_quality", **b)
    assert score("ks_closeness", **a) == score("ks_closeness", **b)
    # W1 moves by exactly 0.001/30 (one of 30 order statistics moves by 0.001, on the far side)
    ta, tb = score("tr_closeness", **a), score("tr_closeness", **b)
    assert ta != tb and abs(math.log(ta) - math.log(tb)) == pytest.approx(1e-3 / 30, rel=1e-6)


def test_a_score_moves_with_a_small_change_of_one_item_exactly_when_declared_continuous():
    rng = np.random.default_rng(2)
    n = 30
    base = dict(truth_ratio=np.exp(rng.normal(0.3, 1, n)), avg_nll=rng.uniform(0.5, 3, n),
                extraction_strength=rng.uniform(0, 1, n), mink=rng.normal(0, 1, n), holdout_mink=rng.normal(0, 1, 25),
                retain_truth_ratio=np.exp(rng.normal(0, 1, n)), retain_mink=rng.normal(0, 1, n),
                retain_holdout_mink=rng.normal(0, 1, 25), target_avg_nll=rng.uniform(0.1, 1, n))
    nudged = {k: v.copy() for k, v in base.items()}
    nudged["truth_ratio"][0] *= math.exp(1e-6)       # one item's losses move by 1e-6 nats: no rank changes
    nudged["avg_nll"][0] += 1e-6
    nudged["mink"][0] -= 1e-6
    for name, s in S.REMOVAL_SCORES.items():
        a, b = s.fn(S.ScoreInputs(**base)), s.fn(S.ScoreInputs(**nudged))
        assert (a != b) == s.continuous, name


def test_scores_without_their_reference_are_none_and_removal_falls_back_to_prob_removal():
    got = S.part_scores(inputs())
    for name, s in S.REMOVAL_SCORES.items():
        assert (got[name] is None) == bool(s.needs), name
    assert got["prob_removal"] == pytest.approx(1 - math.exp(-1)) and got["n_items"] == 2
    assert S.removal_kind("tr_closeness", got) == "prob_removal"
    assert S.removal_kind("es_removal", got) == "es_removal"


def test_unknown_score_name_lists_the_valid_ones():
    from rayunlearn.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown removal score 'fq'.*tr_closeness.*nll_rise"):
        S.check_score_name("fq")
    from rayunlearn.config import EvalConfig, from_dict

    with pytest.raises(ConfigError, match="^removal_score: unknown"):
        from_dict(EvalConfig, {"removal_score": "fq"})


def test_search_space_validates_the_score_at_load():
    from rayunlearn.sweep.space import load_space

    space = load_space("demo_sweep", ["unlearn.eval.removal_score=nll_rise"])
    assert space.unlearn.eval.removal_score == "nll_rise"
    with pytest.raises(ConfigError, match="unlearn.eval.removal_score: unknown removal score 'forgetquality'"):
        load_space("demo_sweep", ["unlearn.eval.removal_score=forgetquality"])
    with pytest.raises(ConfigError, match="tr_closeness needs the prepared reference"):
        load_space("demo_sweep", ["prepare.reference_eval=false", "prepare.retain_replicates=1", "retention_floor=null"])
    assert load_space("demo_sweep", ["prepare.reference_eval=false", "prepare.retain_replicates=1", "retention_floor=null", "unlearn.eval.removal_score=es_removal"])
    with pytest.raises(ConfigError, match="needs membership-inference"):
        load_space("demo_sweep", ["unlearn.eval.mia=false", "unlearn.eval.removal_score=privleak_closeness"])


# ----------------------------------------------------------------------------- held-out split


def test_split_is_by_author_disjoint_and_stable():
    authors = [f"author-{i % 10}" for i in range(37)]          # interleaved, uneven item counts
    s = split_items(authors, 0.5, seed=0)
    sel = {authors[i] for i in s.selection}
    rep = {authors[i] for i in s.report}
    assert sel.isdisjoint(rep) and len(sel) == len(rep) == 5
    assert sorted(s.selection + s.report) == list(range(37))
    assert set(s.selection_authors) == sel and set(s.report_authors) == rep
    assert split_items(authors, 0.5, seed=0) == s                      # same seed: same split
    assert split_items(list(reversed(authors)), 0.5, seed=0).selection_authors == s.selection_authors
    # the seeded ranking is sha256("<seed>:<author>"): pinned so it never changes silently
    assert s.selection_authors == ("author-4", "author-6", "author-7", "author-8", "author-9")
    assert any(split_items(authors, 0.5, seed=k).selection_authors != s.selection_authors for k in range(1, 6))
    assert len(split_items(authors, 0.3, seed=0).selection_authors) == 3
    assert split_items(authors, 1.0, seed=0).report == ()


def test_tofu_authors_are_blocks_of_20():
    assert item_authors([{"question": "q"}] * 45) == block_authors(45)
    assert block_authors(45)[19] == "block-0" and block_authors(45)[20] == "block-1" and block_authors(45)[44] == "block-2"
    s = split_items(block_authors(60), 0.5, seed=3)
    for part in (s.selection, s.report):
        assert len(part) % 20 == 0 and all(i // 20 == part[k // 20 * 20] // 20 for k, i in enumerate(part))
    assert item_authors([{"author": "A"}, {"author": "B"}]) == ["A", "B"]


def test_one_author_has_no_report_part():
    s = split_items(["A", "A", "A"], 0.5, seed=0)
    assert s.selection == (0, 1, 2) and s.report == ()


def _raw(rng, n_forget: int, authors: list[str]) -> dict:
    def split(n, k=3):
        return {"avg_gt_loss": rng.uniform(0.2, 3, n).tolist(), "avg_paraphrased_loss": rng.uniform(0.2, 3, n).tolist(),
                "average_perturb_loss": rng.uniform(0.2, 3, (n, k)).tolist()}

    raw = {key: split(8) for key in ("retain", "real_authors", "world_facts")}
    f = split(n_forget)
    f["truth_ratio"] = M.truth_ratios(f["avg_paraphrased_loss"], f["average_perturb_loss"]).tolist()
    f["extraction_strength"] = rng.uniform(0, 1, n_forget).tolist()
    f["exact_memorization"] = rng.uniform(0, 1, n_forget).tolist()
    f["mia"] = {s: rng.normal(0, 1, n_forget).tolist() for s in ("loss", "zlib", "mink", "minkpp")}
    f["author"] = authors
    raw["forget"] = f
    raw["holdout"] = {"avg_gt_loss": rng.uniform(0.2, 3, 6).tolist(),
                      "mia": {s: rng.normal(0, 1, 6).tolist() for s in ("loss", "zlib", "mink", "minkpp")}}
    for key in ("retain", "real_authors", "world_facts"):
        raw[key]["truth_ratio"] = M.truth_ratios(raw[key]["avg_paraphrased_loss"], raw[key]["average_perturb_loss"]).tolist()
    return raw


def test_each_part_is_scored_on_its_own_items():
    rng = np.random.default_rng(1)
    authors = [f"a{i // 4}" for i in range(24)]                 # 6 authors x 4 items
    model, retain, target = (_raw(rng, 24, authors) for _ in range(3))
    fp = {"x": 1}
    ref = {"raw": retain, "mia": {"mink_auc": 0.6}}
    out = metrics_from_raw(model, fp, ref, target={"raw": target}, removal_score="nll_rise",
                           selection_fraction=0.5, selection_seed=7)
    held = out["heldout"]
    sel, rep = held["items"]["selection"], held["items"]["report"]
    assert {authors[i] for i in sel}.isdisjoint({authors[i] for i in rep}) and len(sel) == len(rep) == 12
    assert held["fraction"] == 0.5 and held["seed"] == 7
    for part, idx in (("selection", sel), ("report", rep)):
        got = out[part]
        tr = np.array(model["forget"]["truth_ratio"])[idx]
        rtr = np.array(retain["forget"]["truth_ratio"])[idx]
        ks = M.forget_quality(tr, rtr)
        assert got["forget_quality"] == ks["pvalue"] and got["ks_statistic"] == ks["statistic"]
        assert got["n_items"] == 12
        nll, tnll = np.array(model["forget"]["avg_gt_loss"])[idx], np.array(target["forget"]["avg_gt_loss"])[idx]
        assert got["nll_rise"] == pytest.approx(nll.mean() - tnll.mean(), rel=1e-12)
        assert got["prob_removal"] == pytest.approx(1 - M.answer_prob(nll), rel=1e-12)
        es = np.array(model["forget"]["extraction_strength"])[idx]
        assert got["es_removal"] == pytest.approx(1 - es.mean(), rel=1e-12)
        pl = M.privleak(M.roc_auc(np.array(model["forget"]["mia"]["mink"])[idx], model["holdout"]["mia"]["mink"]),
                        M.roc_auc(np.array(retain["forget"]["mia"]["mink"])[idx], retain["holdout"]["mia"]["mink"]))
        assert got["privleak"] == pytest.approx(pl, rel=1e-12)
        assert got["privleak_closeness"] == pytest.approx(1 - abs(pl) / 100, rel=1e-12)
    assert out["removal_kind"] == "nll_rise"
    assert out["removal"] == out["selection"]["nll_rise"] and out["removal_report"] == out["report"]["nll_rise"]
    # forget quality stays TOFU's number over every forget item
    full = M.forget_quality(model["forget"]["truth_ratio"], retain["forget"]["truth_ratio"])
    assert out["forget_quality"] == full["pvalue"] and out["ks_n"] == [24, 24]
    # another seed, another split; the same seed, the same numbers
    assert metrics_from_raw(model, fp, ref, target={"raw": target}, removal_score="nll_rise",
                            selection_seed=7)["removal"] == out["removal"]
    assert split_items(authors, 0.5, seed=8).selection != tuple(sel)
    assert metrics_from_raw(model, fp, ref, selection_seed=8)["heldout"]["items"]["selection"] == \
        list(split_items(authors, 0.5, seed=8).selection)


def test_a_trial_gets_the_score_settings_and_the_target_reference(tmp_path):
    from rayunlearn import runs
    from rayunlearn.config import to_dict
    from rayunlearn.io import write_json
    from rayunlearn.sweep.space import load_space
    from rayunlearn.sweep.trial import TrialContext, trial_config

    space = load_space("demo_sweep", [f"results={tmp_path}", "unlearn.eval.removal_score=nll_rise",
                                      "unlearn.eval.selection_fraction=0.25", "unlearn.eval.selection_seed=3"])
    sweep = tmp_path / "sweep"
    retain = runs.reference_eval(sweep, "retain")

    def config():
        ctx = TrialContext(space=to_dict(space), sweep_dir=str(sweep), target=str(tmp_path / "target"), data=None,
                           retain_reference=str(retain), aggregator=None)
        return trial_config(space, ctx, "t0", "wga+kl").eval

    ev = config()
    assert (ev.removal_score, ev.selection_fraction, ev.selection_seed) == ("nll_rise", 0.25, 3)
    assert ev.retain_reference == str(retain) and ev.target_reference is None    # no target evaluation yet
    write_json(runs.reference_eval(sweep, "target"), {})
    assert config().target_reference == str(runs.reference_eval(sweep, "target"))


def test_evaluation_with_a_target_reference_scores_nll_rise(tmp_path):
    from conftest import data_config, tiny_setup

    from rayunlearn.config import EvalConfig
    from rayunlearn.eval.evaluate import ReferenceMismatchError, evaluate_model, write_eval

    model, tok, bench = tiny_setup(seed=0)
    other = tiny_setup(seed=1)[0]
    cfg = EvalConfig(max_new_tokens=4, rouge=False)
    write_eval(evaluate_model(model, tok, bench, data_config(), cfg), tmp_path / "target")
    scored = EvalConfig(max_new_tokens=4, rouge=False, removal_score="nll_rise",
                        target_reference=str(tmp_path / "target"))
    same = evaluate_model(model, tok, bench, data_config(), scored)
    assert same["removal_kind"] == "nll_rise" and same["removal"] == 0.0
    res = evaluate_model(other, tok, bench, data_config(), scored)
    target_nll = json.loads((tmp_path / "target" / "raw.json").read_text())["forget"]["avg_gt_loss"]
    nll = res["raw"]["forget"]["avg_gt_loss"]
    assert res["removal"] == pytest.approx(np.mean(nll) - np.mean(target_nll), rel=1e-12)
    # the toy records carry no author field: TOFU's blocks of 20 QA, stored per item in raw.json
    assert res["raw"]["forget"]["author"] == ["block-0", "block-0"]
    with pytest.raises(ReferenceMismatchError, match="max_items"):
        evaluate_model(other, tok, bench, data_config(), EvalConfig(max_new_tokens=4, rouge=False, max_items=1,
                                                                     target_reference=str(tmp_path / "target")))
