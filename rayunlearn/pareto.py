"""The Pareto front of a multi-objective sweep, and the 2-D hypervolume.

Pure functions of plain numbers: no Ray, no pandas needed.

Rules (documented contract, pinned by tests/test_pareto.py):

- A point ``a`` *dominates* ``b`` when it is at least as good in every objective and strictly
  better in at least one ("good" = larger where ``maximize`` is True, smaller otherwise).
- **Ties and duplicates**: points with exactly equal objective vectors do not dominate each
  other, so all copies of a non-dominated point are on the front (every trial that reached it
  is reported). A point tied with a front point in one objective and worse in the other is
  dominated.
- **Missing values**: a point with ``None`` or NaN (or ±inf) in any objective is not comparable
  and is excluded: it is neither on the front nor does it dominate anything (a diverged or
  failed trial never hides a finished one).

The front with a noise band (:func:`noisy_pareto_front`). With half-widths ``h`` (one per
objective, >= 0: the noise floor measured between retain-model replicates,
``rayunlearn.runs.noise_path``), ``a`` *clearly dominates* ``b`` when ``a`` is not worse than
``b`` beyond the noise in any objective (a_m >= b_m − h_m for every m) and better beyond it in
at least one (a_m > b_m + h_m). The noise-aware front is the points that no other point clearly
dominates. So two points whose differences all lie within the band are both kept; a point whose
only advantage lies within the band (a little more retention, h_m or less) is dropped when
another is better beyond the band in the other objective; with h = 0 it is the exact front.
"""

from __future__ import annotations

import math
from typing import Sequence


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _oriented(points, maximize) -> list[tuple[int, tuple[float, ...]]]:
    """(index, objective vector turned into 'larger is better') for every complete point."""
    out = []
    for i, p in enumerate(points):
        p = tuple(p)
        if len(p) != len(maximize):
            raise ValueError(f"point {i} has {len(p)} objectives, expected {len(maximize)}")
        if all(_finite(v) for v in p):
            out.append((i, tuple(float(v) if m else -float(v) for v, m in zip(p, maximize))))
    return out


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool] = (True, True)) -> bool:
    """True if ``a`` is at least as good as ``b`` in every objective and strictly better in one."""
    better = False
    for x, y, m in zip(a, b, maximize):
        if not m:
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(points: Sequence[Sequence[float | None]],
                 maximize: Sequence[bool] = (True, True)) -> list[int]:
    """Indices (ascending) of the non-dominated points among ``points``.

    Duplicates of a non-dominated point are all kept; points with a None/NaN/inf objective are
    excluded (see the module docstring). O(n²) — sweeps have at most thousands of trials."""
    maximize = tuple(bool(m) for m in maximize)
    pts = _oriented(points, maximize)
    up = (True,) * len(maximize)
    front = []
    for i, p in pts:
        if not any(dominates(q, p, up) for j, q in pts if j != i):
            front.append(i)
    return front


def clearly_dominates(a: Sequence[float], b: Sequence[float], half_width: Sequence[float],
                      maximize: Sequence[bool] = (True, True)) -> bool:
    """True if ``a`` is nowhere worse than ``b`` by more than the half-width and somewhere better
    by more than it (module docstring)."""
    beyond = False
    for x, y, h, m in zip(a, b, half_width, maximize):
        if not m:
            x, y = -x, -y
        if x < y - h:
            return False
        if x > y + h:
            beyond = True
    return beyond


def noisy_pareto_front(points: Sequence[Sequence[float | None]], half_width: Sequence[float],
                       maximize: Sequence[bool] = (True, True)) -> list[int]:
    """Indices (ascending) of the points no other point clearly dominates
    (:func:`clearly_dominates` with the noise half-widths ``half_width``, one per objective);
    incomplete points are excluded as in :func:`pareto_front`."""
    maximize = tuple(bool(m) for m in maximize)
    h = tuple(float(v) for v in half_width)
    if len(h) != len(maximize) or not all(math.isfinite(v) and v >= 0 for v in h):
        raise ValueError(f"half_width must give one finite value >= 0 per objective, got {tuple(half_width)}")
    pts = _oriented(points, maximize)
    up = (True,) * len(maximize)
    return [i for i, p in pts if not any(clearly_dominates(q, p, h, up) for j, q in pts if j != i)]


def hypervolume_2d(points: Sequence[Sequence[float | None]], ref: Sequence[float],
                   maximize: Sequence[bool] = (True, True)) -> float:
    """Area dominated by ``points`` and bounded by the reference point ``ref`` (2 objectives).

    For maximised objectives the area is that of the union of boxes [ref, p]; points that do
    not strictly improve on ``ref`` in both objectives contribute nothing; incomplete points
    (None/NaN) are ignored. Larger is better."""
    if len(ref) != 2 or len(maximize) != 2:
        raise ValueError("hypervolume_2d needs exactly two objectives")
    r = tuple(float(v) if m else -float(v) for v, m in zip(ref, maximize))
    pts = [p for _, p in _oriented(points, tuple(maximize)) if p[0] > r[0] and p[1] > r[1]]
    # sweep by the first objective, descending; keep the running best of the second
    pts.sort(key=lambda p: (-p[0], -p[1]))
    area, best_y = 0.0, r[1]
    for k, (x, y) in enumerate(pts):
        if y > best_y:
            # the strip between this x and the next distinct smaller x is covered up to y
            best_y = y
        nxt = pts[k + 1][0] if k + 1 < len(pts) else r[0]
        area += (x - nxt) * (best_y - r[1])
    return area
