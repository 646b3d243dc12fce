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
