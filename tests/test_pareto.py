"""rayunlearn.pareto on hand-made points: domination, ties, duplicates, missing values,
minimisation, and the 2-D hypervolume against hand-computed areas."""

import math
import random

import pytest

from rayunlearn.pareto import dominates, hypervolume_2d, pareto_front


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
