"""``rayunlearn sweep``: search space -> trials -> ``<results>/<sweep>/``.

    rayunlearn sweep wga_kl [key=value ...] [--resume | --extend N]   (a shipped space, or a YAML file)

Follow one trial:

1. :func:`sweep_command` loads and validates the space (``rayunlearn.sweep.space``; every method
   family is parsed once) and calls :func:`run_sweep`, which saves the resolved space as
   ``<sweep>/sweep.yaml`` (a later run into the same directory must use the same space).
2. Preparation (``rayunlearn.sweep.prepare``), once per data/model setting and cached under
   ``<results>/prepared/<hash>/``: the synthetic benchmark, the base, target and retain models and
   their reference evaluations, copied to ``<sweep>/reference/``.
3. The Ray side (``rayunlearn.sweep.tuner``): Ray is started or joined, the sweep's G-effect
   aggregator actor started, and a Tune experiment built: ``OptunaSearch`` with both objectives
   (``removal``, ``retention``), sampler TPE (multi-objective), NSGA-II or random, seeded, inside
   ``ConcurrencyLimiter(max_concurrent)``; ``num_samples`` trials (``sampler: grid``: each family
   once, no Optuna).
4. Each trial is ``rayunlearn.sweep.trial.sweep_trial``: it decodes the sampled point, writes
   ``trials/<id>/trial.json``, runs the per-trial function (``rayunlearn.train.unlearn_trial``)
   and writes ``trials/<id>/result.json``.
5. The tables (``rayunlearn.sweep.tables``): ``trials.parquet`` from every ``result.json`` and
   ``pareto.json`` (the non-dominated completed trials), then a summary on the console.

Faults. Before preparing anything, a trial the cluster cannot schedule fails the sweep
(``tuner.check_schedulable``; on an autoscaling cluster it waits for nodes, with a timeout). A
trial whose worker dies is retried up to ``max_failures`` times; the retry reuses the trial
directory, so the unlearning run resumes from its last checkpoint. A diverging run, or one whose
own code raises, is not an error for Tune: the trial reports ``status=diverged`` / ``failed``
with NaN objectives, is not retried, and the sweep goes on. The tables are rewritten after every
finished trial. A local Ray started here ends with the driver (``rayunlearn.sweep.reaper``).

The study and the tracking. The Optuna study lives in an RDB storage (``<sweep>/study.db``, or
``storage:``), so ``--extend N`` adds N trials to a finished sweep with the sampler's full history
(``rayunlearn.sweep.study``); every trial is an MLflow run (``<sweep>/mlruns.db``, or
``tracking_uri:``; ``rayunlearn.sweep.tracking``).

Interrupt and resume. Ctrl-C, a killed driver, or ``touch <sweep>/STOP`` (a graceful stop after
the running trials report) leave Tune's experiment state in ``<sweep>/tune/``; ``--resume``
restores it (the Optuna searcher's state included) and runs only what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

from rayunlearn import UserError, runs
from rayunlearn.config import check_resume_config, to_dict
from rayunlearn.io import write_text
from rayunlearn.sweep.space import SearchSpace, dumps_space, load_space
from rayunlearn.sweep.study import (ExtendError, check_extendable, fail_stale_trials, last_extension, open_storage,
                                    record_extension, storage_url, study_exists, sync_study)
from rayunlearn.sweep.tables import collect_rows, grid_errors, print_summary, write_tables
from rayunlearn.sweep.tracking import MlflowTracker
from rayunlearn.sweep.trial import TrialContext, retention_threshold
from rayunlearn.sweep.tuner import (autoscale_wait_s, build_tuner, can_restore, check_schedulable, init_ray,
                                    make_trainable, restore_tuner, start_aggregator, stop_aggregator)


def sweep_command(space_path: str, overrides: list[str] | None = None, resume: bool = False,
                  extend: int = 0) -> int:
    """CLI: load the space (a file or a shipped name, + ``key=value`` overrides), run, resume or
    extend (by ``extend`` trials) the sweep. Exit status 1 when no trial completed, 130 when the
    sweep stopped early."""
    space = load_space(space_path, overrides)
    sweep_dir, summary = run_sweep(space, resume=resume, extend=extend)
    if summary["finished"] and not summary["counts"].get(runs.COMPLETED):
        print(no_trial_completed_message(sweep_dir, summary["rows"]))
        return 1
    if summary.get("interrupted"):
        print(f"the sweep stopped before its {space.total_trials} trials finished; continue it with "
              f"`rayunlearn sweep {space_path} {' '.join(overrides or [])} --resume`".replace("  ", " "))
        return 130
    return 0


def no_trial_completed_message(sweep_dir: Path, rows: list[dict]) -> str:
    """What failed, by error (most frequent first): a sweep whose every trial failed or diverged
    would fail the same way when resumed."""
    by_error: dict[str, int] = {}
    for r in rows:
        if r["status"] in (runs.FAILED, runs.DIVERGED):
            by_error[f"{r['status']}: {r['error']}"] = by_error.get(f"{r['status']}: {r['error']}", 0) + 1
    lines = [f"  {n} trial(s) {e}" for e, n in sorted(by_error.items(), key=lambda kv: -kv[1])[:5]]
    return "\n".join([f"no trial completed (errors in {sweep_dir / runs.TRIALS_TABLE_FILE}):", *lines,
                      "the same space fails the same way again: fix the space (or the model, data) first"])


def run_sweep(space: SearchSpace, resume: bool = False, console=None, extend: int = 0) -> tuple[Path, dict]:
    """Run, resume or extend (by ``extend`` more trials) the sweep described by ``space``;
    returns (sweep dir, summary) where the summary counts trials by status and lists the Pareto
    trial ids. ``space.num_samples`` becomes the sweep's total after an extension."""
    from rich.console import Console

    console = console or Console()
    sweep_dir = space.sweep_dir().resolve()
    if resume and extend:
        raise UserError("--resume and --extend: resume an interrupted sweep first, then extend it")
    check_sweep_dir(space, sweep_dir, resume, extend)
    done_before = last_extension(sweep_dir).get("trials_before", 0) if resume else 0
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = None
    if space.sampler != "grid":
        # before preparing anything: a database that cannot be reached fails the sweep at once
        storage = open_storage(storage_url(space.storage, sweep_dir))
        if not (resume or extend) and study_exists(storage, space.name) and space.storage is None:
            # <sweep>/study.db without a Tune experiment: a start of this sweep killed early
            import optuna

            optuna.delete_study(study_name=space.name, storage=storage)
        elif not (resume or extend) and study_exists(storage, space.name):
            raise UserError(f"storage: {space.storage or sweep_dir / runs.STUDY_FILE} already holds a study "
                            f"named {space.name!r}; extend that sweep with --extend N, or choose another "
                            f"name (name=...)")
    if extend:
        rows = collect_rows(sweep_dir, {})
        done_before = len(rows)
        sync_study(storage, space, rows, retention_threshold(space, sweep_dir))
        fail_stale_trials(storage, space.name)
        space.num_samples += extend
        record_extension(sweep_dir, extend, done_before, space.num_samples)
        console.print(f"[bold]extending[/] the sweep in {sweep_dir}: {extend} more trial(s) after {done_before}")
    write_text(sweep_dir / runs.SWEEP_SPACE_FILE, dumps_space(space))
    (sweep_dir / runs.STOP_FILE).unlink(missing_ok=True)

    init_ray(space)     # before preparing: an unschedulable trial fails the sweep at once
    check_schedulable(space, wait_s=autoscale_wait_s(), say=console.print)
    prepared = None
    if space.prepare.enabled:
        from rayunlearn.sweep.prepare import copy_references, prepare

        prepared = prepare(space, console=console)
        copy_references(prepared, sweep_dir)

    aggregator = start_aggregator(space, sweep_dir)
    ctx = TrialContext(space=to_dict(space), sweep_dir=str(sweep_dir),
                       target=prepared.target if prepared else "",
                       data=to_dict(prepared.data) if prepared else None,
                       retain_reference=(str(runs.reference_eval(sweep_dir, "retain"))
                                         if prepared and prepared.retain_reference else None),
                       aggregator=aggregator[0] if aggregator else None,
                       retention_threshold=retention_threshold(space, sweep_dir))
    trainable = make_trainable(space, ctx)
    if resume:
        console.print(f"[bold]resuming[/] the sweep in {sweep_dir}")
        tuner = restore_tuner(trainable, sweep_dir, done_before)
    else:
        tracker = MlflowTracker(space.name, sweep_dir, space.tracking_uri)
        tuner = build_tuner(space, trainable, sweep_dir, storage, num_samples=space.total_trials - done_before,
                            done_before=done_before, callbacks=(tracker,))
    t0 = time.time()
    try:
        grid = tuner.fit()
    finally:
        stop_aggregator(aggregator)
    summary = write_tables(space, sweep_dir, errors=grid_errors(sweep_dir, grid))
    if storage is not None:
        sync_study(storage, space, summary["rows"], retention_threshold(space, sweep_dir))
    summary["wall_s"] = time.time() - t0
    summary["interrupted"] = (summary["finished"] < space.total_trials)
    print_summary(space, sweep_dir, summary, console)
    return sweep_dir, summary


def check_sweep_dir(space: SearchSpace, sweep_dir: Path, resume: bool, extend: int = 0) -> None:
    """A new sweep needs a directory without a Tune experiment; a resumed one needs the
    experiment and the same resolved space (an extended sweep: its total ``num_samples`` is
    taken from ``sweep.yaml``); an extended one needs a finished sweep of the same space but
    for ``num_samples``."""
    saved = sweep_dir / runs.SWEEP_SPACE_FILE
    if resume or extend:
        if not can_restore(sweep_dir):
            what = "resume" if resume else "extend"
            raise UserError(f"nothing to {what} in {sweep_dir} (no Tune experiment in "
                            f"{sweep_dir / runs.TUNE_DIR}); run the sweep without --{what}")
        if last_extension(sweep_dir) or extend:
            space.num_samples = int(load_space(saved).num_samples)
        if extend:
            try:
                check_resume_config(space, saved, ignore=())
            except UserError as exc:
                raise ExtendError(f"--extend: the space differs from the sweep's ({exc}); extend with the "
                                  f"saved space {saved} (only num_samples may differ)") from None
            rows = collect_rows(sweep_dir, {})
            check_extendable(space.sampler, sum(r["status"] in runs.FINISHED_STATUSES for r in rows),
                             space.total_trials, sweep_dir)
            return
        check_resume_config(space, saved, ignore=())
        return
    if (sweep_dir / runs.TUNE_DIR).exists():
        raise UserError(f"{sweep_dir} already holds a sweep; continue it with --resume, or choose "
                        f"another name (name=...) or results directory (results=...)")
