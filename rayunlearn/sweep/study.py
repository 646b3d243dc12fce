"""The sweep's Optuna study in an RDB storage, and extending a finished sweep.

Where the study lives. ``storage:`` in the space: a database URL (``postgresql://host/db`` on a
cluster, where several drivers share one server; each sweep is the study named after the sweep's
``name``), or by default the SQLite file ``<sweep>/study.db`` (``rayunlearn.runs.STUDY_FILE``); one driver works on a study at a time.
It is Optuna's own RDB storage, so ``optuna.load_study(study_name=NAME, storage=URL)`` and
``optuna-dashboard URL`` open it as it is. The URL is checked for its form when the space loads
and opened before anything is prepared: a server that cannot be reached fails the sweep at once.
Passwords do not belong in the URL (it is saved in ``sweep.yaml``): use the database's own
credential files (``~/.pgpass``, ``~/.my.cnf``).

Extending. ``rayunlearn sweep SPACE --extend N`` runs N more trials in a finished sweep: a new
Tune experiment in ``<sweep>/tune/`` whose OptunaSearch loads the study, so the sampler sees
every earlier trial. The space must be the saved one except ``num_samples`` (which becomes the
old total + N in ``sweep.yaml``); each extension appends a line to ``extensions.jsonl``. A
``sampler: grid`` sweep runs each family once and has no study: extending it is refused (add
families in a new sweep). An interrupted extension continues with ``--resume`` like any sweep.
"""

from __future__ import annotations

import time
from pathlib import Path

from rayunlearn import UserError, runs
from rayunlearn.io import append_jsonl, read_jsonl

CONNECT_TIMEOUT_S = 10   # a database server that does not answer fails the sweep this fast


class StudyStorageError(UserError):
    """The Optuna storage (``storage:``) cannot be opened, or holds a study it should not."""


class ExtendError(UserError):
    """``--extend`` asked of a sweep that cannot be extended."""


def storage_url(configured: str | None, sweep_dir: Path) -> str:
    """The study's storage URL: the configured one, else ``sqlite:///<sweep>/study.db``."""
    return configured or f"sqlite:///{Path(sweep_dir).resolve() / runs.STUDY_FILE}"


def open_storage(url: str):
    """Optuna's RDB storage at ``url`` (its tables created when new); a database that cannot be
    reached raises :class:`StudyStorageError` at once, naming the URL without its password."""
    import optuna
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    connect_args = {} if parsed.get_backend_name() == "sqlite" else {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect_args})
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors have no common type
        raise StudyStorageError(
            f"storage: cannot open the Optuna study storage {parsed.render_as_string(hide_password=True)} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); check that the database server "
            f"is reachable and the credentials, or leave storage unset for <sweep>/{runs.STUDY_FILE}") from None


def study_exists(storage, name: str) -> bool:
    import optuna

    return name in optuna.study.get_all_study_names(storage)


def sync_study(storage, space, rows: list[dict], retention_threshold: float | None = None) -> int:
    """Tell the study the result of every finished trial it still holds as running: a graceful
    stop (``STOP``) can end the experiment between a trial's result and Tune's telling the
    searcher, and the restored searcher never hears of it. Trials are matched by their sampled
    values (the Tune config is the Optuna trial's params); with a ``retention_threshold`` each is
    told its retention-floor constraint too (``rayunlearn.sweep.constraint``). Returns how many
    were told."""
    import math

    import optuna
    from optuna.trial import TrialState

    from rayunlearn.sweep.space import OBJECTIVES, optuna_name

    finished = {}
    for r in rows:
        if r["status"] not in runs.FINISHED_STATUSES:
            continue
        dists = space.distributions[r["family"]]
        params = {optuna_name(space, r["family"], k): r[f"{runs.HP_PREFIX}{k}"]
                  for k, d in dists.items() if d.type != "fixed"}
        if space.multi_family:
            params["family"] = r["family"]
        finished[tuple(sorted(params.items()))] = r
    study = optuna.load_study(study_name=space.name, storage=storage)
    told = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        r = finished.get(tuple(sorted(t.params.items())))
        if r is None:
            continue
        values = [r[k] for k in OBJECTIVES]
        if retention_threshold is not None:
            from rayunlearn.sweep.constraint import constraint_value, record_constraint

            record_constraint(storage, t._trial_id, constraint_value(retention_threshold, r["retention"]))
        # a stopped trial counts with its last evaluation, as Tune's OptunaSearch tells it
        if r["status"] in (runs.COMPLETED, runs.STOPPED) and all(math.isfinite(v) for v in values):
            storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, values)
        else:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        told += 1
    return told


def fail_stale_trials(storage, name: str) -> int:
    """Mark the study's trials still ``RUNNING`` as failed: before an extension no trial of the
    sweep runs, and a stale running trial would bias TPE's constant liar. Returns how many."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=storage)
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


def check_extendable(sampler: str, finished: int, total: int, sweep_dir: Path) -> None:
    """Refuse ``--extend`` for a grid sweep and for a sweep that has not finished its trials."""
    if sampler == "grid":
        raise ExtendError("--extend: a sampler: grid sweep runs each family once and has no Optuna study "
                          "to extend; add the families to a new sweep (another name=...)")
    if finished < total:
        raise ExtendError(f"--extend: the sweep in {sweep_dir} has finished {finished} of its {total} trials; "
                          f"finish it with --resume first, then extend it")


def record_extension(sweep_dir: Path, added: int, trials_before: int, num_samples: int) -> None:
    append_jsonl(Path(sweep_dir) / runs.EXTENSIONS_FILE,
                 {"time": time.time(), "added": added, "trials_before": trials_before, "num_samples": num_samples})


def last_extension(sweep_dir: Path) -> dict:
    """The newest line of ``extensions.jsonl`` ({} for a sweep never extended)."""
    path = Path(sweep_dir) / runs.EXTENSIONS_FILE
    lines = read_jsonl(path) if path.exists() else []
    return lines[-1] if lines else {}
