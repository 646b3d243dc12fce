"""Early stopping of hopeless trials in a multi-objective sweep (``early_stopping:`` in the space).

Optuna cannot prune a multi-objective study and Ray's schedulers follow one metric, so the rule is
our own, on the driver, as a Ray Tune :class:`~ray.tune.stopper.Stopper`: Tune calls it with every
result a trial reports; the trial's trajectory evaluations (``unlearn.eval.every``) arrive as
results with ``status`` = running, ``step``, ``removal`` and ``retention``. At an evaluation of step
``min_step`` or later, a trial is stopped when

* **collapse** (``early_stopping.collapse``, on by default): its retention is below the sweep's
  floor, ``retention_floor`` × the target model's retention. A trajectory evaluation is a fast one
  (no generation: utility over the six non-ROUGE numbers), so the target's retention is taken in
  the same mode from its stored evaluation (``<sweep>/reference/target.json``:
  :func:`fast_retention`); or
* **dominated** (``early_stopping.dominated``, off by default): some completed trial's evaluation
  at the same step dominates it beyond the noise band (:func:`dominates_beyond`), once at least
  ``min_completed`` completed trials have an evaluation at that step. The completed trials'
  evaluations are their ``trajectory.jsonl`` files, read as trials complete (so a resumed or
  extended sweep judges against every earlier trial too); the band is the half-widths of
  ``<sweep>/reference/noise.json`` (``rayunlearn.runs.noise_path``), 0 without it.

Trials report synchronously: a trial waits inside its report until Tune has decided, so when the
rule says stop, the trial has nothing more written. The stopper then writes the trial's
``result.json`` (:func:`rayunlearn.sweep.trial.write_stopped_result`: status ``stopped``, the
reason in ``stop_reason``, the last evaluation's metrics, the time so far) before Tune ends it;
Tune's OptunaSearch tells the study the last result, so Optuna records the trial as complete with
the last evaluated objectives (``rayunlearn.sweep.study.sync_study`` does the same for a trial the
searcher missed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from ray.tune.stopper import Stopper

from rayunlearn import UserError, runs
from rayunlearn.io import read_json, read_jsonl
from rayunlearn.sweep.space import OBJECTIVES, EarlyStopping, SearchSpace


class RetentionFloorError(UserError):
    """``retention_floor`` is set but the target model's evaluation it is a fraction of is missing."""


def dominates_beyond(a: Sequence[float], b: Sequence[float], band: Sequence[float],
                     maximize: Sequence[bool] = (True, True)) -> bool:
    """Whether point ``a`` dominates ``b`` beyond the noise ``band`` (a half-width per objective):
    ``a`` is better than ``b`` by more than the band in at least one objective and not worse by
    more than the band in any. With a zero band this is plain dominance, except that a tie in
    every objective does not count."""
    better = False
    for x, y, w, m in zip(a, b, band, maximize):
        gain = (x - y) if m else (y - x)
        if gain < -w:
            return False
        if gain > w:
            better = True
    return better


def fast_retention(evaluation: dict) -> float:
    """The retention of a stored evaluation as a trajectory (fast) evaluation measures it: the
    model utility of the probability and truth-ratio numbers alone (no ROUGE), as
    ``rayunlearn.eval.evaluate`` computes it without generation."""
    from rayunlearn.eval.evaluate import UTILITY_SPLITS
    from rayunlearn.eval.metrics import model_utility

    terms = [evaluation[s][m] for s in UTILITY_SPLITS for m in ("prob", "truth_ratio")
             if evaluation.get(s, {}).get(m) is not None]
    if not terms:
        raise RetentionFloorError("the target model's evaluation holds no utility numbers "
                                  f"({', '.join(UTILITY_SPLITS)} × prob, truth_ratio)")
    return model_utility(terms)


def retention_floor(space: SearchSpace, sweep_dir: Path) -> Optional[float]:
    """The absolute retention floor of trajectory evaluations: ``space.retention_floor`` × the
    target model's fast-mode retention (``<sweep>/reference/target.json``, which trajectory
    evaluations match); without a target evaluation and without a preparation (a synthetic
    trainable) the floor itself, as for the sampler's constraint
    (``rayunlearn.sweep.trial.retention_threshold``); None without a floor."""
    if space.retention_floor is None:
        return None
    path = runs.reference_eval(sweep_dir, "target")
    if path.exists():
        return space.retention_floor * fast_retention(read_json(path))
    if not space.prepare.enabled:
        return float(space.retention_floor)
    raise RetentionFloorError(
        f"retention_floor={space.retention_floor:g} is a fraction of the target model's retention, and "
        f"{path} does not exist; keep prepare.enabled and prepare.reference_eval on (they write it), or "
        f"unset retention_floor")


def noise_band(sweep_dir: Path) -> tuple[float, float]:
    """The half-widths (removal, retention) of ``<sweep>/reference/noise.json``; (0, 0) without it."""
    path = runs.noise_path(sweep_dir)
    if not path.exists():
        return 0.0, 0.0
    noise = read_json(path)
    return tuple(float(noise.get(k) or 0.0) for k in OBJECTIVES)


def _point(rec: dict) -> Optional[tuple[float, float]]:
    """(removal, retention) of a result or trajectory record; None when either is not a finite number."""
    vals = [rec.get(k) for k in OBJECTIVES]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
        return float(vals[0]), float(vals[1])
    return None


def stop_reason(point: tuple[float, float], step: int, rules: EarlyStopping, floor: Optional[float],
                front: Sequence[tuple[float, float]], band: Sequence[float],
                maximize: Sequence[bool]) -> Optional[str]:
    """Why a trial whose evaluation at ``step`` gave ``point`` (removal, retention) should stop, or
    None: ``floor``: the absolute retention floor (None: none); ``front``: the completed trials'
    points at ``step``."""
    if step < rules.min_step:
        return None
    removal, retention = point
    if rules.collapse and floor is not None and retention < floor:
        return f"collapse: retention {retention:.4g} < floor {floor:.4g} at step {step}"
    if rules.dominated and len(front) >= rules.min_completed:
        for other in front:
            if dominates_beyond(other, point, band, maximize):
                return (f"dominated: (removal {removal:.4g}, retention {retention:.4g}) by a completed trial's "
                        f"({other[0]:.4g}, {other[1]:.4g}) at step {step}, noise band "
                        f"({band[0]:.3g}, {band[1]:.3g})")
    return None


class TrajectoryStopper(Stopper):
    """The Tune stopper of a sweep's early stopping (see the module docstring). Picklable (Tune
    saves it with the experiment); the completed trials' trajectories are read again after a
    restore."""

    def __init__(self, sweep_dir: Path, rules: EarlyStopping, floor: Optional[float],
                 band: tuple[float, float], maximize: tuple[bool, bool]):
        self.sweep_dir = Path(sweep_dir)
        self.rules, self.floor, self.band, self.maximize = rules, floor, tuple(band), tuple(maximize)
        self._read: set[str] = set()                          # trial ids whose result.json was read
        self._completed: dict[str, dict[int, tuple[float, float]]] = {}   # trial id -> step -> point

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_read"], state["_completed"] = set(), {}
        return state

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("status") != runs.RUNNING or "step" not in result:
            return False                 # a final result, or a trial's re-entry: nothing to judge
        point = _point(result)
        if point is None:
            return False                 # non-finite: the divergence guard's business
        step = int(result["step"])
        front = [p[step] for p in self._completed_trajectories().values() if step in p] \
            if self.rules.dominated else []
        reason = stop_reason(point, step, self.rules, self.floor, front, self.band, self.maximize)
        if reason is None:
            return False
        from rayunlearn.sweep.trial import write_stopped_result

        write_stopped_result(self.sweep_dir, result, reason)
        print(f"[sweep] stopping trial {trial_id}: {reason}", flush=True)
        return True

    def stop_all(self) -> bool:
        return False

    def _completed_trajectories(self) -> dict[str, dict[int, tuple[float, float]]]:
        """Every completed trial's evaluations by step, reading the trials that finished since the
        last call."""
        for res_file in (self.sweep_dir / runs.TRIALS_DIR).glob(f"*/{runs.RESULT_FILE}"):
            tid = res_file.parent.name
            if tid in self._read:
                continue
            self._read.add(tid)
            if read_json(res_file).get("status") != runs.COMPLETED:
                continue
            traj = res_file.parent / runs.TRAJECTORY_FILE
            points = {}
            for rec in read_jsonl(traj) if traj.exists() else []:
                p = _point(rec)
                if p is not None and "step" in rec:
                    points[int(rec["step"])] = p
            self._completed[tid] = points
        return self._completed


def make_stopper(space: SearchSpace, sweep_dir: Path) -> Optional[TrajectoryStopper]:
    """The sweep's :class:`TrajectoryStopper`, or None when no rule can act (both off, or only
    the collapse rule and no ``retention_floor``)."""
    rules = space.early_stopping
    floor = retention_floor(space, sweep_dir) if rules.collapse else None
    if not rules.dominated and floor is None:
        return None
    return TrajectoryStopper(sweep_dir, rules, floor, noise_band(sweep_dir), space.maximize)
