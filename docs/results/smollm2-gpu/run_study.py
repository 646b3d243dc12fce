"""The study of ``rayunlearn demo`` (the shipped grid space ``demo_study``) on one GPU, without Ray:
the exact driver that produced docs/results/smollm2-gpu/ (notes.md says how it was called).

The device machine it ran on had no Ray, Optuna or MLflow, so instead of ``rayunlearn sweep`` this
script drives the package's own pieces in-process:

1. the space: ``load_space("demo_study", ...)`` with :data:`SMOLLM2_GPU` (``--model smollm2-135m``)
   and the command line's ``key=value`` overrides; ``sweep.yaml`` written as the sweep writes it;
2. the preparation: ``rayunlearn.sweep.prepare.prepare`` (target and retain finetuned on the GPU,
   the reference evaluations and attacks), then ``copy_references``;
3. the trials: every family of the space once (the grid), in the fixed order :data:`ORDER`
   (the runs the claim checks read first), ``--workers`` at a time, each in its own spawned
   process on the same GPU (a 135 M model leaves the GPU idle between kernel launches, so a few
   processes share it well); each trial is ``rayunlearn.sweep.trial.run_trial`` (the body of the
   sweep's Tune trainable) with ``train.num_workers=1`` (the in-process loop) and no aggregator
   actor (G-effect rows go to ``<sweep>/effects/<trial id>/``);
4. the tables: ``rayunlearn.sweep.tables.write_tables`` after every finished trial, so a run cut
   off by its time limit leaves complete tables of the trials that finished.

``--start-by S``: no trial starts later than S seconds after the script started (a trial not
started is absent from the tables). A finished trial's checkpoints and weights are deleted (the
study keeps its tables; the disk holds 16 runs' optimiser states otherwise). Timings go to
``<out>/gpu_timings.json``.

    python docs/results/smollm2-gpu/run_study.py --out results/demo-smollm2-gpu --workers 4 --start-by 330
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

# the methods of demo_study.yaml, the runs the claim checks read first (claims 1-6: GA, the
# weighted objectives alone, the three regularisers, NPO), then the paper's +KL methods
ORDER = ("ga", "wga", "tnpo", "ga+gd", "ga+kl", "ga+rr", "npo", "wtnpo", "wga(alpha=0.5)", "tnpo(beta=1)",
         "npo+kl", "wga+kl", "tnpo+kl", "wtnpo+kl", "po+kl", "rmu+kl")

# SmolLM2-135M-Instruct on a GPU: the benchmark of demo_study.yaml as shipped (60 authors,
# forget10 = 6 authors, 69 QA), no base stage (the pretrained model is the base), the plain
# template (rayunlearn/demo.py's SMOLLM2 says why); the target and retain models finetuned 3 epochs
# at 3e-4 as in the CPU study, with batches of 16; unlearning as the space says (5 epochs of
# batch 8: 43 steps, G-effects every 2 steps, in-loop evaluations every 15, the attacks) at the
# CPU study's learning rate for a pretrained 135 M model, with probes of 16 forget rows (every
# forget author) and 32 non-targeted rows.
_FT = "{epochs: 3, batch_size: 16, micro_batch_size: 16, lr: 3.0e-4, warmup_epochs: 0.5, max_grad_norm: 1.0, use_gpu: true}"
SMOLLM2_GPU = [
    "model.name=smollm2-135m", "data.template=plain",
    "prepare.train_base=false", f"prepare.target={_FT}", f"prepare.retain={_FT}",
    "unlearn.train.lr=3.0e-5", "unlearn.train.checkpoint_every=0",
    "unlearn.effects.probe_size=16", "unlearn.effects.retain_probe_size=32",
    "resources.gpus=0.25", "resources.torch_threads=2",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the results directory (the collection is <out>/<name>)")
    ap.add_argument("--model", choices=("smollm2-135m", "tiny"), default="smollm2-135m",
                    help="smollm2-135m: with SMOLLM2_GPU; tiny: demo_study.yaml as shipped (a dry run)")
    ap.add_argument("--workers", type=int, default=4, help="trials at a time, one process each")
    ap.add_argument("--start-by", type=float, default=float("inf"),
                    help="seconds after the start after which no trial starts")
    ap.add_argument("--families", default="", help="comma-separated subset of the study's methods")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the space")
    args = ap.parse_args(argv)
    t_start = time.time()

    from rayunlearn import runs
    from rayunlearn.config import to_dict
    from rayunlearn.io import write_json, write_text
    from rayunlearn.sweep.prepare import copy_references, prepare
    from rayunlearn.sweep.space import dumps_space, load_space
    from rayunlearn.sweep.tables import write_tables
    from rayunlearn.sweep.trial import TrialContext, retention_threshold

    out = Path(args.out).resolve()
    extra = SMOLLM2_GPU if args.model == "smollm2-135m" else []
    space = load_space("demo_study", [f"results={out}", *extra, *args.overrides])
    families = [f for f in ORDER if f in space.families]
    missing = [f for f in space.families if f not in ORDER]
    if missing:
        raise SystemExit(f"families {missing} are not in ORDER: add them")
    if args.families:
        asked = [f.strip() for f in args.families.split(",")]
        families = [f for f in families if f in asked]
    sweep_dir = space.sweep_dir().resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text(sweep_dir / runs.SWEEP_SPACE_FILE, dumps_space(space))
    timings: dict = {"trials": {}}
    timings_file = out / "gpu_timings.json"

    t0 = time.time()
    prepared = prepare(space)
    copy_references(prepared, sweep_dir)
    timings["prepare_s"] = time.time() - t0
    write_json(timings_file, timings)
    say(t_start, f"prepared in {timings['prepare_s']:.0f} s ({prepared.root})")

    ctx = TrialContext(space=to_dict(space), sweep_dir=str(sweep_dir), target=prepared.target,
                       data=to_dict(prepared.data),
                       retain_reference=(str(runs.reference_eval(sweep_dir, "retain"))
                                         if prepared.retain_reference else None),
                       aggregator=None, retention_threshold=retention_threshold(space, sweep_dir))
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        jobs = {pool.submit(one_trial, ctx, f"gpu_{i:05d}", fam, t_start + args.start_by): fam
                for i, fam in enumerate(families)}
        for job in as_completed(jobs):
            fam = jobs[job]
            try:
                info = job.result()
            except Exception as exc:  # noqa: BLE001 - a worker process lost: record it, go on
                info = {"status": "lost", "error": f"{type(exc).__name__}: {exc}"}
            timings["trials"][fam] = info
            summary = write_tables(space, sweep_dir)
            write_json(timings_file, timings)
            say(t_start, f"{fam}: {info} -> tables {summary['counts']}")
    timings["trials_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start
    write_json(timings_file, timings)
    say(t_start, f"done: prepare {timings['prepare_s']:.0f} s, trials {timings['trials_s']:.0f} s")
    return 0


def one_trial(ctx, trial_id: str, family: str, start_by: float) -> dict:
    """One study run in this (spawned) process: ``run_trial`` with a report that keeps nothing;
    returns its wall time and status, or ``not started`` past ``start_by``."""
    if time.time() > start_by:
        return {"status": "not started"}
    from rayunlearn import runs
    from rayunlearn.config import from_dict
    from rayunlearn.io import read_json
    from rayunlearn.sweep.space import SearchSpace, decode
    from rayunlearn.sweep.trial import run_trial

    t0 = time.time()
    space = from_dict(SearchSpace, ctx.space)
    family_name, hp = decode(space, {"family": family})
    run_trial(space, ctx, trial_id, family_name, hp, report_to=lambda result: None)
    tdir = runs.trial_dir(ctx.sweep_dir, trial_id)
    shutil.rmtree(tdir / runs.CHECKPOINTS_DIR, ignore_errors=True)
    for weights in tdir.glob("*.safetensors"):
        weights.unlink()
    result = read_json(tdir / runs.RESULT_FILE)
    info = {"status": result["status"], "error": result.get("error", ""), "wall_s": round(time.time() - t0, 1),
            **{k: round(v, 1) for k, v in result["metrics"].items() if k.startswith(runs.TIME_PREFIX)}}
    import torch

    if torch.cuda.is_available():
        info["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return info


def say(t_start: float, text: str) -> None:
    print(f"[run_study +{time.time() - t_start:6.1f} s] {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
