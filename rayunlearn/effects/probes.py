"""The fixed probes of a run: which rows estimate the removal risk (forget set) and the retention
risk (non-targeted data) of the G-effect (docs/spec/GEFFECT.md, "probes").

- **removal probe** (``effects.probe_size`` rows): stratified over every forget author — rows
  grouped by the synthetic records' ``author`` key, or, without it (TOFU), by consecutive blocks
  of ``TOFU_QA_PER_AUTHOR`` rows (TOFU lists each author's 20 QA in order); each author gets
  ⌊n/A⌋ or ⌈n/A⌉ rows, evenly spaced within the author. Fewer rows than authors is an error.
- **retention probe** (``effects.retain_probe_size`` rows): half from the retain split
  (stratified over its authors; when there are more authors than rows, evenly spaced authors),
  half from the world-knowledge sets (``WORLD_EVAL_SPLITS``: real authors and world facts,
  stratified over the two) when the benchmark has them, else all from the retain split.
- Deterministic functions of the data: no seed, so every trial of a sweep (every seed) gets the
  same probe, and it stays fixed for the whole run.
- Held out from the regulariser: the retain rows of the probe are removed from the rows the
  retain-side terms (GD, KL, RR) train on (``UnlearnTask`` calls :func:`probe_rows`), otherwise
  GD's retention effect would be +‖∇R‖² by construction. The world rows are never trained on
  during unlearning.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayunlearn import UserError
from rayunlearn.data.examples import retain_split
from rayunlearn.data.schema import WORLD_EVAL_SPLITS

TOFU_QA_PER_AUTHOR = 20     # TOFU: every author's QA pairs are consecutive, 20 per author


@dataclass(frozen=True)
class ProbeRows:
    """Row indices of the probes: ``forget`` into the forget split, ``retain`` into its retain
    split, ``world`` as (split name, index) into the world-knowledge evaluation sets."""

    forget: tuple[int, ...]
    retain: tuple[int, ...]
    world: tuple[tuple[str, int], ...]


def author_groups(records: list[dict]) -> list[list[int]]:
    """Row indices grouped by author, in order of first appearance: the ``author`` key when every
    record has one, else consecutive blocks of ``TOFU_QA_PER_AUTHOR`` rows."""
    if records and all("author" in r for r in records):
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            groups.setdefault(r["author"], []).append(i)
        return list(groups.values())
    return [list(range(i, min(i + TOFU_QA_PER_AUTHOR, len(records))))
            for i in range(0, len(records), TOFU_QA_PER_AUTHOR)]


def _spread(m: int, k: int) -> list[int]:
    """k positions evenly spaced in range(m) (k <= m), centred in their strata."""
    return [int((j + 0.5) * m / k) for j in range(k)]


def stratified(groups: list[list[int]], n: int) -> list[int]:
    """n members spread over `groups`: every group gets ⌊n/G⌋ or ⌈n/G⌉ (the extra ones to evenly
    spaced groups), evenly spaced within the group, capped by its size; with n < G one member
    from each of n evenly spaced groups. Sorted."""
    groups = [g for g in groups if g]
    G = len(groups)
    if n <= 0 or G == 0:
        return []
    if n < G:
        return sorted(groups[gi][len(groups[gi]) // 2] for gi in _spread(G, n))
    counts = [n // G] * G
    for gi in _spread(G, n % G) if n % G else []:
        counts[gi] += 1
    out = []
    for g, c in zip(groups, counts):
        c = min(c, len(g))
        out.extend(g[p] for p in _spread(len(g), c))
    return sorted(out)


def probe_rows(benchmark, forget_split: str, probe_size: int, retain_probe_size: int) -> ProbeRows:
    """The probes of a run on `benchmark` (see the module docstring)."""
    forget = benchmark.split(forget_split)
    groups = author_groups(forget)
    if probe_size < len(groups):
        raise UserError(f"effects.probe_size={probe_size} is smaller than the {len(groups)} authors of "
                        f"{forget_split}: the removal probe must hold at least one row of every forget "
                        f"author; set effects.probe_size >= {len(groups)}")
    f_idx = stratified(groups, min(probe_size, len(forget)))
    retain = benchmark.split(retain_split(forget_split))
    world_splits = [s for s in WORLD_EVAL_SPLITS if benchmark.has(s)]
    n_world = retain_probe_size // 2 if world_splits else 0
    r_idx = stratified(author_groups(retain), min(retain_probe_size - n_world, len(retain)))
    # stratify the world rows over the sets: index the pool by (set, row)
    pools = [[(s, i) for i in range(len(benchmark.split(s)))] for s in world_splits]
    offsets, flat = [], []
    for p in pools:
        offsets.append(list(range(len(flat), len(flat) + len(p))))
        flat.extend(p)
    w_idx = [flat[j] for j in stratified(offsets, min(n_world, len(flat)))]
    return ProbeRows(tuple(f_idx), tuple(r_idx), tuple(w_idx))
