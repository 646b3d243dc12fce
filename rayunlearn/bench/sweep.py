"""`rayunlearn bench sweep`: (a) N trials through Ray Tune with 2 concurrent trials vs the same N
runs one after another in-process; (b) search quality: Pareto hypervolume after 24 trials,
Optuna's multi-objective sampler (the sweep's TPE, and NSGA-II) vs random search, over 3 seeds.

Both use the synthetic per-trial function (``rayunlearn.sweep.synthetic``): (a) gives each
trial a fixed amount of single-threaded CPU work (``work`` matmul blocks; torch threads = 1 per
trial) so the comparison measures Ray Tune's overhead and parallelism, not our training loop;
(b) is a cheap proxy of the removal/retention trade-off (a ZDT1-like front, see that module)
asked through the same define-by-run space and samplers the sweep uses, without Ray (sampler
quality does not depend on the executor). Real tiny unlearning trials would take minutes per
seed on two cores.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from rayunlearn.bench.common import print_table

FAMILY = {"wga+kl": {"wga.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
                     "kl.weight": {"type": "loguniform", "low": 0.1, "high": 10}}}


def _space(root: Path, name: str, n: int, work: int, concurrent: int, seed: int = 0, sampler: str = "tpe"):
    from rayunlearn.sweep.space import load_space

    return load_space(data={"name": name, "results": str(root), "families": FAMILY, "num_samples": n,
                            "max_concurrent": concurrent, "seed": seed, "sampler": sampler,
                            "prepare": {"enabled": False}, "ray": {"num_cpus": 2},
                            "resources": {"cpus": 1, "torch_threads": 1},
                            "trainable": "rayunlearn.sweep.synthetic:synthetic_trial",
                            "trainable_options": {"work": work}})


def bench_parallel(n: int, work: int) -> dict:
    """Wall time of n trials: Ray Tune with 2 concurrent trials vs in-process, sequential."""
    import ray
    import torch
    from rich.console import Console

    from rayunlearn.config import UnlearnConfig
    from rayunlearn.io import write_json
    from rayunlearn.sweep.synthetic import _burn
    from rayunlearn.tune import run_sweep

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # sequential, in-process: the same per-trial work
        t0 = time.perf_counter()
        for i in range(n):
            _burn(work)
        seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            run_sweep(_space(root, "par", n, work, 2), console=Console(quiet=True))
            par = time.perf_counter() - t0
        finally:
            ray.shutdown()
    return {"sequential_s": seq, "tune_s": par, "ray_init_s": t_init, "ratio": par / seq,
            "ratio_with_init": (par + t_init) / seq}


def bench_quality(trials: int = 24, seeds=(0, 1, 2)) -> dict:
    """Hypervolume (reference (0, 0)) after `trials` trials per sampler and seed."""
    import warnings

    import optuna

    from rayunlearn.pareto import hypervolume_2d
    from rayunlearn.sweep.space import decode, define_by_run, load_space
    from rayunlearn.sweep.synthetic import synthetic_objectives
    from rayunlearn.tune import make_sampler

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
    n, work = (4, 10000) if quick else (8, 25000)   # ~2 s / ~5 s of work per trial here
    r = bench_parallel(n, work)
    print_table(f"sweep (a): {n} synthetic trials of {work} single-threaded matmul blocks, 2 CPUs",
                ["sequential in-process (s)", "Ray Tune, 2 concurrent (s)", "ratio (target <= 0.75)",
                 "ray.init (s)", "ratio incl. ray.init"],
                [[f"{r['sequential_s']:.2f}", f"{r['tune_s']:.2f}", f"{r['ratio']:.2f}",
                  f"{r['ray_init_s']:.2f}", f"{r['ratio_with_init']:.2f}"]])
    q = bench_quality(24, (0, 1, 2))
    rows = []
    for sampler, hvs in q.items():
        rows.append([sampler, f"{statistics.mean(hvs):.4f}", f"{min(hvs):.4f} .. {max(hvs):.4f}",
                     " ".join(f"{h:.4f}" for h in hvs)])
    print_table("sweep (b): Pareto hypervolume after 24 trials (synthetic trade-off; ref (0,0); "
                "optimum ~0.333)", ["sampler", "mean", "min .. max", "per seed"], rows)
