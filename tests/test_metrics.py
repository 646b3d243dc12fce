"""Pure metric functions against numbers worked out by hand from the formulas."""

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from rayunlearn import UserError
from rayunlearn.eval import metrics as M

LN2 = math.log(2.0)


def test_answer_prob():
    # exp(-0) = 1, exp(-ln 2) = 1/2 -> mean 3/4
    assert M.answer_prob([0.0, LN2]) == pytest.approx(0.75, abs=1e-15)


def test_normalized_prob_option_normalised():
    # item 1: p = 1/2, perturbed 1/4 + 1/4            -> 0.5 / 1.0   = 1/2
    # item 2: p = 1,   perturbed 1/2 + 1/4            -> 1   / 1.75  = 4/7
    got = M.normalized_prob([LN2, 0.0], [[2 * LN2, 2 * LN2], [LN2, 2 * LN2]])
    assert got == pytest.approx((0.5 + 4 / 7) / 2, abs=1e-15)


def test_truth_ratio_per_item_and_aggregates():
    # base P = 1/2, perturbed P = 1/4 and 1/8 -> R = sqrt(1/32) / (1/2) = 2^-1.5
    r = M.truth_ratios([LN2], [[2 * LN2, 3 * LN2]])
    assert r[0] == pytest.approx(2 ** -1.5, rel=1e-14)
    # ragged K is allowed: mean over each item's own list
    r2 = M.truth_ratios([0.0, 0.0], [[LN2], [LN2, 3 * LN2]])
    assert r2 == pytest.approx([0.5, 0.25], rel=1e-14)
    # forget: mean min(R, 1/R) = mean(0.5, 0.5, 1) = 2/3
    assert M.truth_ratio_forget([0.5, 2.0, 1.0]) == pytest.approx(2 / 3)
    # utility: mean max(0, 1-R) = mean(0.5, 0, 0.75) = 5/12
    assert M.truth_ratio_utility([0.5, 2.0, 0.25]) == pytest.approx(5 / 12)


def test_model_utility_harmonic_mean_and_zero():
    assert M.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)     # 3 / (1 + 2 + 4)
    assert M.model_utility([0.9] * 8 + [0.0]) == 0.0
    with pytest.raises(UserError):
        M.model_utility([0.5, float("nan")])


def test_forget_quality_ks_hand_case_and_scipy():
    # fully separated samples of 3: D = 1, exact two-sided p = 2 / C(6,3) = 0.1
    fq = M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert fq["statistic"] == 1.0
    assert fq["pvalue"] == pytest.approx(0.1, abs=1e-12)
    assert fq["n"] == [3, 3]
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=40), rng.lognormal(0.3, size=25)
    ref = ks_2samp(a, b)
    fq = M.forget_quality(a, b)
    assert fq["pvalue"] == ref.pvalue and fq["statistic"] == ref.statistic and fq["n"] == [40, 25]


def test_extraction_strength_and_exact_memorization():
    assert M.extraction_strength([True, True, True, True]) == 1.0        # k = 0
    assert M.extraction_strength([False, True, True, True]) == 0.75      # k = 1 -> 1 - 1/4
    assert M.extraction_strength([True, True, False, True]) == 0.25      # k = 3 -> 1 - 3/4
    assert M.extraction_strength([True, True, True, False]) == 0.0       # k = n
    assert M.exact_memorization([True, True, False, True]) == 0.75
    assert M.exact_memorization([False, False]) == 0.0


def test_rouge_recall_uses_stemming_and_recall():
    # target has 6 tokens; LCS with "the cats" (cats -> cat) is 2 -> recall 1/3
    r1, rl = M.rouge_recall("the cats", "the cat sat on the mat")
    assert rl == pytest.approx(1 / 3) and r1 == pytest.approx(1 / 3)
    assert M.rouge_recall("the mat on the cat sat", "the cat sat")[1] == pytest.approx(1.0)
    assert M.rouge_mean([0.5, 1.0, 0.0]) == pytest.approx(0.5)


def test_mia_scores_hand_values():
    assert M.mia_loss(2.5) == -2.5
    # len(zlib.compress(b"a")) == 9 bytes (2 header + 3 deflate + 4 adler32)
    assert M.mia_zlib(2.0, "a") == pytest.approx(-2.0 / 9)
    lp = [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert M.mia_min_k(lp, 0.4) == pytest.approx(-4.5)      # lowest int(0.4*5)=2: -5, -4
    assert M.mia_min_k(lp, 0.1) == pytest.approx(-5.0)      # at least one token
    # z = (lp - mu)/sigma = [(-1+2)/1, (-2+2)/2, (-3+2)/0.5] = [1, 0, -2]
    assert M.mia_min_k_pp([-1.0, -2.0, -3.0], [-2.0] * 3, [1.0, 2.0, 0.5], 0.4) == pytest.approx(-2.0)
    assert M.mia_min_k_pp([-1.0, -2.0, -3.0], [-2.0] * 3, [1.0, 2.0, 0.5], 0.7) == pytest.approx(-1.0)


def test_roc_auc_with_ties_hand_example():
    # pairs (member, non-member): (3,2)=1 (3,1)=1 (2,2)=1/2 (2,1)=1 (2,2)=1/2 (2,1)=1 -> 5/6
    assert M.roc_auc([3.0, 2.0, 2.0], [2.0, 1.0]) == pytest.approx(5 / 6)
    assert M.roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert M.roc_auc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert M.roc_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    # brute force over all pairs on random data with many ties
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert M.roc_auc(a, b) == pytest.approx(brute, abs=1e-12)


def test_privleak():
    assert M.privleak(1.0, 0.5) == pytest.approx(-100.0)     # target-like: forget items recognised
    assert M.privleak(0.5, 0.5) == pytest.approx(0.0)
    assert M.privleak(0.25, 0.5) == pytest.approx(50.0)      # (0.75 - 0.5) / 0.5
    assert M.privleak(0.7, 1.0) is None


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="empty"):
        M.answer_prob([])
    with pytest.raises(UserError, match="NaN"):
        M.truth_ratio_forget([1.0, float("nan")])
    with pytest.raises(UserError, match="perturbed"):
        M.truth_ratios([0.0, 0.0], [[1.0]])


def test_forget_quality_invariant_to_tofu_orientation():
    """TOFU runs the KS test on exp(L̄_pert − L̄_para) = 1/R; the test is the same on R."""
    rng = np.random.default_rng(2)
    a, b = rng.lognormal(size=30), rng.lognormal(0.5, size=30)
    tofu = ks_2samp(1 / a, 1 / b)
    fq = M.forget_quality(a, b)
    assert fq["statistic"] == pytest.approx(tofu.statistic, abs=1e-15)
    assert fq["pvalue"] == pytest.approx(tofu.pvalue, rel=1e-12)
