"""The retention floor as an Optuna constraint (``retention_floor:`` in a search space).

A trial is feasible when its (seed-mean) retention reaches the threshold
``retention_floor × the target model's retention`` (``rayunlearn.sweep.trial.retention_threshold``).
The floor is a constraint, not a third objective: Optuna's constrained samplers (TPE, NSGA-II)
rank infeasible trials below every feasible one, by how far they miss, so the sampler stops
proposing configurations in a region that misses the floor, while the two objectives stay the
sweep's removal and retention.

How the value reaches the sampler. Ray's ``OptunaSearch`` tells the study a trial's objective
values; :class:`FloorOptunaSearch` first stores the constraint value
c = threshold − retention (c ≤ 0: feasible) as the Optuna trial's user attribute
:data:`CONSTRAINT_ATTR`, and the sampler's ``constraints_func`` (:func:`retention_constraint`)
reads it back when the study is told (Optuna then keeps it as the trial's ``constraints``).
Trials the driver tells itself (``rayunlearn.sweep.study.sync_study``) get it through
:func:`record_constraint`. The random sampler takes no constraint: there the floor only fills
the ``feasible`` column.
"""

from __future__ import annotations

import math
from typing import Optional

from ray.tune.search.optuna import OptunaSearch

CONSTRAINT_ATTR = "retention_floor_violation"   # threshold − retention (≤ 0: feasible)


def constraint_value(threshold: float, retention) -> Optional[float]:
    """threshold − retention, or None when the retention is not a finite number."""
    if not isinstance(retention, (int, float)) or isinstance(retention, bool) or not math.isfinite(retention):
        return None
    return float(threshold) - float(retention)


def retention_constraint(trial) -> list[float]:
    """The sampler's ``constraints_func``: [threshold − retention] of a finished Optuna trial. A
    trial told without a value (no finite retention) counts as infinitely infeasible."""
    return [float(trial.user_attrs.get(CONSTRAINT_ATTR, math.inf))]


def record_constraint(storage, trial_id: int, value: Optional[float]) -> None:
    """Store a trial's constraint as the sampler would have when told through ``study.tell``
    (for trials whose state is set directly in the storage)."""
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    storage.set_trial_user_attr(trial_id, CONSTRAINT_ATTR, math.inf if value is None else value)
    storage.set_trial_system_attr(trial_id, _CONSTRAINTS_KEY, (math.inf if value is None else value,))


class FloorOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that attaches the retention-floor constraint to every finished trial
    before telling the study (module docstring)."""

    def __init__(self, *args, retention_threshold: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._retention_threshold = float(retention_threshold)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            value = constraint_value(self._retention_threshold, (result or {}).get("retention"))
            ot_trial.set_user_attr(CONSTRAINT_ATTR, math.inf if value is None else value)
        super().on_trial_complete(trial_id, result=result, error=error)
