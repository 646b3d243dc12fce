"""Every trial of a sweep as an MLflow run.

Where. ``tracking_uri:`` in the space (an MLflow tracking server, ``http://host:5000``, or any
store URI), by default the SQLite store ``<sweep>/mlruns.db`` with artifacts in
``<sweep>/mlartifacts/`` (``rayunlearn.runs.MLFLOW_FILE``; ``mlflow ui --backend-store-uri
sqlite:///<sweep>/mlruns.db`` opens it). The MLflow experiment is named after the sweep.

What. One run per trial, named by its trial id (tag ``trial_id``): the hyper-parameters
(``hp.<term>.<param>``), the family and method string, the metrics of every evaluation the trial
reports (the trajectory, at their step) and the final ones from ``result.json`` (the time
breakdown ``time.*`` included), the trial's status (tag ``status``; the run ends FINISHED for a
completed trial, KILLED for one ended by early stopping, with its tag ``stop_reason``, FAILED
otherwise), the git commit and package version (``rayunlearn.provenance``) and, as artifacts, the trial's ``trial.json``, ``result.json`` and resolved
``config.yaml``. A resumed trial continues its run (found by its tag), so there is one run per
trial.

How. A Ray Tune callback on the driver, using MLflow's client API. Ray's own
``MLflowLoggerCallback`` would log Tune's config keys (the Optuna names) rather than the
decoded hyper-parameters, and an MLflow error inside it would stop the sweep; here a store that
refuses writes (or MLflow missing) is said once and the sweep goes on: the sweep's results are
in its own files, which this only mirrors.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from rayunlearn import runs
from rayunlearn.io import read_json
from rayunlearn.provenance import provenance


def tracking_uri(configured: Optional[str], sweep_dir: Path) -> str:
    """The MLflow tracking URI: the configured one, else ``sqlite:///<sweep>/mlruns.db``."""
    return configured or f"sqlite:///{Path(sweep_dir).resolve() / runs.MLFLOW_FILE}"


def _metric_items(values: dict) -> dict[str, float]:
    """The finite numbers of a result that are metrics (not Tune's bookkeeping, not the
    hyper-parameters, which are params)."""
    from ray.tune.result import AUTO_RESULT_KEYS

    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and k not in AUTO_RESULT_KEYS and not k.startswith(runs.HP_PREFIX)}


# an MLflow run's end state by trial status: a trial ended by early stopping is KILLED, not FAILED
_RUN_STATUS = {runs.COMPLETED: "FINISHED", runs.STOPPED: "KILLED"}


class MlflowTracker(Callback):
    """The Tune callback (see the module docstring); picklable (Tune saves it with the
    experiment): the client is made on first use."""

    def __init__(self, experiment: str, sweep_dir: Path, configured_uri: Optional[str]):
        self.experiment = experiment
        self.sweep_dir = Path(sweep_dir)
        self.uri = tracking_uri(configured_uri, sweep_dir)
        self._client = self._experiment_id = None
        self._runs: dict[str, str] = {}      # trial id -> MLflow run id
        self._broken: Optional[str] = None   # why tracking stopped (said once)

    def __getstate__(self):
        state = dict(self.__dict__)
        # a resumed sweep connects again, and tries again a store that failed before
        state["_client"], state["_runs"], state["_broken"] = None, {}, None
        return state

    # ---------------------------------------------------------------------------------------
    def _guarded(self, fn, *args) -> None:
        """Call ``fn``; the first failure turns tracking off, with one line on the console."""
        if self._broken is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - MLflow's, SQLAlchemy's and HTTP errors alike
            self._broken = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            print(f"[sweep] MLflow tracking at {self.uri} failed ({self._broken}); the sweep goes on without "
                  f"it: every result is in {self.sweep_dir} (result.json, {runs.TRIALS_TABLE_FILE})", flush=True)

    def _run_id(self, trial_id: str) -> str:
        """The trial's MLflow run: made on first use, or found by its tag (a resumed sweep)."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            found = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = found.experiment_id if found else self._client.create_experiment(
                self.experiment, artifact_location=(self.sweep_dir / runs.MLFLOW_ARTIFACTS_DIR).resolve().as_uri()
                if self.uri.startswith("sqlite:") else None)
        found = self._client.search_runs([self._experiment_id], filter_string=f"tags.trial_id = '{trial_id}'",
                                         max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = self._client.create_run(self._experiment_id, run_name=trial_id, tags={
                "trial_id": trial_id, "sweep": self.experiment, "status": runs.RUNNING,
                **{f"rayunlearn.{k}": v for k, v in provenance().items()}}).info.run_id
        self._runs[trial_id] = run_id
        return run_id

    def _started(self, trial) -> None:
        self._run_id(trial.trial_id)

    def _result(self, trial, result: dict) -> None:
        if result.get("status") != runs.RUNNING:
            return          # the final result is logged from result.json when the trial ends
        run_id = self._run_id(trial.trial_id)
        step = int(result.get("step", result.get("training_iteration", 0)))
        for k, v in _metric_items(result).items():
            self._client.log_metric(run_id, k, v, step=step)

    def _ended(self, trial, error: Optional[str]) -> None:
        """The trial's params, final metrics, status and files, from its directory."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = self._run_id(trial.trial_id)
        tdir = runs.trial_dir(self.sweep_dir, trial.trial_id)
        rec = read_json(tdir / runs.TRIAL_FILE) if (tdir / runs.TRIAL_FILE).exists() else {}
        res = read_json(tdir / runs.RESULT_FILE) if (tdir / runs.RESULT_FILE).exists() else {}
        status = res.get("status", runs.FAILED)
        metrics = _metric_items(res.get("metrics", {}))
        step = int(res.get("metrics", {}).get("step") or 0)
        now = int(time.time() * 1000)
        params = [Param(f"{runs.HP_PREFIX}{k}", str(v)) for k, v in rec.get("hp", {}).items()]
        params += [Param(k, str(rec[k])) for k in ("family", "method") if k in rec]
        tags = [RunTag("status", status), RunTag("error", (error or res.get("error", ""))[:5000]),
                RunTag(runs.STOP_REASON_COLUMN, res.get(runs.STOP_REASON_COLUMN, ""))]
        self._client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                               params=params, tags=tags)
        for name in (runs.TRIAL_FILE, runs.RESULT_FILE, runs.CONFIG_FILE):
            if (tdir / name).exists():
                self._client.log_artifact(run_id, str(tdir / name))
        self._client.set_terminated(run_id, _RUN_STATUS.get(status, "FAILED"))

    # ---------------------------------------------------------------------------------------
    # Tune's hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._guarded(self._started, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._guarded(self._result, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guarded(self._ended, trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial.get_error()
        self._guarded(self._ended, trial, f"{type(error).__name__}: {error}" if error is not None else runs.FAILED)
