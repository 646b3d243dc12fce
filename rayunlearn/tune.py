"""Ray Tune + Optuna sweeps: search space -> trials -> ``results/<sweep>/``.

    rayunlearn sweep search_spaces/wga_kl.yaml [key=value ...] [--resume]

1. The search space (``rayunlearn.sweep.space``) is loaded and validated; the resolved space is
   saved as ``<sweep>/sweep.yaml`` (a later run into the same directory must use the same space).
2. Preparation, once per data/model setting and cached under ``<results>/prepared/<hash>/``:
   the synthetic benchmark, the base, target and retain models (``rayunlearn.train.finetune``)
   and the retain and target models' reference evaluations (``<sweep>/reference/*.json``).
3. A Ray Tune experiment: ``OptunaSearch`` with both objectives (``metric=["removal",
   "retention"], mode=["max", "max"]``), sampler TPE (multi-objective), NSGA-II or random,
   seeded, wrapped in ``ConcurrencyLimiter(max_concurrent)``; ``num_samples`` trials. Each trial
   runs ``rayunlearn.train.unlearn_trial`` **in-process inside the Tune trial** when
   ``resources.num_workers == 1`` (the trial reserves ``resources.cpus``/``gpus``), or launches
   a nested Ray Train ``TorchTrainer`` with ``num_workers`` workers otherwise (the trial itself
   then reserves no CPU; each worker takes ``cpus``/``gpus``). G-effects of every trial go to
   one ``GEffectAggregator`` actor per sweep when ``rayunlearn.effects`` provides it.
4. Tables: ``trials.parquet`` (one row per trial: trial_id, family, method, status
   (completed | diverged | failed | incomplete), error, time_s, ``hp.<term>.<param>``, removal,
   retention and every flattened scalar metric) and ``pareto.json`` (the non-dominated
   completed trials, ``rayunlearn.pareto``).

Faults. A trial whose worker dies is retried up to ``max_failures`` times
(``FailureConfig``); the retry reuses the trial directory, so the unlearning loop resumes from
its last checkpoint (``train.checkpoint_every``). A diverging run (``DivergedError``) is not an
error for Tune: the trial reports ``status=diverged``, the reason and NaN objectives (Optuna
records it as failed) and the sweep goes on.

Interrupt and resume. Ctrl-C, a killed driver, or ``touch <sweep>/STOP`` (a graceful stop after
the running trials report) leave Tune's experiment state in ``<sweep>/tune/``;
``--resume`` restores it with ``Tuner.restore`` (the Optuna searcher's state included) and runs
only what is missing: finished trials are never re-run.

Ray: an existing cluster when ``ray.address`` or ``RAY_ADDRESS`` is set (``ray job submit``
sets it), else a local instance (``ray.init(num_cpus=ray.num_cpus, include_dashboard=False)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from rayunlearn import UserError
from rayunlearn.config import ConfigError, UnlearnConfig, from_dict, to_dict
from rayunlearn.io import append_jsonl, read_json, write_json, write_parquet, write_text
from rayunlearn.pareto import hypervolume_2d, pareto_front
from rayunlearn.sweep.space import (SearchSpace, decode, define_by_run, dumps_space, is_retain_term,
                                    load_space, method_string)

OBJECTIVES = ("removal", "retention")
TUNE_DIR = "tune"
STOP_FILE = "STOP"
AGGREGATOR_ENV = "RAYUNLEARN_GEFFECT_AGGREGATOR"


# --------------------------------------------------------------------------------------------
# entry points


def sweep_command(space_path: str, overrides: list[str] | None = None, resume: bool = False) -> int:
    """CLI: load the space (file + ``key=value`` overrides), run or resume the sweep."""
    space = load_space(space_path, overrides)
    sweep_dir, summary = run_sweep(space, resume=resume)
    if summary["finished"] and not summary["counts"].get("completed"):
        print(f"no trial completed; see the error column of {sweep_dir}/trials.parquet")
        return 1
    if summary.get("interrupted"):
        print(f"the sweep stopped before its {space.total_trials} trials finished; continue it with "
              f"`rayunlearn sweep {space_path} {' '.join(overrides or [])} --resume`".replace("  ", " "))
        return 130
    return 0


def run_sweep(space: SearchSpace, resume: bool = False, console=None) -> tuple[Path, dict]:
    """Run (or resume) the sweep described by ``space``; returns (sweep dir, summary) where the
    summary counts trials by status and lists the Pareto trial ids."""
    from rich.console import Console

    console = console or Console()
    sweep_dir = space.sweep_dir().resolve()
    exp_dir = sweep_dir / TUNE_DIR
    _check_sweep_dir(space, sweep_dir, resume)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text(sweep_dir / "sweep.yaml", dumps_space(space))
    (sweep_dir / STOP_FILE).unlink(missing_ok=True)

    prepared = None
    if space.prepare.enabled:
        from rayunlearn.sweep.prepare import copy_references, prepare

        prepared = prepare(space, console=console)
        copy_references(prepared, sweep_dir)

    _init_ray(space)
    aggregator = _start_aggregator(space, sweep_dir)
    ctx = TrialContext(space=to_dict(space), sweep_dir=str(sweep_dir),
                       target=prepared.target if prepared else "",
                       data=to_dict(prepared.data) if prepared else None,
                       retain_reference=(str(sweep_dir / "reference" / "retain.json")
                                         if prepared and prepared.retain_reference else None),
                       aggregator=aggregator[0] if aggregator else None)
    trainable = _trainable(space, ctx)
    from ray import tune

    if resume:
        console.print(f"[bold]resuming[/] the sweep in {sweep_dir}")
        _unfinish_search(exp_dir, sweep_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        tuner = _build_tuner(space, trainable, sweep_dir)
    t0 = time.time()
    try:
        grid = tuner.fit()
    finally:
        _stop_aggregator(aggregator)
    summary = write_tables(space, sweep_dir, grid=grid)
    summary["wall_s"] = time.time() - t0
    summary["interrupted"] = (summary["finished"] < space.total_trials)
    print_summary(space, sweep_dir, summary, console)
    return sweep_dir, summary


# --------------------------------------------------------------------------------------------
# the trial


@dataclasses.dataclass
class TrialContext:
    """What every trial needs besides its sampled hyper-parameters (plain data, picklable)."""

    space: dict
    sweep_dir: str
    target: str
    data: Optional[dict]
    retain_reference: Optional[str]
    aggregator: Optional[str]


def sweep_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune function trainable: one unlearning run with the sampled hyper-parameters.

    Writes ``trials/<id>/trial.json`` (the search point), appends to ``attempts.jsonl`` (one line
    per start: retries are visible), runs the per-trial function and writes ``result.json``
    (status, error, time, flattened metrics); reports the objectives to Tune."""
    from ray import tune

    space = from_dict(SearchSpace, ctx.space)
    trial_id = tune.get_context().get_trial_id()
    family, hp = decode(space, config)
    method = method_string(family, hp)
    sweep_dir = Path(ctx.sweep_dir)
    run_dir = sweep_dir / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    dists = space.distributions[family]
    write_json(run_dir / "trial.json", {
        "trial_id": trial_id, "family": family, "method": method, "hp": hp,
        "unit": {k: dists[k].unit(v) for k, v in hp.items() if dists[k].type != "fixed"},
        "retain_keys": [k for k in hp if is_retain_term(family, k)],
    })
    append_jsonl(run_dir / "attempts.jsonl", {"time": time.time(), "pid": os.getpid()})
    cfg = _trial_config(space, ctx, trial_id, method)
    if space.resources.torch_threads and space.resources.num_workers == 1:
        import torch

        torch.set_num_threads(space.resources.torch_threads)
    if ctx.aggregator:
        os.environ[AGGREGATOR_ENV] = ctx.aggregator
    fn = _import(space.trainable)
    base = {"trial_id": trial_id, "family": family, "method": method,
            **{f"hp.{k}": v for k, v in hp.items()}}

    def report(metrics: dict) -> None:
        if metrics.get("done"):
            return      # the final result is reported below, once, with its status
        tune.report({**base, **_nan_objectives(flatten_metrics(metrics)), "status": "running", "error": ""})

    t0 = time.time()
    try:
        metrics = fn(cfg, report=report, **space.trainable_options)
        status, error = str(metrics.get("status", "completed")), str(metrics.get("error", ""))
        if status in ("complete", "completed"):
            status = "completed"
    except Exception as exc:   # noqa: BLE001 - recorded, then re-raised unless it is a divergence
        if not _is_divergence(exc):
            write_json(run_dir / "result.json", {**_row_base(base), "status": "failed",
                                                 "error": _short_error(exc), "time_s": time.time() - t0})
            raise
        metrics, status, error = {}, "diverged", _short_error(exc)
    flat = _nan_objectives(flatten_metrics(metrics))
    row = {**_row_base(base), "status": status, "error": error, "time_s": time.time() - t0,
           "metrics": flat}
    write_json(run_dir / "result.json", row)
    tune.report({**base, **flat, "status": status, "error": error})


def _row_base(base: dict) -> dict:
    return {"trial_id": base["trial_id"], "family": base["family"], "method": base["method"],
            "hp": {k[3:]: v for k, v in base.items() if k.startswith("hp.")}}


def _trial_config(space: SearchSpace, ctx: TrialContext, trial_id: str, method: str) -> UnlearnConfig:
    unlearn = to_dict(space.unlearn)
    unlearn["train"]["num_workers"] = space.resources.num_workers
    unlearn["train"]["use_gpu"] = bool(space.resources.gpus > 0)
    if ctx.retain_reference:
        unlearn["eval"]["retain_reference"] = ctx.retain_reference
    values = {"method": method, "out": ctx.sweep_dir, "trial_id": trial_id, "target": ctx.target,
              "data": ctx.data if ctx.data is not None else to_dict(space.data),
              "model": to_dict(space.model), **unlearn}
    if ctx.aggregator and "aggregator" in {f.name for f in dataclasses.fields(type(space.unlearn.effects))}:
        values["effects"]["aggregator"] = ctx.aggregator
    return from_dict(UnlearnConfig, values)


def _is_divergence(exc: BaseException) -> bool:
    return "diverg" in type(exc).__name__.lower()


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


def _import(spec: str):
    import importlib

    mod, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"trainable: cannot import {spec!r} ({exc})") from None


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """Scalar leaves of a metrics dict with dotted keys (``forget.prob``); the fingerprint, lists
    and the ``done`` flag are dropped."""
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
        elif isinstance(v, str) and k not in ("status", "error"):
            out[key] = v
    return out


def _nan_objectives(flat: dict) -> dict:
    for k in OBJECTIVES:
        v = flat.get(k)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            flat[k] = float("nan")
    return flat


# --------------------------------------------------------------------------------------------
# Tune plumbing


def make_sampler(name: str, seed: int):
    """The Optuna sampler of a space's ``sampler`` setting."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"sampler: {name!r} is not one of tpe, nsga2, random (grid uses no Optuna sampler)")


def make_search_alg(space: SearchSpace):
    """OptunaSearch (multi-objective, define-by-run space) inside a ConcurrencyLimiter."""
    import warnings

    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    modes = [space.objectives[k] for k in OBJECTIVES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # optuna's ExperimentalWarning for multivariate/constant_liar
        searcher = OptunaSearch(space=define_by_run(space), metric=list(OBJECTIVES), mode=modes,
                                sampler=make_sampler(space.sampler, space.seed), seed=space.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def _trainable(space: SearchSpace, ctx: TrialContext):
    from ray import tune

    fn = tune.with_parameters(sweep_trial, ctx=ctx)
    if space.resources.num_workers > 1:
        return tune.with_resources(fn, {"cpu": 0})      # the nested TorchTrainer's workers hold resources
    res = {"cpu": space.resources.cpus}
    if space.resources.gpus:
        res["gpu"] = space.resources.gpus
    return tune.with_resources(fn, res)


def _unfinish_search(exp_dir: Path, sweep_dir: Path) -> None:
    """A graceful stop (the STOP file: Tune's ``Stopper.stop_all``) marks the search generator
    finished in its saved state, and a restored experiment would then start no new trial. Clear
    that flag in the newest ``search_gen_state-*.json`` (cloudpickle, written by Tune) when
    samples remain, and count only the finished trials as generated. Ctrl-C does not set it.
    (Relies on Tune's saved-state layout, checked by tests/test_sweep.py.)"""
    import glob

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
        finished = len(list((sweep_dir / "trials").glob("*/result.json")))
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


class _StopFile:
    """A Tune stopper: the whole experiment stops when ``<sweep>/STOP`` exists."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return os.path.exists(self.path)


def _stopper(sweep_dir: Path):
    from ray.tune.stopper import Stopper

    class StopFile(_StopFile, Stopper):
        pass

    return StopFile(str(sweep_dir / STOP_FILE))


class _Progress:
    """A Tune callback printing one line per finished trial."""

    def __new__(cls, total: int):
        from ray.tune import Callback

        class Progress(Callback):
            def __init__(self):
                self.done = 0

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done += 1
                r = trial.last_result or {}
                print(f"[sweep] trial {trial.trial_id} {r.get('status', '?')} ({self.done}/{total}): "
                      f"removal={_fmt(r.get('removal'))} retention={_fmt(r.get('retention'))} "
                      f"{r.get('method', '')}", flush=True)

            def on_trial_error(self, iteration, trials, trial, **info):
                self.done += 1
                print(f"[sweep] trial {trial.trial_id} failed ({self.done}/{total})", flush=True)

        return Progress()


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)


def _build_tuner(space: SearchSpace, trainable, sweep_dir: Path):
    from ray import tune

    run_config = tune.RunConfig(
        name=TUNE_DIR, storage_path=str(sweep_dir),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        stop=_stopper(sweep_dir), callbacks=[_Progress(space.total_trials)], verbose=1)
    if space.sampler == "grid":
        # a study: every family once at its fixed values (Tune's grid search, no Optuna)
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tune_config = tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=space.max_concurrent),
                                      num_samples=1, reuse_actors=False)
        return tune.Tuner(trainable, param_space={"family": tune.grid_search(list(space.families))},
                          tune_config=tune_config, run_config=run_config)
    tune_config = tune.TuneConfig(search_alg=make_search_alg(space), num_samples=space.num_samples,
                                  reuse_actors=False)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _init_ray(space: SearchSpace) -> None:
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


def _start_aggregator(space: SearchSpace, sweep_dir: Path):
    """One named G-effect aggregator actor per sweep (``rayunlearn.effects.make_aggregator``,
    writing ``<sweep>/effects/<trial_id>/*.parquet``) when effects are recorded; returns
    (name, handle) — the handle is kept by the driver so the actor lives as long as the sweep.
    Trials find it by name: ``effects.aggregator`` when UnlearnConfig has that field, and the
    environment variable RAYUNLEARN_GEFFECT_AGGREGATOR."""
    if space.unlearn.effects.every <= 0:
        return None
    try:
        from rayunlearn.effects import make_aggregator
    except ImportError:
        return None
    name = _aggregator_name(space, sweep_dir)
    return name, make_aggregator(str(sweep_dir), name=name)


def _aggregator_name(space: SearchSpace, sweep_dir: Path) -> str:
    """The sweep's aggregator actor name: deterministic (not Python's salted ``hash``), so a
    resumed sweep gives its trials the same ``effects.aggregator`` and their saved config.yaml
    still matches."""
    import hashlib

    return f"rayunlearn-geffects-{space.name}-{hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:10]}"


def _stop_aggregator(agg) -> None:
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


def _check_sweep_dir(space: SearchSpace, sweep_dir: Path, resume: bool) -> None:
    saved = sweep_dir / "sweep.yaml"
    exp = sweep_dir / TUNE_DIR
    if resume:
        from ray import tune

        if not exp.exists() or not tune.Tuner.can_restore(str(exp)):
            raise UserError(f"nothing to resume in {sweep_dir} (no Tune experiment in {exp}); "
                            f"run the sweep without --resume")
        if saved.exists():
            import yaml

            before = yaml.safe_load(saved.read_text()) or {}
            from rayunlearn.config import _diff

            diffs = _diff(before, to_dict(space), "", ())
            if diffs:
                raise ConfigError(f"{sweep_dir} holds a sweep with a different search space "
                                  f"({'; '.join(diffs[:5])}); resume with the same settings")
        return
    if exp.exists():
        raise UserError(f"{sweep_dir} already holds a sweep; continue it with --resume, or choose "
                        f"another name (name=...) or results directory (results=...)")


# --------------------------------------------------------------------------------------------
# tables


def collect_rows(sweep_dir: Path, grid=None) -> list[dict]:
    """One row per trial directory: from ``result.json`` (written by the trial), with Tune's
    error for trials that died without one (a worker killed beyond ``max_failures``)."""
    errors: dict[str, str] = {}
    if grid is not None:
        for r in grid:
            if r.error is not None:
                tid = (r.metrics or {}).get("trial_id") or _trial_id_from_path(sweep_dir, r.path)
                if tid:
                    errors[tid] = _short_error(r.error)
    rows = []
    for tdir in sorted((sweep_dir / "trials").glob("*/trial.json")):
        rec = read_json(tdir)
        res_path = tdir.parent / "result.json"
        res = read_json(res_path) if res_path.exists() else {}
        tid = rec["trial_id"]
        status = res.get("status")
        error = res.get("error", "")
        if status is None:
            status, error = ("failed", errors[tid]) if tid in errors else ("incomplete", "")
        elif status == "failed" and tid in errors:
            error = errors[tid]
        attempts = len((tdir.parent / "attempts.jsonl").read_text().splitlines()) \
            if (tdir.parent / "attempts.jsonl").exists() else 0
        row = {"trial_id": tid, "family": rec["family"], "method": rec["method"], "status": status,
               "error": error, "time_s": float(res.get("time_s", float("nan"))), "attempts": attempts}
        for k, v in rec["hp"].items():
            row[f"hp.{k}"] = v
        metrics = res.get("metrics", {})
        row["removal"] = metrics.get("removal", float("nan"))
        row["retention"] = metrics.get("retention", float("nan"))
        for k, v in metrics.items():
            if k not in row:
                row[k] = v
        rows.append(row)
    return rows


def _trial_id_from_path(sweep_dir: Path, path: str | None) -> Optional[str]:
    if not path:
        return None
    name = Path(path).name
    for d in (sweep_dir / "trials").glob("*"):
        if d.name in name:
            return d.name
    return None


def write_tables(space: SearchSpace, sweep_dir: Path, grid=None) -> dict:
    """Write ``trials.parquet`` and ``pareto.json``; return a summary."""
    import pyarrow as pa

    rows = collect_rows(sweep_dir, grid)
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    data = {}
    for c in columns:
        vals = [r.get(c) for r in rows]
        data[c] = _column(vals)
    table = pa.table(data) if rows else pa.table({c: pa.array([], pa.string()) for c in
                                                  ("trial_id", "family", "method", "status", "error")})
    write_parquet(sweep_dir / "trials.parquet", table)
    pareto = pareto_json(space, rows)
    write_json(sweep_dir / "pareto.json", pareto)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    finished = sum(v for k, v in counts.items() if k in ("completed", "diverged", "failed"))
    return {"counts": counts, "finished": finished, "pareto": pareto["trials"], "rows": rows,
            "hypervolume": pareto["hypervolume"]}


def _column(vals: list):
    import pyarrow as pa

    present = [v for v in vals if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.array([float(v) if v is not None else None for v in vals], pa.float64())
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(vals, pa.bool_())
    return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in vals],
                    pa.string())


def pareto_json(space: SearchSpace, rows: list[dict]) -> dict:
    """The non-dominated completed trials (``rayunlearn.pareto.pareto_front``) and the
    hypervolume with reference point (0, 0) (both objectives are scores in [0, 1])."""
    done = [r for r in rows if r["status"] == "completed"]
    points = [[r["removal"], r["retention"]] for r in done]
    front = pareto_front(points, maximize=space.maximize)
    front = sorted(front, key=lambda i: (points[i][0], points[i][1]))
    hv = hypervolume_2d(points, ref=(0.0, 0.0), maximize=space.maximize) if all(space.maximize) else None
    return {"objectives": list(OBJECTIVES), "maximize": list(space.maximize),
            "trials": [done[i]["trial_id"] for i in front],
            "points": [points[i] for i in front],
            "methods": [done[i]["method"] for i in front],
            "hypervolume": hv, "hypervolume_reference": [0.0, 0.0],
            "num_completed": len(done), "num_trials": len(rows)}


def print_summary(space: SearchSpace, sweep_dir: Path, summary: dict, console) -> None:
    from rich.table import Table

    front = set(summary["pareto"])
    table = Table(title=f"sweep {space.name}: {summary['counts']}  (Pareto front: *)")
    for c in ("", "trial", "status", "removal", "retention", "method"):
        table.add_column(c)
    for r in sorted(summary["rows"], key=lambda r: -(r["removal"] if math.isfinite(r["removal"]) else -1e9)):
        table.add_row("*" if r["trial_id"] in front else "", r["trial_id"], r["status"], _fmt(r["removal"]),
                      _fmt(r["retention"]), r["method"] if r["status"] != "failed" else r["error"][:60])
    console.print(table)
    console.print(f"wrote {sweep_dir}/trials.parquet and pareto.json "
                  f"(hypervolume {_fmt(summary['hypervolume'])})")
