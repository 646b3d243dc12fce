"""`rayunlearn bench sweep`: (a) N real tiny unlearning trials through Ray Tune with 2 concurrent
trials vs the same N runs one after another in-process; (b) search quality: Pareto hypervolume
after 24 trials, Optuna's multi-objective sampler (the sweep's TPE, and NSGA-II) vs random
search, over 3 seeds.

(a) uses the shipped space ``tiny``: its models are prepared once (about a minute on two busy
cores; cached under ``results/bench_sweep/prepared/``, reused by later runs and not timed), then
every trial is a real ``unlearn_trial`` (WGA+KL on the tiny model, G-effects every 2 steps, a
final TOFU evaluation) with ``unlearn.train.epochs`` raised so that one trial is a few seconds of
work. The Tune runs go first (sampling N methods with TPE; N is within TPE's random start-up
trials, so both runs sample the same N methods): before, every trial in a fresh Ray worker
process (``ray.reuse_actors=false``: each trial pays the worker's start and the imports of torch,
transformers and rouge), then after, trials reusing the process of a finished one (the default);
their trials tables must agree in every metric column (:func:`metric_differences`). The
in-process runs then repeat the *same* N method strings with torch threads = 1 (what each of
the 2 concurrent Tune trials gets); one of them is also run with threads = 2 (one trial using
both cores) and projected to N. Reported: the wall times, ``ray.init`` separately, the mean time
inside a trial in each setting, the Tune overhead (wall - the trials' own time / 2), where a
Tune trial's time goes (``time.<phase>`` of trials.parquet, :func:`time_breakdown`), before and
after side by side, split into trials that were the first in their process and trials in a
reused one (:func:`breakdown_by_process`), and the sweep's efficiency (the trials' own time /
concurrency, over the wall time: 1 when the trials keep every slot busy).

(c) early stopping (``rayunlearn.sweep.stopping``): the Pareto hypervolume of the completed trials
against the compute spent (the sum of every trial's ``time_s``, stopped ones included), the same
sweep with early stopping off and on (collapse under ``retention_floor`` and dominance at the same
step), side by side: (1) on the synthetic trade-off (``rayunlearn.sweep.synthetic`` with a
20-step trajectory and a collapsing ``ga`` family beside ``wga+kl``), with random search (both
runs sample the same points, so the difference is what stopping removed) and with TPE (the
sampler then also learns from the stopped trials' last values); (2) a real tiny sweep on the
demo's model (``demo_sweep``'s preparation, cached) with ``ga`` beside ``npo+kl``: GA alone
drives the model's retention down within its first evaluations.

(b) is a cheap proxy of the removal/retention trade-off (a ZDT1-like front, see
``rayunlearn.sweep.synthetic``) asked through the same define-by-run space and samplers the
sweep uses, without Ray (sampler quality does not depend on the executor); 24 real tiny trials
per sampler and seed would take 10+ minutes on two cores.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

from rayunlearn import runs
from rayunlearn.bench.common import print_table

FAMILY = {"wga+kl": {"wga.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
                     "kl.weight": {"type": "loguniform", "low": 0.1, "high": 10}}}
BENCH_ROOT = "results/bench_sweep"
_PHASE_KEYS = [runs.TIME_PREFIX + p for p in (*runs.TIME_PHASES, runs.TIME_OTHER)]


def _tiny_space(root: Path, name: str, n: int, epochs: int, threads: int = 1, reuse_actors: bool = True):
    from rayunlearn.sweep.space import load_space

    return load_space("tiny", [f"results={root}", f"name={name}", f"num_samples={n}", "max_concurrent=2",
                               "ray.num_cpus=2", "resources.cpus=1", f"resources.torch_threads={threads}",
                               f"unlearn.train.epochs={epochs}", f"ray.reuse_actors={str(reuse_actors).lower()}"])


def _trial_times(sweep_dir: Path) -> dict[str, tuple[str, float, str]]:
    """trial id -> (method, time inside the trial in s, status) from the trials' result.json."""
    from rayunlearn.io import read_json

    out = {}
    for res in sorted((sweep_dir / runs.TRIALS_DIR).glob(f"*/{runs.RESULT_FILE}")):
        r = read_json(res)
        out[r["trial_id"]] = (r["method"], float(r.get("time_s", float("nan"))), r.get("status", ""))
    return out


def _run_in_process(space, prepared, sweep_dir: Path, methods: list[str],
                    threads: int) -> tuple[float, list[float], dict[str, float]]:
    """Run `methods` one after another in this process (the sweep's own per-trial config):
    (wall, each run's time, the runs' mean seconds per phase ``time.<phase>``)."""
    import torch

    from rayunlearn.config import to_dict
    from rayunlearn.sweep.prepare import copy_references
    from rayunlearn.sweep.trial import TrialContext, trial_config
    from rayunlearn.train import unlearn_trial

    shutil.rmtree(sweep_dir, ignore_errors=True)
    copy_references(prepared, sweep_dir)
    ctx = TrialContext(space=to_dict(space), sweep_dir=str(sweep_dir), target=prepared.target,
                       data=to_dict(prepared.data), retain_reference=str(runs.reference_eval(sweep_dir, "retain")),
                       aggregator=None)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    times, phases = [], []
    try:
        t_all = time.perf_counter()
        for i, method in enumerate(methods):
            t0 = time.perf_counter()
            metrics = unlearn_trial(trial_config(space, ctx, f"seq{i:02d}", method))
            times.append(time.perf_counter() - t0)
            phases.append(metrics["time"])
        breakdown = {runs.TIME_PREFIX + p: statistics.mean(t[p] for t in phases) for p in runs.TIME_PHASES}
        return time.perf_counter() - t_all, times, breakdown
    finally:
        torch.set_num_threads(old)


def bench_parallel(n: int, epochs: int, root: str | Path = BENCH_ROOT) -> dict:
    """Wall time of n real tiny unlearning trials: Ray Tune with 2 concurrent trials (1 torch
    thread each) vs the same methods in-process, one after another, with 1 and 2 threads. The
    Tune sweep runs twice, back to back under one ``ray.init`` (:func:`overhead_before_after`):
    every trial in a fresh worker process (``ray.reuse_actors=false``, before) and trials reusing
    a finished trial's process (the default, after); the in-process runs repeat the methods of
    the second."""
    import ray
    from rich.console import Console

    from rayunlearn.sweep.prepare import prepare

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = Path(root).resolve()
    quiet = Console(quiet=True)
    t0 = time.perf_counter()
    prepared = prepare(_tiny_space(root, "bench_tune", n, epochs), console=quiet)   # cached; not timed below
    t_prepare = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    try:
        fresh = tune_run(_tiny_space(root, "bench_tune_fresh", n, epochs, reuse_actors=False), quiet)
        tune = tune_run(_tiny_space(root, "bench_tune", n, epochs), quiet)
    finally:
        ray.shutdown()
    methods = [m for m, _, _ in tune["trials"].values()]
    if len(methods) != n:
        raise RuntimeError(f"the Tune run finished {len(methods)} of {n} trials; see {tune['dir']}")
    seq1, seq1_times, seq1_breakdown = _run_in_process(_tiny_space(root, "bench_seq1", n, epochs, 1), prepared,
                                                       root / "bench_seq1", methods, threads=1)
    # 2 threads per trial: only the first method (on a loaded 2-core machine a 2-thread trial can
    # be >10x slower than a 1-thread one: OpenMP threads wait for a core); projected to n trials
    _, seq2_times, _ = _run_in_process(_tiny_space(root, "bench_seq2", n, epochs, 2), prepared,
                                       root / "bench_seq2", methods[:1], threads=2)
    seq2 = statistics.mean(seq2_times) * n
    return {"n": n, "epochs": epochs, "prepare_s": t_prepare, "ray_init_s": t_init, "tune_s": tune["wall_s"],
            "seq1_s": seq1, "seq2_s": seq2, "tune_trial_mean_s": tune["trial_mean_s"],
            "seq1_trial_mean_s": statistics.mean(seq1_times), "seq2_trial_mean_s": statistics.mean(seq2_times),
            "tune_overhead_s": tune["wall_s"] - tune["trial_mean_s"] * n / 2,
            "statuses": [s for _, _, s in tune["trials"].values()], "breakdown": tune["breakdown"],
            "efficiency": tune["efficiency"], "seq1_breakdown": seq1_breakdown,
            "overhead": overhead_before_after(fresh, tune),
            "load": os.getloadavg()}


def tune_run(space, console) -> dict:
    """One Tune sweep of ``space`` (Ray started, its preparation cached): the wall time, each
    trial's (method, time, status), the mean breakdown (all trials, and by
    :func:`breakdown_by_process`), the efficiency, the load average after, and the CPU seconds
    the driver and Ray's own processes used meanwhile."""
    from rayunlearn.sweep.driver import run_sweep

    sweep_dir = space.sweep_dir().resolve()
    shutil.rmtree(sweep_dir, ignore_errors=True)
    cpu0 = _driver_and_ray_cpu()
    t0 = time.perf_counter()
    run_sweep(space, console=console)
    wall = time.perf_counter() - t0
    cpu1 = _driver_and_ray_cpu()
    trials = _trial_times(sweep_dir)
    inside = [t for _, t, _ in trials.values()]
    return {"dir": sweep_dir, "wall_s": wall, "trials": trials, "trial_mean_s": statistics.mean(inside),
            "breakdown": time_breakdown(sweep_dir), "efficiency": sweep_efficiency(inside, space.max_concurrent, wall),
            "process_breakdown": breakdown_by_process(sweep_dir), "load": os.getloadavg()[0],
            "driver_ray_cpu_s": sum(cpu1[pid] - cpu0[pid] for pid in cpu0.keys() & cpu1.keys())}


def _driver_and_ray_cpu() -> dict[int, float]:
    """CPU seconds so far, by process id, of this process (the sweep's driver) and of Ray's own
    processes under it (GCS, raylet, monitors, the ``ray::...Agent`` processes), not of the
    worker processes (``ray::IDLE``, ``ray::<actor>``) that run the trials and the aggregator: what
    the sweep's machinery takes from the cores the trials share."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            name = proc.name()
            if name.startswith("ray::") and not name.endswith("Agent"):
                continue
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.Error:      # ended meanwhile
            continue
    return out


def time_breakdown(sweep_dir: Path) -> dict[str, float]:
    """The mean seconds per trial of each phase (``rayunlearn.runs.TIME_PHASES`` + other) and of
    ``time_s`` over the sweep's trials that measured them."""
    measured = _measured_rows(sweep_dir)
    if not measured:
        return {}
    return {k: statistics.mean(r[k] for r in measured) for k in [*_PHASE_KEYS, "time_s"]}


def _measured_rows(sweep_dir: Path) -> list[dict]:
    """The trials table's rows that measured every phase of ``time.<phase>``."""
    import math

    import pyarrow.parquet as pq

    rows = pq.read_table(sweep_dir / runs.TRIALS_TABLE_FILE).to_pylist()
    return [r for r in rows if all(isinstance(r.get(k), float) and math.isfinite(r[k]) for k in _PHASE_KEYS)]


def breakdown_by_process(sweep_dir: Path) -> dict[str, dict[str, float]]:
    """The mean breakdown (as :func:`time_breakdown`) of the trials that were the first in their
    worker process (``first``: they paid the imports) and of those that ran in a process a
    finished trial left (``reused``), told apart by the process id and start time of each
    trial's last attempt (``attempts.jsonl``); a kind no trial had is left out."""
    from rayunlearn.io import read_jsonl

    starts = {}
    for row in _measured_rows(sweep_dir):
        last = read_jsonl(runs.trial_dir(sweep_dir, row["trial_id"]) / runs.ATTEMPTS_FILE)[-1]
        starts[row["trial_id"]] = (last["pid"], last["time"], row)
    first_start = {}
    for pid, t, _ in starts.values():
        first_start[pid] = min(t, first_start.get(pid, t))
    kinds: dict[str, list[dict]] = {}
    for pid, t, row in starts.values():
        kinds.setdefault("first" if t == first_start[pid] else "reused", []).append(row)
    return {kind: {k: statistics.mean(r[k] for r in rows) for k in [*_PHASE_KEYS, "time_s"]}
            for kind, rows in sorted(kinds.items())}


def metric_differences(dir_a: Path, dir_b: Path) -> dict:
    """Compare two sweeps' trials tables trial by trial (matched by method string) in every
    column but the trial id, the times and the attempt count: ``{"trials": matched trials,
    "columns": columns compared, "unmatched": methods in one table only, "differences":
    ["<method> <column>: a vs b", ...]}`` (NaN equals NaN)."""
    import math

    import pyarrow.parquet as pq

    def rows(d):
        return {r["method"]: r for r in pq.read_table(Path(d) / runs.TRIALS_TABLE_FILE).to_pylist()}

    def same(x, y):
        return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))

    a, b = rows(dir_a), rows(dir_b)
    skip = {"trial_id", "time_s", "attempts"}
    columns = sorted(k for k in set().union(*a.values(), *b.values())
                     if k not in skip and not k.startswith(runs.TIME_PREFIX))
    matched = sorted(set(a) & set(b))
    diffs = [f"{m} {c}: {a[m].get(c)!r} vs {b[m].get(c)!r}" for m in matched for c in columns
             if not same(a[m].get(c), b[m].get(c))]
    return {"trials": len(matched), "columns": len(columns), "unmatched": sorted(set(a) ^ set(b)),
            "differences": diffs}


def overhead_before_after(before: dict, after: dict) -> dict:
    """The two Tune runs of :func:`bench_parallel` (:func:`tune_run`: fresh processes, reused
    ones) side by side, with their trials compared column by column (:func:`metric_differences`)."""
    return {"before": before, "after": after, "wall_ratio": after["wall_s"] / before["wall_s"],
            "trial_ratio": after["trial_mean_s"] / before["trial_mean_s"],
            "results": metric_differences(before["dir"], after["dir"])}


def print_overhead(o: dict) -> None:
    """The before/after table of the per-trial start-up overhead (:func:`overhead_before_after`)."""
    before, after, res = o["before"], o["after"], o["results"]
    b, a = before["breakdown"], after["breakdown"]
    rows = [["wall of the sweep (s)", f"{before['wall_s']:.1f}", f"{after['wall_s']:.1f}", f"{o['wall_ratio']:.2f}"],
            ["sweep efficiency", f"{before['efficiency']:.2f}", f"{after['efficiency']:.2f}",
             f"{after['efficiency'] / before['efficiency']:.2f}"],
            ["load average after the run", f"{before['load']:.1f}", f"{after['load']:.1f}", ""],
            ["CPU of the driver and Ray's own processes (s)", f"{before['driver_ray_cpu_s']:.1f}",
             f"{after['driver_ray_cpu_s']:.1f}", f"{after['driver_ray_cpu_s'] / before['driver_ray_cpu_s']:.2f}"]]
    rows += [[f"{k} (s per trial)", f"{b[k]:.2f}", f"{a[k]:.2f}", f"{a[k] / b[k]:.2f}" if b[k] else ""]
             for k in [*_PHASE_KEYS, "time_s"] if k in a and k in b]
    print_table("sweep (a): per-trial start-up overhead, before (ray.reuse_actors=false: every trial in a fresh "
                "worker process) / after (true, the default), back to back in one run",
                ["", "before", "after", "after / before"], rows)
    first, reused = after["process_breakdown"].get("first"), after["process_breakdown"].get("reused")
    if first and reused:
        print_table("after: a trial that was the first in its process (paid the imports) vs one in a reused "
                    "process", ["phase", "first in its process (s)", "reused process (s)"],
                    [[k, f"{first[k]:.2f}", f"{reused[k]:.2f}"] for k in [*_PHASE_KEYS, "time_s"]])
    verdict = "identical" if not res["differences"] and not res["unmatched"] else "DIFFERENT"
    print(f"results before vs after: {verdict} ({res['trials']} trials matched by method, {res['columns']} "
          f"columns compared: every column but trial_id, time_s, attempts, time.*)")
    for line in [*res["differences"][:10], *(f"only in one run: {m}" for m in res["unmatched"])]:
        print(f"  {line}")


def sweep_efficiency(trial_times: list[float], concurrency: int, wall_s: float) -> float:
    """The trials' own time divided by the concurrency, over the sweep's wall time."""
    return sum(trial_times) / concurrency / wall_s


def bench_quality(trials: int = 24, seeds=(0, 1, 2)) -> dict:
    """Hypervolume (reference (0, 0)) after `trials` trials per sampler and seed."""
    import warnings

    import optuna

    from rayunlearn.pareto import hypervolume_2d
    from rayunlearn.sweep.space import decode, define_by_run, load_space
    from rayunlearn.sweep.synthetic import synthetic_objectives
    from rayunlearn.sweep.tuner import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, list[float]] = {}
    for sampler in ("tpe", "nsga2", "random"):
        for seed in seeds:
            space = load_space(data={"name": "q", "families": FAMILY, "seed": seed, "sampler": sampler})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study = optuna.create_study(directions=["maximize", "maximize"],
                                            sampler=make_sampler(sampler, seed))
            fn = define_by_run(space)
            dists = space.distributions["wga+kl"]
            points = []
            for _ in range(trials):
                trial = study.ask()
                consts = fn(trial)
                _, hp = decode(space, {**trial.params, **consts})
                unit = {k: dists[k].unit(v) for k, v in hp.items()}
                values = synthetic_objectives(unit, ["kl.weight"])
                points.append(values)
                study.tell(trial, list(values))
            out.setdefault(sampler, []).append(hypervolume_2d(points, ref=(0.0, 0.0)))
    return out


def main(quick: bool = False) -> None:
    """Run both measurements and print them side by side."""
    n, epochs = (4, 20) if quick else (8, 40)    # a few / several seconds of work per trial here
    load0 = os.getloadavg()[0]
    r = bench_parallel(n, epochs)
    fresh = r["overhead"]["before"]
    print_table(f"sweep (a): {n} real tiny unlearning trials (the shipped space tiny, wga+kl, "
                f"unlearn.train.epochs={epochs}), 2 CPUs; load avg {load0:.2f} before, {r['load'][0]:.2f} after",
                ["run", "wall (s)", "mean time in a trial (s)", "ratio Tune / this"],
                [["Ray Tune, 2 concurrent, 1 thread each", f"{r['tune_s']:.1f}", f"{r['tune_trial_mean_s']:.2f}", ""],
                 ["  + ray.init", f"{r['tune_s'] + r['ray_init_s']:.1f}", "", ""],
                 ["  before: a fresh process per trial", f"{fresh['wall_s']:.1f}", f"{fresh['trial_mean_s']:.2f}",
                  f"{fresh['wall_s'] / r['seq1_s']:.2f} vs in-process, 1 thread"],
                 ["in-process, one after another, 1 thread", f"{r['seq1_s']:.1f}", f"{r['seq1_trial_mean_s']:.2f}",
                  f"{r['tune_s'] / r['seq1_s']:.2f} (incl. init {(r['tune_s'] + r['ray_init_s']) / r['seq1_s']:.2f}); "
                  f"target <= 0.75"],
                 ["in-process, 2 threads (1 trial x N, projected)", f"{r['seq2_s']:.1f}", f"{r['seq2_trial_mean_s']:.2f}",
                  f"{r['tune_s'] / r['seq2_s']:.2f} (incl. init {(r['tune_s'] + r['ray_init_s']) / r['seq2_s']:.2f})"]])
    print(f"ray.init {r['ray_init_s']:.1f} s; Tune overhead (wall - trial time / 2) {r['tune_overhead_s']:.1f} s "
          f"= {r['tune_overhead_s'] / n:.2f} s per trial; preparation (cached after the first run, not in "
          f"the ratios) {r['prepare_s']:.1f} s; Tune trial statuses: {', '.join(sorted(set(r['statuses'])))}")
    b = r["breakdown"]
    if b:
        seq = r["seq1_breakdown"]
        print_table(f"sweep (a): where a Tune trial's time goes (mean of {n}; sweep efficiency = trials' time / 2 "
                    f"over wall = {r['efficiency']:.2f}); the same methods in-process, 1 thread: the same work "
                    f"alone (a Tune / in-process ratio above 1 in steps is contention between the concurrent "
                    f"trials)", ["phase", "s per trial", "share of time_s", "in-process (s)", "Tune / in-process"],
                    [[k, f"{v:.2f}", f"{v / b['time_s']:.0%}", f"{seq[k]:.2f}" if k in seq else "",
                      f"{v / seq[k]:.2f}" if seq.get(k) else ""] for k, v in b.items()])
    print_overhead(r["overhead"])
    q = bench_quality(24, (0, 1, 2))
    rows = []
    for sampler, hvs in q.items():
        rows.append([sampler, f"{statistics.mean(hvs):.4f}", f"{min(hvs):.4f} .. {max(hvs):.4f}",
                     " ".join(f"{h:.4f}" for h in hvs)])
    print_table("sweep (b): Pareto hypervolume after 24 trials (synthetic trade-off; ref (0,0); "
                "optimum ~0.333)", ["sampler", "mean", "min .. max", "per seed"], rows)
    print_stopping(quick)


# ---------------------------------------------------------------------------------------------
# (c) early stopping: hypervolume against compute

SYNTH_FAMILIES = {**FAMILY, "ga": {"ga.weight": {"type": "uniform", "low": 0.5, "high": 2.0}}}
REAL_FAMILIES = {"npo+kl": {"npo.beta": {"type": "loguniform", "low": 0.05, "high": 1.0},
                            "kl.weight": {"type": "loguniform", "low": 0.3, "high": 3.0}},
                 "ga": {"ga.weight": {"type": "loguniform", "low": 0.5, "high": 2.0}}}
STOPPING = {"collapse": True, "dominated": True, "min_step": 1, "min_completed": 2}
NO_STOPPING = {"collapse": False, "dominated": False}


def hypervolume_curve(trials: list[tuple[float, str, float, float]],
                      ref: tuple[float, float] = (0.0, 0.0)) -> list[tuple[float, float]]:
    """(compute spent, hypervolume) after each of ``trials`` = [(time_s, status, removal,
    retention)] in the order they finished: compute is the running sum of every trial's time,
    the hypervolume (reference point ``ref``) that of the completed trials so far, as
    ``pareto.json`` counts it."""
    from rayunlearn.pareto import hypervolume_2d

    curve, spent, done = [], 0.0, []
    for time_s, status, removal, retention in trials:
        spent += time_s
        if status == runs.COMPLETED:
            done.append((removal, retention))
        curve.append((spent, hypervolume_2d(done, ref=ref)))
    return curve


def _finished_in_order(sweep_dir: Path) -> list[tuple[float, str, float, float]]:
    """(time_s, status, removal, retention) of the sweep's trials, by the time they ended (their
    last start in attempts.jsonl + time_s)."""
    import pyarrow.parquet as pq

    from rayunlearn.io import read_jsonl

    rows = pq.read_table(sweep_dir / runs.TRIALS_TABLE_FILE).to_pylist()
    ended = {r["trial_id"]: read_jsonl(runs.trial_dir(sweep_dir, r["trial_id"]) / runs.ATTEMPTS_FILE)[-1]["time"]
             + r["time_s"] for r in rows}
    rows.sort(key=lambda r: ended[r["trial_id"]])
    return [(r["time_s"], r["status"], r["removal"], r["retention"]) for r in rows]


def _stopping_pair(make_space, root: Path, before=None) -> dict:
    """Run the sweep ``make_space(name, early_stopping)`` with early stopping off, then on;
    ``before(sweep_dir)``: writes what the sweep needs first. Per setting: the final
    hypervolume, compute, counts by status, wall time and the curve. The hypervolume's reference
    point is (0, the retention floor): what the front holds above the floor, the points the
    sweep asks for (a trial under it counts for nothing, stopped or not)."""
    import ray
    from rich.console import Console

    from rayunlearn.io import read_json
    from rayunlearn.sweep.driver import run_sweep

    out = {}
    for label, rules in (("off", NO_STOPPING), ("on", STOPPING)):
        space = make_space(f"stop_{label}", rules)
        sweep_dir = space.sweep_dir().resolve()
        shutil.rmtree(sweep_dir, ignore_errors=True)
        if before is not None:
            before(sweep_dir)
        t0 = time.perf_counter()
        try:
            _, summary = run_sweep(space, console=Console(quiet=True))
        finally:
            ray.shutdown()
        floor = space.retention_floor * read_json(runs.reference_eval(sweep_dir, "target"))["retention"]
        curve = hypervolume_curve(_finished_in_order(sweep_dir), ref=(0.0, floor))
        out[label] = {"hypervolume": curve[-1][1], "compute_s": curve[-1][0], "counts": summary["counts"],
                      "wall_s": time.perf_counter() - t0, "curve": curve, "floor": floor}
    return out


def compute_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The compute at which ``curve`` first reaches hypervolume ``target`` (None: never)."""
    return next((c for c, hv in curve if hv >= target - 1e-12), None)


def _synthetic_target(sweep_dir: Path) -> None:
    """The synthetic benchmark's stand-in for a target model's evaluation: utility numbers of 1,
    so the retention floor is a fraction of the best synthetic retention (1)."""
    from rayunlearn.io import write_json

    write_json(runs.reference_eval(sweep_dir, "target"),
               {"retention": 1.0, **{s: {"prob": 1.0, "truth_ratio": 1.0} for s in ("retain", "real_authors",
                                                                                     "world_facts")}})


def bench_stopping_synthetic(n: int, sampler: str, seed: int, root: str | Path = BENCH_ROOT) -> dict:
    """Early stopping off vs on, on the synthetic trade-off: ``n`` trials of 20 steps (50 ms each,
    an evaluation every 2), ``ga`` collapsing, retention floor 0.1."""
    from rayunlearn.sweep.space import load_space

    root = Path(root).resolve()

    def make_space(name, rules):
        return load_space(data={
            "name": f"synth_{sampler}{seed}_{name}", "results": str(root), "families": SYNTH_FAMILIES,
            "sampler": sampler, "seed": seed, "num_samples": n, "max_concurrent": 2, "ray": {"num_cpus": 2},
            "prepare": {"enabled": False}, "retention_floor": 0.1, "early_stopping": rules,
            "unlearn": {"eval": {"every": 2}}, "trainable": "rayunlearn.sweep.synthetic:synthetic_trial",
            "trainable_options": {"steps": 20, "step_s": 0.05, "collapse": ["ga"]}})

    return _stopping_pair(make_space, root, before=_synthetic_target)


def bench_stopping_real(n: int, root: str | Path = BENCH_ROOT) -> dict:
    """Early stopping off vs on, on real trials of the demo's model and preparation (random
    search: both runs train the same points), ``ga`` beside ``npo+kl``, retention floor 0.5."""
    from rayunlearn.sweep.space import load_space, read_space

    root = Path(root).resolve()

    def make_space(name, rules):
        raw = {**read_space("demo_sweep"), "families": REAL_FAMILIES, "early_stopping": rules}
        return load_space(data=raw, overrides=[f"results={root}", f"name=real_{name}", f"num_samples={n}",
                                               "sampler=random", "ray.num_cpus=2", "unlearn.effects.every=0",
                                               "retention_floor=0.5"])

    return _stopping_pair(make_space, root)


def stopping_row(name: str, r: dict) -> list[str]:
    """One line of table (c): a sweep's hypervolume and compute with early stopping off and on."""
    off, on = r["off"], r["on"]
    reach = compute_to_reach(on["curve"], off["hypervolume"])
    return [f"{name} (HV ref retention {off['floor']:.3f})", f"{off['hypervolume']:.4f}", f"{on['hypervolume']:.4f}",
            f"{off['compute_s']:.1f}", f"{on['compute_s']:.1f}", f"{on['compute_s'] / off['compute_s']:.2f}",
            "never" if reach is None else f"{reach:.1f}", ", ".join(f"{k} {v}" for k, v in sorted(on["counts"].items())),
            f"{off['wall_s']:.0f} / {on['wall_s']:.0f}"]


def print_stopping_table(rows: list[list[str]]) -> None:
    print_table("sweep (c): early stopping (collapse under the retention floor, dominated at the same step), "
                "hypervolume of the completed trials above the floor against compute = sum of the trials' time_s",
                ["sweep", "HV off", "HV on", "compute off (s)", "compute on (s)", "on / off",
                 "compute on to reach HV off (s)", "trials with stopping", "wall off / on (s)"], rows)


def print_stopping(quick: bool = False) -> None:
    """(c): both benchmarks, hypervolume and compute with early stopping off and on."""
    n_synth, n_real = (8, 4) if quick else (16, 6)
    rows = []
    for sampler in ("random", "tpe"):
        for seed in ((0,) if quick else (0, 1)):
            rows.append(stopping_row(f"synthetic, {sampler}, seed {seed}, {n_synth} trials, floor 0.1",
                                     bench_stopping_synthetic(n_synth, sampler, seed)))
    rows.append(stopping_row(f"real demo model, random, {n_real} trials, floor 0.5", bench_stopping_real(n_real)))
    print_stopping_table(rows)
