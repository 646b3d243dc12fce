"""A synthetic per-trial function with the contract of ``rayunlearn.train.unlearn_trial``:
``fn(cfg: UnlearnConfig, report=None, **options) -> metrics dict`` with ``removal`` and
``retention`` (both maximised). It trains nothing: the two objectives are a closed-form,
ZDT1-like function of the trial's hyper-parameters, so the sweep machinery (Tune, Optuna,
resume, retries, tables, Pareto front) can be tested and benchmarked in seconds.

Used with ``trainable=rayunlearn.sweep.synthetic:synthetic_trial`` and ``prepare.enabled=false``.

The objectives. Let f be the mean position in [0, 1] (log-scaled for log distributions) of the
forget-side hyper-parameters and v that of the retain-side ones (0.5 when a side has none);
h = 1 + 4·(v − 0.3)². Then removal = f and retention = (1 − sqrt(f)) / h. The Pareto front is
v = 0.3 (retention = 1 − sqrt(removal)); every other v is dominated, so a sampler that learns
where v should be does better than random search.

Options (all for tests and the benchmark): ``sleep_s`` (idle time per trial), ``work`` (number
of 128×128 matmul blocks of CPU work), ``crash_once`` (``os._exit(1)`` on the first attempt of
every trial: a killed worker), ``diverge_above`` (raise ``DivergedError`` when removal exceeds
it), ``fail_above`` (when removal exceeds it, raise a ``ValueError`` inside a Ray task, as a
model that blows up in a nested Ray Train worker would: Ray wraps it with a coloured
traceback), ``seed_jitter`` (removal + seed_jitter·s and retention − seed_jitter·s, s =
``train.seed``: the spread a trial's seeds give), ``stop_after`` (when exactly this many trials of the sweep have finished, create its ``STOP``
file: a graceful interruption).

A trajectory (for early stopping, ``rayunlearn.sweep.stopping``): with ``steps`` > 1 the run has
that many steps of ``step_s`` idle seconds each and, every ``unlearn.eval.every`` steps, an
evaluation at fraction t = step/steps of the way, appended to ``trajectory.jsonl`` and reported:
removal_t = removal·√t and retention_t = 1 − (1 − retention)·√t (most of the change comes early,
and the order of two trials' points never changes along the way). The families named in
``collapse`` collapse, as gradient ascent alone does: their final retention is 5% of the
formula's, reached a quarter of the way (retention_t = 1 − (1 − retention)·min(1, 4t)).
"""

from __future__ import annotations

import math
import os
import time

from rayunlearn import runs
from rayunlearn.io import append_jsonl, read_json, write_json


def synthetic_objectives(unit: dict[str, float], retain_keys: list[str]) -> tuple[float, float]:
    """(removal, retention) of hyper-parameter positions ``unit`` ({key: u in [0,1]})."""
    forget = [u for k, u in unit.items() if k not in retain_keys]
    retain = [u for k, u in unit.items() if k in retain_keys]
    f = sum(forget) / len(forget) if forget else 0.5
    v = sum(retain) / len(retain) if retain else 0.5
    h = 1.0 + 4.0 * (v - 0.3) ** 2
    return f, (1.0 - math.sqrt(max(f, 0.0))) / h


def _burn(work: int) -> None:
    import torch

    a = torch.ones(128, 128) / 128
    for _ in range(int(work)):
        a = (a @ a) / a.sum() * 128


COLLAPSED_RETENTION = 0.05   # a collapsing family's final retention, as a fraction of the formula's


def synthetic_point(removal: float, retention: float, t: float, collapse: bool = False) -> tuple[float, float]:
    """(removal, retention) at fraction ``t`` of a run that ends at (removal, retention) and
    starts at (0, 1); a collapsing run reaches its retention a quarter of the way."""
    return removal * math.sqrt(t), 1.0 - (1.0 - retention) * (min(1.0, 4.0 * t) if collapse else math.sqrt(t))


def synthetic_trial(cfg, report=None, *, sleep_s: float = 0.0, work: int = 0, crash_once: bool = False,
                    diverge_above: float | None = None, fail_above: float | None = None,
                    seed_jitter: float = 0.0, stop_after: int | None = None, steps: int = 1, step_s: float = 0.0,
                    collapse: tuple[str, ...] = ()) -> dict:
    """Compute the synthetic objectives of the trial described by ``<run dir>/trial.json``
    (written by the sweep before calling), report its trajectory (see the module docstring) and
    write ``metrics.json`` like a real run."""
    run_dir = runs.run_dir(cfg.out, cfg.trial_id)
    rec = read_json(run_dir / runs.TRIAL_FILE)
    write_json(run_dir / runs.STATUS_FILE, {"status": runs.RUNNING, "step": 0})   # as a real run does
    if crash_once:
        marker = run_dir / ".crashed_once"
        if not marker.exists():
            marker.write_text("1")
            os._exit(1)          # the worker process dies without cleanup
    if sleep_s:
        time.sleep(float(sleep_s))
    if work:
        _burn(work)
    removal, retention = synthetic_objectives(rec["unit"], rec["retain_keys"])
    removal, retention = removal + seed_jitter * cfg.train.seed, retention - seed_jitter * cfg.train.seed
    collapsing = rec["family"] in collapse
    if collapsing:
        retention *= COLLAPSED_RETENTION
    every = cfg.eval.every
    for step in range(1, int(steps) + 1):
        time.sleep(float(step_s))
        if every and step % every == 0 and step < steps:
            r_t, u_t = synthetic_point(removal, retention, step / steps, collapsing)
            append_jsonl(run_dir / runs.TRAJECTORY_FILE, {"step": step, "removal": r_t, "retention": u_t})
            if report is not None:
                report({"step": step, "removal": r_t, "retention": u_t, "done": False})
    if diverge_above is not None and removal > diverge_above:
        raise runs.DivergedError(f"training diverged at step 1: loss=nan (synthetic, removal {removal:.3f} "
                            f"> {diverge_above})")
    if fail_above is not None and removal > fail_above:
        import ray

        ray.get(ray.remote(num_cpus=0)(_blow_up).remote(removal, fail_above))
    steps = int(steps)
    metrics = {"step": steps, "removal": removal, "retention": retention,
               "forget": {"prob": 1.0 - removal}, "retain": {"prob": retention}}
    append_jsonl(run_dir / runs.TRAJECTORY_FILE, {"step": steps, "removal": removal, "retention": retention})
    write_json(run_dir / runs.METRICS_FILE, metrics)
    write_json(run_dir / runs.STATUS_FILE, {"status": runs.COMPLETED, "step": steps})
    if report is not None:
        report({"step": steps, "removal": removal, "retention": retention, "done": True})
    if stop_after is not None:
        done = len(list(run_dir.parent.glob(f"*/{runs.METRICS_FILE}")))
        if done == int(stop_after):   # once: a resumed sweep goes past it
            (run_dir.parent.parent / runs.STOP_FILE).write_text("stop requested by synthetic_trial\n")
    return metrics


def _blow_up(removal: float, limit: float) -> None:
    raise ValueError(f"truth ratio is infinite at evaluation (synthetic, removal {removal:.3f} > {limit})")
