"""The Ray side of a sweep: connecting to Ray, the Tune experiment (OptunaSearch with both
objectives inside a ConcurrencyLimiter, or a grid for a study), restoring it, the STOP file and
the early stopping of hopeless trials (``rayunlearn.sweep.stopping``: Tune stoppers), the
progress lines, and the life cycle of the sweep's G-effect aggregator actor.

Resources. A trial runs the per-trial function in-process inside the Tune trial when
``resources.num_workers == 1`` (the trial reserves ``resources.cpus``/``gpus``); with more
workers the per-trial function launches a nested Ray Train ``TorchTrainer`` whose workers hold
the resources, so the trial itself reserves no CPU.

The aggregator. When effects are recorded, one named ``GEffectAggregator`` actor per sweep
collects every trial's G-effect rows and writes ``<sweep>/effects/<trial_id>/*.parquet``. Its name
reaches the trials through one channel: the trial config's ``effects.aggregator``
(``rayunlearn.sweep.trial.trial_config``). The driver holds the actor's handle for the whole
sweep and flushes and ends it in a ``finally``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional

from rayunlearn import UserError, runs
from rayunlearn.config import ConfigError
from rayunlearn.io import read_json
from rayunlearn.sweep.space import OBJECTIVES, SearchSpace, define_by_run
from rayunlearn.sweep.tables import fmt, write_tables
from rayunlearn.sweep.trial import TrialContext, mark_run_failed, retention_threshold, root_error, sweep_trial


# --------------------------------------------------------------------------------------------
# Ray


def init_ray(space: SearchSpace) -> None:
    """An existing cluster when ``ray.address`` or ``RAY_ADDRESS`` is set (``ray job submit``
    sets it), else a local instance with ``ray.num_cpus``, watched by ``rayunlearn.sweep.reaper``
    so that it ends with the driver; nothing when Ray is running already."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = space.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address if address.startswith(("ray://", "auto")) or ":" in address else "auto",
                 log_to_driver=True)
    else:
        ray.init(num_cpus=space.ray.num_cpus, num_gpus=space.ray.num_gpus, include_dashboard=False,
                 log_to_driver=True)
        from rayunlearn.sweep import reaper

        reaper.start(os.getpid())    # this Ray dies with the driver, even when it is SIGKILLed


class UnschedulableTrialError(UserError):
    """A trial asks for more CPUs or GPUs than the Ray cluster has (Tune would leave it pending
    forever)."""


AUTOSCALE_WAIT_ENV = "RAYUNLEARN_AUTOSCALE_WAIT_S"
AUTOSCALE_WAIT_DEFAULT_S = 900.0
# the cluster launcher (`ray up`) leaves its config here on the head of an autoscaling cluster
LAUNCHER_CONFIG = "ray_bootstrap_config.yaml"


def trial_bundles(space: SearchSpace) -> list[dict[str, float]]:
    """What one trial reserves, as Ray resource bundles (each on one node): the trial itself with
    ``num_workers == 1``, else ``num_workers`` Ray Train workers of ``cpus``/``gpus`` each."""
    bundle = {"CPU": float(space.resources.cpus)}
    if space.resources.gpus:
        bundle["GPU"] = float(space.resources.gpus)
    return [bundle] * space.resources.num_workers


def unschedulable_reason(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> Optional[str]:
    """Why ``bundles`` cannot all be placed on the nodes (their total resources) at once, or None:
    every bundle must fit on one node, and the bundles together in the cluster."""
    if not nodes:
        return "the cluster has no alive node"
    for key in sorted({k for b in bundles for k in b}):
        largest = max(n.get(key, 0.0) for n in nodes)
        need_one = max(b.get(key, 0.0) for b in bundles)
        if need_one > largest:
            return f"one needs {key}={need_one:g} on one node, the largest node has {key}={largest:g}"
        need, have = sum(b.get(key, 0.0) for b in bundles), sum(n.get(key, 0.0) for n in nodes)
        if need > have:
            return f"together they need {key}={need:g}, the cluster has {key}={have:g}"
    return None


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
            for n in ray.nodes() if n.get("Alive")]


def autoscale_wait_s() -> float:
    """How long to wait for the autoscaler to add nodes for a trial (0: no autoscaler, fail at
    once): ``RAYUNLEARN_AUTOSCALE_WAIT_S`` when set, else the default on a head started by the
    cluster launcher (its ``~/ray_bootstrap_config.yaml`` exists)."""
    env = os.environ.get(AUTOSCALE_WAIT_ENV)
    if env:
        try:
            return max(0.0, float(env))
        except ValueError:
            raise ConfigError(f"{AUTOSCALE_WAIT_ENV}={env!r}: expected seconds (a number)") from None
    return AUTOSCALE_WAIT_DEFAULT_S if (Path.home() / LAUNCHER_CONFIG).exists() else 0.0


def check_schedulable(space: SearchSpace, wait_s: float, poll_s: float = 10.0, say=print) -> None:
    """Fail before Tune starts when a trial cannot be scheduled on the cluster as it is, naming
    what a trial asks and what the cluster has. On an autoscaling cluster (``wait_s`` > 0) ask the
    autoscaler for the resources and wait up to ``wait_s`` seconds for them instead."""
    import time

    import ray

    bundles = trial_bundles(space)
    reason = unschedulable_reason(bundles, _node_resources())
    if reason is None:
        return
    asked = (f"resources: cpus={space.resources.cpus:g}, gpus={space.resources.gpus:g}, "
             f"num_workers={space.resources.num_workers}")
    if wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        say(f"[sweep] the cluster cannot run a trial yet ({asked}: {reason}); asked the autoscaler "
            f"for {bundles}, waiting up to {wait_s:g} s ({AUTOSCALE_WAIT_ENV})")
        request_resources(bundles=bundles)
        deadline = time.monotonic() + wait_s
        while reason is not None and time.monotonic() < deadline:
            time.sleep(poll_s)
            reason = unschedulable_reason(bundles, _node_resources())
        if reason is None:
            return
        asked += f" (after waiting {wait_s:g} s for the autoscaler)"
    have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    raise UnschedulableTrialError(
        f"a trial cannot be scheduled on this Ray cluster: {asked}; {reason} (cluster resources "
        f"{have}). Lower resources.cpus / resources.gpus / resources.num_workers, or start Ray "
        f"with more (ray.num_cpus, ray.num_gpus, more nodes); on an autoscaling cluster set "
        f"{AUTOSCALE_WAIT_ENV} to wait for new nodes")


# --------------------------------------------------------------------------------------------
# the Tune experiment


def make_sampler(name: str, seed: int, constraints_func=None):
    """The Optuna sampler of a space's ``sampler`` setting; ``constraints_func``: the retention
    floor (``rayunlearn.sweep.constraint``), which TPE and NSGA-II take (random search ignores it)."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          constraints_func=constraints_func)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_func)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler: {name!r} is not one of tpe, nsga2, random (grid uses no Optuna sampler)")


def make_search_alg(space: SearchSpace, storage, done_before: int = 0, retention_threshold: float | None = None):
    """OptunaSearch (multi-objective, define-by-run space) inside a ConcurrencyLimiter; its study
    is the sweep's study (named ``space.name``) in ``storage`` (``rayunlearn.sweep.study``),
    loaded with every earlier trial when it exists (``--extend``). The sampler's seed is
    ``seed + done_before``: an extension's sampler must not replay the random draws (random
    search, TPE's start-up trials) of the sweep it extends. With a ``retention_threshold``
    (``retention_floor``; ``rayunlearn.sweep.trial.retention_threshold``) the searcher tells the
    sampler each trial's constraint (``rayunlearn.sweep.constraint``)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    modes = [space.objectives[k] for k in OBJECTIVES]
    kwargs = dict(space=define_by_run(space), metric=list(OBJECTIVES), mode=modes, seed=space.seed,
                  study_name=space.name, storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # optuna's ExperimentalWarning for multivariate/constant_liar/constraints
        if retention_threshold is None:
            searcher = OptunaSearch(sampler=make_sampler(space.sampler, space.seed + done_before), **kwargs)
        else:
            from rayunlearn.sweep.constraint import FloorOptunaSearch, retention_constraint

            searcher = FloorOptunaSearch(sampler=make_sampler(space.sampler, space.seed + done_before,
                                                              retention_constraint),
                                         retention_threshold=retention_threshold, **kwargs)
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def make_trainable(space: SearchSpace, ctx: TrialContext):
    """:func:`rayunlearn.sweep.trial.sweep_trial` bound to the sweep's context, with the
    resources one trial reserves."""
    from ray import tune

    fn = tune.with_parameters(sweep_trial, ctx=ctx)
    if space.resources.num_workers > 1:
        return tune.with_resources(fn, {"cpu": 0})      # the nested TorchTrainer's workers hold resources
    res = {"cpu": space.resources.cpus}
    if space.resources.gpus:
        res["gpu"] = space.resources.gpus
    return tune.with_resources(fn, res)


def build_tuner(space: SearchSpace, trainable, sweep_dir: Path, storage, num_samples: int, done_before: int = 0,
                callbacks: tuple = ()):
    """A new Tune experiment in ``<sweep>/tune/``: ``num_samples`` Optuna trials (the study in
    ``storage``; ``done_before`` trials of an extended sweep finished earlier), or under
    ``sampler: grid`` every family once (Tune's grid search, no Optuna); ``callbacks``: more
    Tune callbacks (the MLflow tracker)."""
    from ray import tune

    run_config = tune.RunConfig(
        name=runs.TUNE_DIR, storage_path=str(sweep_dir),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        stop=_stoppers(space, sweep_dir),
        callbacks=[_finished_trial_callback(space, sweep_dir, done_before), *callbacks], verbose=1)
    if space.sampler == "grid":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tune_config = tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=space.max_concurrent),
                                      num_samples=1, reuse_actors=space.ray.reuse_actors)
        return tune.Tuner(trainable, param_space={"family": tune.grid_search(list(space.families))},
                          tune_config=tune_config, run_config=run_config)
    search_alg = make_search_alg(space, storage, done_before, retention_threshold(space, sweep_dir))
    tune_config = tune.TuneConfig(search_alg=search_alg, num_samples=num_samples,
                                  reuse_actors=space.ray.reuse_actors)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def can_restore(sweep_dir: Path) -> bool:
    """Whether ``<sweep>/tune/`` holds a Tune experiment that ``--resume`` can restore."""
    from ray import tune

    exp = sweep_dir / runs.TUNE_DIR
    return exp.exists() and tune.Tuner.can_restore(str(exp))


def restore_tuner(trainable, sweep_dir: Path, done_before: int = 0):
    """The interrupted experiment of ``<sweep>/tune/`` (the Optuna searcher's state and Tune's
    callbacks included), set to run only what is missing: finished trials are never re-run.
    ``done_before``: trials finished before this experiment (an interrupted ``--extend``)."""
    from ray import tune

    exp_dir = sweep_dir / runs.TUNE_DIR
    _unfinish_search(exp_dir, sweep_dir, done_before)
    return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)


def _unfinish_search(exp_dir: Path, sweep_dir: Path, done_before: int = 0) -> None:
    """A graceful stop (the STOP file: Tune's ``Stopper.stop_all``) marks the search generator
    finished in its saved state, and a restored experiment would then start no new trial. Clear
    that flag in the newest ``search_gen_state-*.json`` (cloudpickle, written by Tune) when
    samples remain, and count only the finished trials as generated. Ctrl-C does not set it.
    (Relies on Tune's saved-state layout, checked by tests/test_sweep.py.)"""
    import ray.cloudpickle as cloudpickle

    paths = sorted(glob.glob(str(exp_dir / "search_gen_state-*.json")))
    if not paths:
        return
    with open(paths[-1], "rb") as fh:
        state = cloudpickle.load(fh)
    if isinstance(state, dict) and state.get("finished") and state.get("counter", 0) < state.get("total_samples", 0):
        state["finished"] = False
        # trials the stop terminated before they reported count as generated: generate again
        # until num_samples trials have finished
        finished = len(list((sweep_dir / runs.TRIALS_DIR).glob(f"*/{runs.RESULT_FILE}"))) - done_before
        state["counter"] = min(state["counter"], finished)
        # trials cut by the stop never complete in the limiter's eyes: forget them, or the
        # limiter would wait for them forever
        lim = state.get("name:ConcurrencyLimiter")
        if isinstance(lim, dict):
            lim["live_trials"] = set()
            lim["num_unfinished_live_trials"] = 0
            lim["cached_results"] = {}
        tmp = paths[-1] + ".tmp"
        with open(tmp, "wb") as fh:
            cloudpickle.dump(state, fh)
        os.replace(tmp, paths[-1])


def _stoppers(space: SearchSpace, sweep_dir: Path):
    """The experiment's stoppers: the STOP file's, and the early stopping of hopeless trials
    (``rayunlearn.sweep.stopping``) when the space's rules can act."""
    from ray.tune.stopper import CombinedStopper

    from rayunlearn.sweep.stopping import make_stopper

    early = make_stopper(space, sweep_dir)
    stop_file = _stop_file_stopper(sweep_dir)
    return stop_file if early is None else CombinedStopper(stop_file, early)


def _stop_file_stopper(sweep_dir: Path):
    """A Tune stopper: the whole experiment stops when ``<sweep>/STOP`` exists."""
    from ray.tune.stopper import Stopper

    class StopFile(Stopper):
        def __init__(self, path: str):
            self.path = path

        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return os.path.exists(self.path)

    return StopFile(str(sweep_dir / runs.STOP_FILE))


def _finished_trial_callback(space: SearchSpace, sweep_dir: Path, done_before: int = 0):
    """A Tune callback on the driver: for every finished trial one progress line, and
    ``trials.parquet`` and ``pareto.json`` rewritten (atomically), so the tables are current
    even when the driver is killed."""
    from ray.tune import Callback

    class FinishedTrials(Callback):
        def __init__(self):
            self.done = done_before
            self.errors: dict[str, str] = {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            r = trial.last_result or {}
            # a stopped trial's last result is the evaluation it was stopped at (still "running"):
            # its status is in the result.json the stopper wrote
            res_file = runs.trial_dir(sweep_dir, trial.trial_id) / runs.RESULT_FILE
            status = read_json(res_file).get("status") if res_file.exists() else r.get("status", "?")
            print(f"[sweep] trial {trial.trial_id} {status} ({self.done}/{space.total_trials}): "
                  f"removal={fmt(r.get('removal'))} retention={fmt(r.get('retention'))} "
                  f"{r.get('method', '')}", flush=True)
            write_tables(space, sweep_dir, errors=self.errors)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            error = trial.get_error()      # a system error, retried max_failures times already
            self.errors[trial.trial_id] = runs.short_error(root_error(error)) if error is not None else runs.FAILED
            mark_run_failed(runs.trial_dir(sweep_dir, trial.trial_id), self.errors[trial.trial_id])
            print(f"[sweep] trial {trial.trial_id} {runs.FAILED} ({self.done}/{space.total_trials}): "
                  f"{self.errors[trial.trial_id]}", flush=True)
            write_tables(space, sweep_dir, errors=self.errors)

    return FinishedTrials()


# --------------------------------------------------------------------------------------------
# the G-effect aggregator actor


def start_aggregator(space: SearchSpace, sweep_dir: Path):
    """One named G-effect aggregator actor per sweep (``rayunlearn.effects.make_aggregator``,
    writing ``<sweep>/effects/<trial_id>/*.parquet``) when effects are recorded, else None;
    returns (name, handle). The driver keeps the handle so the actor lives as long as the sweep;
    trials find it by the name in their ``effects.aggregator``."""
    if space.unlearn.effects.every <= 0:
        return None
    from rayunlearn.effects import make_aggregator

    name = aggregator_name(space, sweep_dir)
    return name, make_aggregator(str(sweep_dir), name=name)


def aggregator_name(space: SearchSpace, sweep_dir: Path) -> str:
    """The sweep's aggregator actor name: deterministic (not Python's salted ``hash``), so a
    resumed sweep gives its trials the same ``effects.aggregator`` and their saved config.yaml
    still matches."""
    return f"rayunlearn-geffects-{space.name}-{hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:10]}"


def stop_aggregator(agg: Optional[tuple]) -> None:
    """Write every G-effect table the sweep's aggregator still holds, then end the actor (called
    in a ``finally``: also when the sweep is interrupted)."""
    if not agg:
        return
    import ray

    name, actor = agg
    try:
        ray.get(actor.close.remote(), timeout=120)
    except Exception as exc:  # noqa: BLE001 - report, and still end the actor
        print(f"warning: could not flush the G-effect aggregator {name}: {exc}")
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone
        pass
