"""One sweep trial, top to bottom: :func:`sweep_trial` is the Ray Tune function trainable.

Tune calls it with the sampled point (``config``, from ``rayunlearn.sweep.space.define_by_run``)
and the sweep's :class:`TrialContext`. It

1. decodes the point into a family and its hyper-parameters and builds the method string
   (the family was parsed once, when the space was loaded);
2. writes ``trials/<trial_id>/trial.json`` (the search point) and appends one line to
   ``attempts.jsonl`` (a retried trial shows every start);
3. builds the trial's :class:`~rayunlearn.config.UnlearnConfig` (:func:`trial_config`: the space's
   ``unlearn`` sections, the prepared target model and data, ``effects.aggregator`` = the sweep's
   G-effect aggregator actor) and calls the per-trial function (``space.trainable``, by default
   ``rayunlearn.train:unlearn_trial``), which writes the run directory and sends its G-effect rows;
4. writes ``result.json`` (status, error, time, the flattened metrics, where the time went:
   ``time.<phase>``, :func:`time_breakdown`) and reports the objectives
   to Tune. A :class:`rayunlearn.runs.DivergedError` is a result (status ``diverged``, NaN
   objectives), not an error: divergence is deterministic, so Tune must not retry it.

Failures. An exception raised by the trial's own code (a bad hyper-parameter, a model that blows
up at evaluation) is deterministic too: it is recorded once as ``failed`` with a one-line error
(the root exception, no traceback, no colour codes), the run's ``status.json`` is marked failed,
and the trial reports instead of raising, so Tune does not retry it. Only Ray's system errors (a
killed worker, a lost node: :func:`is_system_error`) propagate, so that Tune retries the trial
from its checkpoint (``max_failures``).

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
import re
import time
from pathlib import Path
from typing import Any, Optional

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


def sweep_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable: one unlearning run with the sampled hyper-parameters (see the
    module docstring for the files it writes)."""
    from ray import tune

    space = from_dict(SearchSpace, ctx.space)
    trial_id = tune.get_context().get_trial_id()
    family_name, hp = decode(space, config)
    family = space.parsed_families[family_name]
    method = family.method_string(hp)
    run_dir = runs.trial_dir(ctx.sweep_dir, trial_id)
    base = {"trial_id": trial_id, "family": family_name, "method": method,
            **{f"{runs.HP_PREFIX}{k}": v for k, v in hp.items()}}
    recorded = read_json(run_dir / runs.RESULT_FILE) if (run_dir / runs.RESULT_FILE).exists() else {}
    if recorded.get("status") in runs.FINISHED_STATUSES:
        tune.report({**base, **_nan_objectives(dict(recorded.get("metrics", {}))),
                     "status": recorded["status"], "error": recorded.get("error", "")})
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / runs.TRIAL_FILE, {
        "trial_id": trial_id, "family": family_name, "method": method, "hp": hp,
        "unit": family.unit(hp), "retain_keys": family.retain_keys(hp),
    })
    append_jsonl(run_dir / runs.ATTEMPTS_FILE, {"time": time.time(), "pid": os.getpid()})

    def report(metrics: dict) -> None:
        if metrics.get("done"):
            return      # the final result is reported below, once, with its status
        tune.report({**base, **_nan_objectives(flatten_metrics(metrics)), "status": runs.RUNNING, "error": ""})

    t0 = time.time()
    try:
        cfg = trial_config(space, ctx, trial_id, method)
        if space.resources.torch_threads and space.resources.num_workers == 1:
            import torch

            torch.set_num_threads(space.resources.torch_threads)
        fn = import_trainable(space.trainable)
        metrics = fn(cfg, report=report, **space.trainable_options)
        status, error = str(metrics.get("status", runs.COMPLETED)), str(metrics.get("error", ""))
    except Exception as exc:   # noqa: BLE001 - a result, unless Ray lost the worker (then retried)
        if is_system_error(exc):
            raise
        if isinstance(exc, runs.DivergedError):
            metrics, status, error = {}, runs.DIVERGED, short_error(exc)
        else:
            metrics, status, error = {}, runs.FAILED, short_error(root_error(exc))
            mark_run_failed(run_dir, error)
    time_s = time.time() - t0
    flat = _nan_objectives(flatten_metrics(metrics))
    flat.update(time_breakdown(flat, time_s))
    write_json(run_dir / runs.RESULT_FILE, {**_result_base(trial_id, family_name, method, hp), "status": status,
                                            "error": error, "time_s": time_s, "metrics": flat})
    tune.report({**base, **flat, "status": status, "error": error})


def time_breakdown(flat: dict, time_s: float) -> dict:
    """``time.other``: the part of the trial's ``time_s`` outside the phases its run measured
    (``time.<phase>``, ``rayunlearn.train.timing``), so that the breakdown sums to ``time_s``;
    nothing for a run that measured none (it failed before finishing, or ran with several
    workers, whose metrics come from metrics.json)."""
    measured = [flat[f"{runs.TIME_PREFIX}{p}"] for p in runs.TIME_PHASES if f"{runs.TIME_PREFIX}{p}" in flat]
    return {f"{runs.TIME_PREFIX}{runs.TIME_OTHER}": time_s - sum(measured)} if measured else {}


def trial_config(space: SearchSpace, ctx: TrialContext, trial_id: str, method: str) -> UnlearnConfig:
    """The UnlearnConfig of one trial: the space's ``unlearn`` sections with the trial's method,
    its run directory (``<sweep>/trials/<trial_id>``), the prepared target model and data, the
    retain and target references and the sweep's aggregator actor."""
    unlearn = to_dict(space.unlearn)
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


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def short_error(exc: BaseException) -> str:
    """``Type: message`` on one line, without terminal colour codes, cut to 500 characters (a
    table cell, not a traceback)."""
    text = " ".join(_ANSI.sub("", f"{type(exc).__name__}: {exc}").split())
    return text if len(text) <= 500 else text[:497] + "..."


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
