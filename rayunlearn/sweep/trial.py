"""One sweep trial, top to bottom: :func:`sweep_trial` is the Ray Tune function trainable.

Tune calls it with the sampled point (``config``, from ``rayunlearn.sweep.space.define_by_run``)
and the sweep's :class:`TrialContext`. It runs the configuration once per seed (``seeds: k`` in
the space; seed j unlearns with ``train.seed`` + j in the run directory of
``rayunlearn.runs.seed_run_id``, seed 0 in the trial's own), so Tune and Optuna see one
configuration with one value: the seeds' means (:func:`aggregate_seeds`). It

1. decodes the point into a family and its hyper-parameters and builds the method string
   (the family was parsed once, when the space was loaded);
2. writes ``trials/<trial_id>/trial.json`` (the search point) and appends one line to
   ``attempts.jsonl`` (a retried trial shows every start);
3. builds the trial's :class:`~rayunlearn.config.UnlearnConfig` (:func:`trial_config`: the space's
   ``unlearn`` sections, the prepared target model and data, ``effects.aggregator`` = the sweep's
   G-effect aggregator actor) and calls the per-trial function (``space.trainable``, by default
   ``rayunlearn.train:unlearn_trial``), which writes the run directory and sends its G-effect rows;
4. writes ``result.json`` (status, error, time, the flattened metrics aggregated over the
   seeds, where the time went: ``time.<phase>``, :func:`time_breakdown`, and ``feasible``: whether
   the mean retention meets the space's ``retention_floor``) and reports the objectives
   to Tune. A :class:`rayunlearn.runs.DivergedError` is a result (status ``diverged``, NaN
   objectives), not an error: divergence is deterministic, so Tune must not retry it.

Failures. An exception raised by the trial's own code (a bad hyper-parameter, a model that blows
up at evaluation) is deterministic too: it is recorded once as ``failed`` with a one-line error
(the root exception, no traceback, no colour codes), the run's ``status.json`` is marked failed,
and the trial reports instead of raising, so Tune does not retry it. Only Ray's system errors (a
killed worker, a lost node: :func:`is_system_error`) propagate, so that Tune retries the trial
from its checkpoint (``max_failures``).

Early stopping. The sweep's stopper (``rayunlearn.sweep.stopping``, on the driver) may end a
trial at one of its trajectory evaluations, while the trial waits in its report to Tune; the
stopper writes its ``result.json`` (:func:`write_stopped_result`, status ``stopped``).

Re-entry. A trial whose ``result.json`` already holds a finished status (it finished, but the
driver died before Tune saved that) reports its recorded result again and returns: a resumed
sweep never reruns it nor overwrites its time.

``rayunlearn.sweep.tables`` turns the ``result.json`` files into ``trials.parquet``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from rayunlearn import runs
from rayunlearn.config import ConfigError, UnlearnConfig, from_dict, to_dict
from rayunlearn.io import append_jsonl, read_json, write_json
from rayunlearn.sweep.space import OBJECTIVES, SearchSpace, decode


@dataclasses.dataclass
class TrialContext:
    """What every trial needs besides its sampled hyper-parameters (plain data, picklable)."""

    space: dict                       # the resolved SearchSpace as a dict
    sweep_dir: str
    target: str                       # the prepared target model ("" without preparation)
    data: Optional[dict]              # the prepared DataConfig (None: the space's own)
    retain_reference: Optional[str]   # <sweep>/reference/retain.json, for forget quality
    aggregator: Optional[str]         # the name of the sweep's G-effect aggregator actor
    retention_threshold: Optional[float] = None   # retention_floor x the target's (retention_threshold)


def sweep_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable: one configuration, unlearned with ``space.seeds`` seeds (see
    the module docstring for the files it writes)."""
    from ray import tune

    space = from_dict(SearchSpace, ctx.space)
    family_name, hp = decode(space, config)
    run_trial(space, ctx, tune.get_context().get_trial_id(), family_name, hp, tune.report)


def run_trial(space: SearchSpace, ctx: TrialContext, trial_id: str, family_name: str, hp: dict,
              report_to: Callable[[dict], None]) -> None:
    """The body of :func:`sweep_trial` without Ray: one configuration (``family_name`` with its
    decoded hyper-parameters ``hp``) as trial ``trial_id``, every seed, its files under
    ``trials/<trial_id>/``; ``report_to`` receives what a Tune trial reports (the trajectory
    evaluations, then the final result once). A driver that runs a grid space in-process
    (docs/results/smollm2-gpu/run_study.py) calls it directly with a ``report_to`` that keeps
    nothing, then writes the tables with ``rayunlearn.sweep.tables.write_tables``."""
    family = space.parsed_families[family_name]
    method = family.method_string(hp)
    run_dir = runs.trial_dir(ctx.sweep_dir, trial_id)
    base = {"trial_id": trial_id, "family": family_name, "method": method,
            **{f"{runs.HP_PREFIX}{k}": v for k, v in hp.items()}}
    recorded = read_json(run_dir / runs.RESULT_FILE) if (run_dir / runs.RESULT_FILE).exists() else {}
    if recorded.get("status") in runs.FINISHED_STATUSES:
        report_to({**base, **_nan_objectives(dict(recorded.get("metrics", {}))),
                   "status": recorded["status"], "error": recorded.get("error", "")})
        return
    point = {"trial_id": trial_id, "family": family_name, "method": method, "hp": hp,
             "unit": family.unit(hp), "retain_keys": family.retain_keys(hp), "seeds": space.seeds}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / runs.TRIAL_FILE, point)
    append_jsonl(run_dir / runs.ATTEMPTS_FILE, {"time": time.time(), "pid": os.getpid()})

    t0 = time.time()

    def report(metrics: dict) -> None:
        if metrics.get("done"):
            return      # the final result is reported below, once, with its status
        # time_s: what a trial stopped here has cost (rayunlearn.sweep.stopping)
        report_to({**base, **_nan_objectives(flatten_metrics(metrics)), "status": runs.RUNNING, "error": "",
                   "time_s": time.time() - t0})

    if space.resources.torch_threads and space.resources.num_workers == 1:
        import torch

        torch.set_num_threads(space.resources.torch_threads)
    per_seed, status, error = [], runs.COMPLETED, ""
    for j in range(space.seeds):
        # a scheduler sees the first seed's trajectory: later seeds restart at step 0
        flat, status, error = run_seed(space, ctx, point, j, report if j == 0 else None)
        per_seed.append(flat)
        if status != runs.COMPLETED:
            error = f"seed {j}: {error}" if space.seeds > 1 else error
            break       # a configuration that fails on one seed is not rerun on the others
    time_s = time.time() - t0
    flat = aggregate_seeds(per_seed)
    flat.update(time_breakdown(flat, time_s))
    if ctx.retention_threshold is not None:     # a floor is set: met, missed, or unknown (not completed)
        flat[runs.FEASIBLE_COLUMN] = feasible(flat["retention"], ctx.retention_threshold) \
            if status == runs.COMPLETED else None
    write_json(run_dir / runs.RESULT_FILE, {**_result_base(trial_id, family_name, method, hp), "status": status,
                                            "error": error, "time_s": time_s, "metrics": flat})
    report_to({**base, **flat, "status": status, "error": error})


def run_seed(space: SearchSpace, ctx: TrialContext, point: dict, j: int, report) -> tuple[dict, str, str]:
    """Seed ``j`` of a trial: the per-trial function with ``train.seed`` + j in the run directory
    of ``runs.seed_run_id`` (seed 0: the trial's own). Returns (flat metrics with the objectives
    NaN where missing, status, error); only Ray's system errors propagate (Tune retries them)."""
    run_id = runs.seed_run_id(point["trial_id"], j)
    seed_dir = runs.run_dir(ctx.sweep_dir, run_id)
    if j:
        seed_dir.mkdir(parents=True, exist_ok=True)
        write_json(seed_dir / runs.TRIAL_FILE, {**point, "seed": j})
    try:
        cfg = trial_config(space, ctx, run_id, point["method"], seed=space.unlearn.train.seed + j)
        fn = import_trainable(space.trainable)
        metrics = fn(cfg, report=report, **space.trainable_options)
        status, error = str(metrics.get("status", runs.COMPLETED)), str(metrics.get("error", ""))
    except Exception as exc:   # noqa: BLE001 - a result, unless Ray lost the worker (then retried)
        if is_system_error(exc):
            raise
        if isinstance(exc, runs.DivergedError):
            metrics, status, error = {}, runs.DIVERGED, runs.short_error(exc)
        else:
            metrics, status, error = {}, runs.FAILED, runs.short_error(root_error(exc))
            mark_run_failed(seed_dir, error)
    return _nan_objectives(flatten_metrics(metrics)), status, error


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """The trial's flat metrics from its seeds' (in seed order): every numeric metric is the mean
    over the seeds that have it (``time.*`` the sum: the trial's time), a text metric seed 0's;
    ``removal_sd`` / ``retention_sd`` the sample standard deviations of the objectives (NaN for one
    seed, or when a seed has none), ``n_seeds`` how many seeds ran, and with several seeds every
    seed's own values as ``seed<j>.<metric>``. An objective missing in any seed is NaN."""
    k = len(per_seed)
    out: dict[str, Any] = {}
    for key in dict.fromkeys(key for m in per_seed for key in m):
        vals = [m[key] for m in per_seed if key in m]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = _total(vals) if key.startswith(runs.TIME_PREFIX) else _total(vals) / len(vals)
        else:
            out[key] = vals[0]
    for key in OBJECTIVES:
        vals = [float(m.get(key, math.nan)) for m in per_seed]
        out[key] = _total(vals) / k
        out[f"{key}{runs.SD_SUFFIX}"] = _sample_sd(vals)
    out[runs.SEEDS_COLUMN] = k
    if k > 1:
        for j, m in enumerate(per_seed):
            out.update({f"{runs.SEED_PREFIX}{j}.{key}": v for key, v in m.items()})
    return out


def _total(vals: list[float]) -> float:
    """An exactly rounded sum (math.fsum), NaN where fsum refuses (+inf and -inf together)."""
    try:
        return math.fsum(vals)
    except (ValueError, OverflowError):
        return math.nan


def _sample_sd(vals: list[float]) -> float:
    """The sample standard deviation (ddof 1); NaN for fewer than two values or a NaN among them."""
    if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
        return math.nan
    mean = math.fsum(vals) / len(vals)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def retention_threshold(space: SearchSpace, sweep_dir: str | Path) -> Optional[float]:
    """The retention a trial must reach under ``retention_floor``: the floor times the target
    model's retention (``<sweep>/reference/target.json``); without a target evaluation and without
    a preparation (a synthetic trainable) the floor itself, retention being a score in [0, 1]
    (``rayunlearn.sweep.stopping.retention_floor`` judges trajectories the same way). None
    without a floor."""
    if space.retention_floor is None:
        return None
    path = runs.reference_eval(sweep_dir, "target")
    if not path.exists() and not space.prepare.enabled:
        return float(space.retention_floor)
    return float(space.retention_floor) * float(read_json(path)["retention"])


def feasible(retention: float, threshold: Optional[float]) -> Optional[bool]:
    """Whether a trial's (mean) retention meets the floor; None without a floor."""
    if threshold is None:
        return None
    return bool(math.isfinite(retention) and retention >= threshold)


# keys of a trial's Tune result that are not metrics of its evaluation (besides Tune's own)
_RESULT_KEYS = frozenset({"trial_id", "family", "method", "status", "error", "time_s", "done"})


def write_stopped_result(sweep_dir: str | Path, result: dict, reason: str) -> None:
    """``result.json`` of a trial ended by the sweep's early stopping (``rayunlearn.sweep.stopping``,
    on the driver): status ``stopped``, the reason (``stop_reason``), the time the trial had spent
    and the metrics of the trajectory evaluation it was stopped at (``result``: that evaluation as
    the trial reported it to Tune). The trial is waiting in its report and writes nothing more."""
    from ray.tune.result import AUTO_RESULT_KEYS

    hp = {k[len(runs.HP_PREFIX):]: v for k, v in result.items() if k.startswith(runs.HP_PREFIX)}
    metrics = {k: v for k, v in result.items()
               if k not in _RESULT_KEYS and k not in AUTO_RESULT_KEYS and not k.startswith(runs.HP_PREFIX)}
    trial_id = result["trial_id"]
    write_json(runs.trial_dir(sweep_dir, trial_id) / runs.RESULT_FILE, {
        **_result_base(trial_id, result["family"], result["method"], hp), "status": runs.STOPPED, "error": "",
        runs.STOP_REASON_COLUMN: reason, "time_s": float(result.get("time_s", float("nan"))), "metrics": metrics})
    status_file = runs.trial_dir(sweep_dir, trial_id) / runs.STATUS_FILE
    if status_file.exists():     # the run's own status says it too (it would say "running" forever)
        write_json(status_file, {**read_json(status_file), "status": runs.STOPPED, runs.STOP_REASON_COLUMN: reason})


def time_breakdown(flat: dict, time_s: float) -> dict:
    """``time.other``: the part of the trial's ``time_s`` outside the phases its run measured
    (``time.<phase>``, ``rayunlearn.train.timing``), so that the breakdown sums to ``time_s``;
    nothing for a run that measured none (it failed before finishing, or ran with several
    workers, whose metrics come from metrics.json)."""
    measured = [flat[f"{runs.TIME_PREFIX}{p}"] for p in runs.TIME_PHASES if f"{runs.TIME_PREFIX}{p}" in flat]
    return {f"{runs.TIME_PREFIX}{runs.TIME_OTHER}": time_s - sum(measured)} if measured else {}


def trial_config(space: SearchSpace, ctx: TrialContext, trial_id: str, method: str,
                 seed: Optional[int] = None) -> UnlearnConfig:
    """The UnlearnConfig of one trial (or one seed of it: ``trial_id`` = ``runs.seed_run_id``,
    ``seed`` its ``train.seed``): the space's ``unlearn`` sections with the trial's method, its
    run directory (``<sweep>/trials/<trial_id>``), the prepared target model and data, the retain
    and target references and the sweep's aggregator actor."""
    unlearn = to_dict(space.unlearn)
    if seed is not None:
        unlearn["train"]["seed"] = int(seed)
    unlearn["train"]["num_workers"] = space.resources.num_workers
    unlearn["train"]["use_gpu"] = bool(space.resources.gpus > 0)
    if ctx.retain_reference:
        unlearn["eval"]["retain_reference"] = ctx.retain_reference
        # the target's evaluation lies beside the retain model's (prepare writes both): nll_rise's baseline
        target_ref = runs.reference_eval(Path(ctx.retain_reference).parents[1], "target")
        if target_ref.exists():
            unlearn["eval"]["target_reference"] = str(target_ref)
    if ctx.aggregator:
        unlearn["effects"]["aggregator"] = ctx.aggregator
    values = {"method": method, "out": ctx.sweep_dir, "trial_id": trial_id, "target": ctx.target,
              "data": ctx.data if ctx.data is not None else to_dict(space.data),
              "model": to_dict(space.model), **unlearn}
    return from_dict(UnlearnConfig, values)


def import_trainable(spec: str):
    """The per-trial function named ``module:function``."""
    mod, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"trainable: cannot import {spec!r} ({exc})") from None


def _result_base(trial_id: str, family: str, method: str, hp: dict) -> dict:
    return {"trial_id": trial_id, "family": family, "method": method, "hp": hp}


# Ray's errors for a lost process or node: the trial's code did nothing wrong, a retry can succeed
_SYSTEM_ERRORS = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
                  "ObjectLostError", "OutOfMemoryError", "RaySystemError", "ActorUnschedulableError",
                  "TaskUnschedulableError", "PreemptionError", "ControllerError")


def _causes(exc: BaseException):
    """``exc`` and what it wraps: Ray's task errors (``cause``), Ray Train's worker failures,
    and Python's exception chain."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.append(getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else None)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(v for v in failures.values() if isinstance(v, BaseException))
        todo.extend([e.__cause__, e.__context__])


def is_system_error(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) a Ray system error: a killed worker, a lost node, the object
    store or the scheduler failing; Tune retries those from the checkpoint."""
    return any(type(e).__name__ in _SYSTEM_ERRORS or
               any(c.__name__ in _SYSTEM_ERRORS for c in type(e).__mro__ if c.__module__.startswith("ray"))
               for e in _causes(exc))


def root_error(exc: BaseException) -> BaseException:
    """The innermost exception raised by the trial's code: Ray's wrappers (a remote task's error,
    Ray Train's training failure) name it as their cause."""
    for e in _causes(exc):
        if not type(e).__module__.startswith("ray"):
            return e
    return exc


def mark_run_failed(run_dir, error: str) -> None:
    """A run the trial's code left ``running`` is recorded as failed with its reason (its other
    fields, e.g. the step reached, kept); a run that never started keeps no status file."""
    path = run_dir / runs.STATUS_FILE
    if not path.exists():
        return
    status = read_json(path)
    if status.get("status") == runs.RUNNING:
        write_json(path, {**status, "status": runs.FAILED, "error": error})


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """Scalar leaves of a metrics dict with dotted keys (``forget.prob``); the fingerprint, lists
    and the ``done`` flag are dropped, and so are the top-level ``status`` / ``error`` (the trial
    records its own), not a nested one such as ``attack.<name>.error``."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if k in ("fingerprint", "raw", "done") and not prefix:
            continue
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, str) and (prefix or k not in ("status", "error")):   # attack.<name>.error stays
            out[key] = v
    return out


def _nan_objectives(flat: dict) -> dict:
    """Objectives that are missing or not finite become NaN (Optuna records such a trial as failed)."""
    for k in OBJECTIVES:
        v = flat.get(k)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            flat[k] = float("nan")
    return flat
