"""rayunlearn.pareto on hand-made points: domination, ties, duplicates, missing values,
minimisation, and the 2-D hypervolume against hand-computed areas."""

import math
import random

import pytest

from rayunlearn.pareto import clearly_dominates, dominates, hypervolume_2d, noisy_pareto_front, pareto_front


def test_front_of_hand_made_points():
    pts = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.5, 0.2), (0.2, 0.6)]
    # (0.4,0.4) and (0.5,0.2) are dominated by (0.5,0.5); (0.2,0.6) is not dominated
    assert pareto_front(pts) == [0, 1, 3, 5]


def test_ties_in_one_objective_are_dominated_duplicates_are_kept():
    pts = [(0.5, 0.5), (0.5, 0.3), (0.5, 0.5), (0.3, 0.5), (0.6, 0.1)]
    # equal removal, worse retention -> dominated; exact duplicates of a front point both kept
    assert pareto_front(pts) == [0, 2, 4]


def test_missing_objective_excluded_and_dominates_nothing():
    pts = [(0.2, 0.2), (None, 0.9), (float("nan"), 0.95), (0.99, float("nan")), (0.1, 0.3), (math.inf, 1.0)]
    assert pareto_front(pts) == [0, 4]
    assert pareto_front([(None, None)]) == []
    assert pareto_front([]) == []


def test_minimisation_and_mixed_directions():
    pts = [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0), (2.0, 2.0)]
    assert pareto_front(pts, maximize=(False, False)) == [0, 1, 2]
    assert pareto_front(pts, maximize=(True, True)) == [3]
    assert pareto_front(pts, maximize=(False, True)) == [2]
    assert dominates((1, 1), (1, 0)) and not dominates((1, 1), (1, 1))


def test_front_matches_brute_force_on_random_points():
    rng = random.Random(0)
    pts = [(rng.choice([0.1, 0.2, 0.3, 0.4]), rng.choice([0.1, 0.2, 0.3])) for _ in range(40)]
    expected = [i for i, p in enumerate(pts)
                if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)]
    assert pareto_front(pts) == expected


def test_hypervolume_hand_computed():
    # union of boxes [0,1]x[0,0.2] ∪ [0,0.5]x[0,0.5] ∪ [0,0.2]x[0,1]:
    # 0.2*1 + (0.5-0.2)*0.5 + (1-0.5)*0.2 = 0.2 + 0.15 + 0.1 = 0.45
    pts = [(1.0, 0.2), (0.5, 0.5), (0.2, 1.0)]
    assert hypervolume_2d(pts, ref=(0, 0)) == pytest.approx(0.45, abs=1e-15)
    # dominated, duplicate, missing and below-reference points add nothing
    more = pts + [(0.4, 0.4), (0.5, 0.5), (None, 1.0), (-1.0, 2.0)]
    assert hypervolume_2d(more, ref=(0, 0)) == pytest.approx(0.45, abs=1e-15)
    assert hypervolume_2d(pts, ref=(0.2, 0.2)) == pytest.approx(0.3 * 0.3 + 0.5 * 0.0, abs=1e-15)
    assert hypervolume_2d([], ref=(0, 0)) == 0.0
    # minimisation: the box between the point and the reference point above it
    assert hypervolume_2d([(1.0, 1.0)], ref=(2.0, 3.0), maximize=(False, False)) == pytest.approx(2.0)


def test_hypervolume_matches_grid_oracle():
    rng = random.Random(1)
    pts = [(rng.random(), rng.random()) for _ in range(12)]
    n = 400   # midpoint grid: exact up to cells crossed by box edges
    inside = sum(1 for i in range(n) for j in range(n)
                 if any((i + 0.5) / n <= x and (j + 0.5) / n <= y for x, y in pts))
    assert hypervolume_2d(pts, ref=(0, 0)) == pytest.approx(inside / n**2, abs=5e-3)


# ----------------------------------------------------------------------------- the noise band


def test_two_points_within_the_band_are_both_kept():
    # b is better than a in both objectives, but by 0.03 and 0.01 < the half-widths (0.05, 0.02)
    pts = [(0.50, 0.60), (0.53, 0.61)]
    assert pareto_front(pts) == [1]
    assert noisy_pareto_front(pts, (0.05, 0.02)) == [0, 1]
    assert not clearly_dominates(pts[1], pts[0], (0.05, 0.02))


def test_a_difference_beyond_the_band_dominates():
    # removal 0.30 apart (beyond 0.05), retention equal: dominated as without noise
    assert noisy_pareto_front([(0.2, 0.6), (0.5, 0.6)], (0.05, 0.02)) == [1]
    # (0.8, 0.59) is better in removal beyond the band and worse in retention only within it
    # (0.01 <= 0.02): it clearly dominates (0.5, 0.60), which the exact front keeps
    pts = [(0.5, 0.60), (0.8, 0.59)]
    assert pareto_front(pts) == [0, 1]
    assert noisy_pareto_front(pts, (0.05, 0.02)) == [1]
    # worse in retention by 0.03 > 0.02: a real trade-off, both kept
    assert noisy_pareto_front([(0.5, 0.60), (0.8, 0.57)], (0.05, 0.02)) == [0, 1]
    # exactly at the band's edge counts as within it (strict inequalities)
    assert clearly_dominates((0.55, 0.6), (0.5, 0.6), (0.05, 0.02)) is False
    assert clearly_dominates((0.56, 0.58), (0.5, 0.6), (0.05, 0.02)) is True


def test_zero_band_is_the_exact_front_and_minimisation():
    rng = random.Random(3)
    for _ in range(50):
        pts = [(round(rng.random(), 1), round(rng.random(), 1)) for _ in range(12)]
        assert noisy_pareto_front(pts, (0.0, 0.0)) == pareto_front(pts)
    # minimised first objective: 0.10 vs 0.12 within 0.05, retention within 0.02: both kept
    assert noisy_pareto_front([(0.10, 0.6), (0.12, 0.61), (0.5, 0.6)], (0.05, 0.02), maximize=(False, True)) == [0, 1]
    assert noisy_pareto_front([(None, 0.9), (0.1, 0.1)], (0.05, 0.02)) == [1]
    with pytest.raises(ValueError, match="half_width"):
        noisy_pareto_front([(0.1, 0.1)], (-0.1, 0.0))
