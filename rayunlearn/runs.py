"""The results contract: every directory and file name under ``results/``, the status values of
runs and trials, the Parquet schemas of the G-effect tables and the trials table, and the light
error types that cross process boundaries.

Writers (training, sweeps, G-effect sinks, evaluation) and readers (report, benchmarks, tests)
import their names from here, so the layout has one owner. This module imports no torch: the
report and the sweep driver read results without loading a model library.

Layout (``docs/ARCHITECTURE.md`` draws it with every field)::

    <results>/
      data/synthetic/                       the generated benchmark
      prepared/<settings hash>/             cached models + reference evaluations of a sweep/demo
        done.json                           the stages finished
        data/                               the synthetic benchmark of these settings
        models/{base,target,retain}/        finetuning runs (a run directory each)
        models/retain.<j>/                  retain replicate j >= 1 (`prepare.retain_replicates`)
        reference/{target,retain}.json      evaluations of the target and retain models
        reference/retain.<j>.json           evaluation of retain replicate j
        reference/noise.json                the noise floor between retain replicates (noise_path)
      <sweep>/
        sweep.yaml  trials.parquet  pareto.json  [STOP]
        study.db                            the Optuna study (SQLite; `storage:` may put it elsewhere)
        extensions.jsonl                    one line per `--extend N`
        mlruns.db                           the MLflow store, one run per trial (`tracking_uri:`)
        tune/                               Ray Tune's experiment state (--resume)
        reference/{target,retain}.json      (+ {target,retain}.attacks.json with eval.attacks)
        trials/<trial_id>/                  a run directory (+ trial.json, attempts.jsonl, result.json)
          seed<j>/                          seed j >= 1 of a `seeds: k` trial (a run directory + trial.json)
        effects/<trial_id>/{geffects,steps}.parquet
          seed<j>/{geffects,steps}.parquet  seed j >= 1's G-effect tables
        report/                             the report's output

    a run directory: config.yaml  status.json  log.jsonl  metrics.json  raw.json
                     trajectory.jsonl  tofu_eval/  checkpoints/step-<k>/
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import re

import pyarrow as pa

from rayunlearn import UserError

# ---------------------------------------------------------------------------------------------
# names inside a run directory (finetuning run, unlearning run, sweep trial)

CONFIG_FILE = "config.yaml"            # the resolved config; resume refuses a different one
STATUS_FILE = "status.json"            # {"status": RUNNING|COMPLETED|DIVERGED|FAILED, "step": ...}
LOG_FILE = "log.jsonl"                 # one line per optimiser step
METRICS_FILE = "metrics.json"          # the final evaluation
RAW_FILE = "raw.json"                  # per-item values behind metrics.json
TRAJECTORY_FILE = "trajectory.jsonl"   # evaluations every k steps
TOFU_EVAL_DIR = "tofu_eval"            # the evaluation in the original TOFU log format
RAY_TRAIN_DIR = "ray"                  # Ray Train's own state of a multi-worker run
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
DEEPSPEED_CHECKPOINTS_DIR = "deepspeed"  # checkpoints/deepspeed/step-<k>/: DeepSpeed's own engine state
MODEL_WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"   # LoRA adapter weights beside the merged model
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer.json"

# names a sweep adds to a trial's run directory
TRIAL_FILE = "trial.json"              # the search point (family, method, hyper-parameters)
ATTEMPTS_FILE = "attempts.jsonl"       # one line per start: retries are visible
RESULT_FILE = "result.json"            # status, error, time, flattened metrics
ATTACKS_FILE = "attacks.json"          # per-item values of the run's attacks (eval.attacks)

# names in a sweep directory
SWEEP_SPACE_FILE = "sweep.yaml"        # the resolved search space
TRIALS_TABLE_FILE = "trials.parquet"
PARETO_FILE = "pareto.json"
TRIALS_DIR = "trials"
EFFECTS_DIR = "effects"
REFERENCE_DIR = "reference"
REPORT_DIR = "report"
TUNE_DIR = "tune"                      # Ray Tune's experiment state (what --resume restores)
STOP_FILE = "STOP"                     # created by anyone: the sweep stops after the running trials
STUDY_FILE = "study.db"                # the Optuna study (an RDB storage: optuna-dashboard opens it)
EXTENSIONS_FILE = "extensions.jsonl"   # one line per `rayunlearn sweep --extend N`
MLFLOW_FILE = "mlruns.db"              # the MLflow tracking store (SQLite), one MLflow run per trial
MLFLOW_ARTIFACTS_DIR = "mlartifacts"   # the artifacts of that store

# names under the results root
DATA_DIR = "data"
PREPARED_DIR = "prepared"
MODELS_DIR = "models"
PREPARED_DONE_FILE = "done.json"       # in prepared/<hash>/: the preparation stages finished
DEMO_STATE_FILE = "demo_state.json"    # in a demo directory: the stages `rayunlearn demo` finished

# names in a report directory
REPORT_SUMMARY_FILE = "summary.json"   # the report's machine-readable answers (fronts, claim verdicts)

NOISE_FILE = "noise.json"              # in reference/: the score noise floor (noise_path)

EFFECT_TABLES = ("geffects", "steps")


def noise_path(results_dir: str | Path) -> Path:
    """``<results_dir>/reference/noise.json``: the noise floor of every score, measured between
    retain-model replicates (``rayunlearn.sweep.prepare.noise_floor``): {"removal": half-width,
    "retention": half-width, "replicates": k, "removal_score": name, "pairs": k(k-1),
    "scores": {score: {"half_width", "max", "values"}}}. A score's half-width is the mean, over
    the ordered pairs (i, j) of replicates, of |s(i scored against j) - s(j scored against j)|:
    how far a model that differs from the reference only by its training seed lands from the
    reference's own value. The Pareto front's noise band and early stopping read it."""
    return Path(results_dir) / REFERENCE_DIR / NOISE_FILE


def retain_replicate(j: int) -> str:
    """The preparation stage (``models/<stage>``, ``reference/<stage>.json``) of retain replicate
    ``j``: ``retain`` for j = 0 (the retain model every sweep uses), ``retain.<j>`` after it."""
    return "retain" if int(j) == 0 else f"retain.{int(j)}"


def seed_run_id(trial_id: str, j: int) -> str:
    """The run id of seed ``j`` of a sweep trial (``seeds: k``): the trial id itself for seed 0,
    so a one-seed trial's files stay where they always were (``trials/<trial_id>/``,
    ``effects/<trial_id>/``), and ``<trial_id>/seed<j>`` after it, so seed j's run directory is
    ``trials/<trial_id>/seed<j>/`` and its G-effect tables ``effects/<trial_id>/seed<j>/``
    (``run_dir`` and ``effects_table`` of that id): every seed of a trial lives under the trial's
    own directories, and readers of ``trials/*/`` see one directory per trial."""
    return str(trial_id) if int(j) == 0 else f"{trial_id}/{SEED_PREFIX}{int(j)}"


def run_dir(out: str | Path, trial_id: Optional[str]) -> Path:
    """The run directory of an unlearning run: ``out/trials/<trial_id>`` inside a sweep (or any
    run given a trial id), ``out`` itself otherwise."""
    return Path(out) / TRIALS_DIR / trial_id if trial_id else Path(out)


def trial_dir(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / str(trial_id)


def effects_table(results_dir: str | Path, trial_id: str, table: str) -> Path:
    """``<results_dir>/effects/<trial_id>/<table>.parquet``: where every G-effect sink writes."""
    if table not in EFFECT_TABLES:
        raise ValueError(f"unknown G-effect table {table!r}; expected one of {EFFECT_TABLES}")
    return Path(results_dir) / EFFECTS_DIR / str(trial_id) / f"{table}.parquet"


def reference_eval(results_dir: str | Path, which: str) -> Path:
    """``<results_dir>/reference/<which>.json`` (which: "target" or "retain")."""
    return Path(results_dir) / REFERENCE_DIR / f"{which}.json"


def attacked_reference(reference: str | Path) -> Path:
    """``<dir>/<stem>.attacks.json`` beside a reference evaluation ``<dir>/<stem>.json``: the
    reference model's evaluations under the sweep's attacks (``rayunlearn.eval.attacks``)."""
    reference = Path(reference)
    return reference.with_name(f"{reference.stem}{ATTACKED_SUFFIX}")


def prepared_dir(results: str | Path, key: str) -> Path:
    """``<results>/prepared/<key>``: the models and reference evaluations of one preparation."""
    return Path(results) / PREPARED_DIR / key


def model_dir(root: str | Path, stage: str) -> Path:
    """``<root>/models/<stage>``: a finetuning run directory (base, target, retain)."""
    return Path(root) / MODELS_DIR / stage


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{int(step)}"


def checkpoint_step(path: str | Path) -> Optional[int]:
    """The step of a ``step-<k>`` directory, None for any other name."""
    name = Path(path).name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    tail = name[len(CHECKPOINT_PREFIX):]
    return int(tail) if tail.isdigit() else None


def list_checkpoints(run: str | Path) -> list[Path]:
    """The run's checkpoint directories, oldest first (by step)."""
    root = Path(run) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


# ---------------------------------------------------------------------------------------------
# statuses: one vocabulary for run status files, trial results and the trials table

RUNNING = "running"        # started, not finished (a killed run stays here until resumed)
COMPLETED = "completed"    # finished and evaluated
DIVERGED = "diverged"      # stopped by the divergence guard (deterministic: never retried)
FAILED = "failed"          # raised an error (its message is in the trial's `error`)
INCOMPLETE = "incomplete"  # a trial directory without a result (the sweep was interrupted)
STOPPED = "stopped"        # ended early by the sweep's early stopping (its reason in `stop_reason`)

STATUSES = (RUNNING, COMPLETED, DIVERGED, FAILED, INCOMPLETE, STOPPED)
FINISHED_STATUSES = frozenset({COMPLETED, DIVERGED, FAILED, STOPPED})   # a resumed sweep does not rerun these
UNSUCCESSFUL_STATUSES = frozenset({DIVERGED, FAILED, INCOMPLETE, RUNNING, STOPPED})


# ---------------------------------------------------------------------------------------------
# tables

# geffects.parquet: one row per value. estimator: EXACT (∇R·∇L at θ_t), REALISED
# (∇R·(θ_t − θ_{t+1})/lr: the step the optimiser really took; kinds "total" and "parameter") or
# EMA (the reference code's estimator). kind:
#   "total" | "term" | "parameter" | "group"      the effect, whole or decomposed
#   "instance"                                    a forget instance's share ∇R·∇l_i of a term
#                                                 (`term` = its label; Σ_i = the term's value)
#   INSTANCE_GA_KIND                              the unweighted GA PG-effect of the instance,
#                                                 ∇R·∇ log π(y_i|x_i): GA's instance loss (the
#                                                 summed answer log-likelihood) without its 1/N
#                                                 (the paper's Fig. 5(b) x-axis)
#   INSTANCE_WEIGHT_KIND                          the forget term's own weight of the instance
#                                                 (`term` = its label, `risk` = ""): NPO's
#                                                 2σ(β·(log π − log π_ref)); TNPO/WTNPO's token
#                                                 weights and WGA's p^α averaged over the answer
# Instance rows carry `instance` = the forget row id (-1 elsewhere).
GEFFECT_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("method", pa.string()), ("step", pa.int64()), ("risk", pa.string()),
    ("parameter", pa.string()), ("layer", pa.int64()), ("group", pa.string()), ("kind", pa.string()),
    ("term", pa.string()), ("instance", pa.int64()), ("value", pa.float64()), ("estimator", pa.string()),
])
EXACT, REALISED, EMA = "exact", "realised", "ema"
INSTANCE_WEIGHT_KIND = "instance_weight"
INSTANCE_GA_KIND = "instance_ga_unweighted"

# steps.parquet: one row per recorded step. `removal`/`retention`: the SGD G-effect ∇R·∇L;
# `*_realised`: e_real = ∇R·(θ_t − θ_{t+1})/lr; `predicted_*_change` = −lr·e,
# `predicted_*_change_realised` = −∇R·(θ_t − θ_{t+1}) (= −lr·e_real), beside
# `measured_*_change` = R(θ_{t+1}) − R(θ_t) on the same probe; cumulative_* = Σ lr·e·every.
STEP_FIELDS = (
    "lr", "removal", "retention", "removal_realised", "retention_realised", "cosine_removal",
    "cosine_retention", "predicted_removal_change", "measured_removal_change",
    "predicted_retention_change", "measured_retention_change", "risk_removal", "risk_retention",
    # beyond the ARCHITECTURE minimum
    "predicted_removal_change_realised", "predicted_retention_change_realised",
    "cumulative_removal", "cumulative_retention", "cumulative_removal_realised",
    "cumulative_retention_realised",
    "removal_forget_terms", "retention_forget_terms", "objective_grad_norm", "every",
)
STEPS_SCHEMA = pa.schema([("trial_id", pa.string()), ("method", pa.string()), ("step", pa.int64())]
                         + [(f, pa.float64()) for f in STEP_FIELDS])

EFFECT_SCHEMAS = {"geffects": GEFFECT_SCHEMA, "steps": STEPS_SCHEMA}
# columns that identify a value (everything but `value`): how rank partial sums are matched
EFFECT_KEY_COLUMNS = {"geffects": [f.name for f in GEFFECT_SCHEMA if f.name != "value"],
                      "steps": ["trial_id", "method", "step"]}

# trials.parquet: these columns always, then `hp.<name>` per hyper-parameter and the flattened
# metrics (`forget.prob`, `mia.privleak`, ...) of the trial's final evaluation.
# `removal` is the removal score on the held-out split's selection part; `removal_report` (among
# the metrics) the same score on the report part (rayunlearn.eval.evaluate).
TRIALS_FIXED_COLUMNS = ("trial_id", "family", "method", "status", "error", "time_s", "attempts",
                        "removal", "retention")
# where a trial's time_s went (`time.<phase>` in result.json's metrics and trials.parquet): the
# training loop measures the phases (exclusive: G-effect recording inside a step counts as
# effects, not steps); `other` is time_s minus their sum (see rayunlearn.train.timing)
TIME_PREFIX = "time."
TIME_PHASES = ("load", "steps", "effects", "trajectory_eval", "final_eval", "attacks")
TIME_OTHER = "other"
# replicates (`seeds: k` in a search space): `removal`/`retention` are the means over the seeds,
# SD_SUFFIX columns their standard deviations (sample sd, ddof 1; NaN for one seed), SEEDS_COLUMN
# the number of seeds, and every seed's own values are kept as `seed<j>.<column>`; the other
# numeric metrics are means too, `time.*` sums (rayunlearn.sweep.trial.aggregate_seeds)
SD_SUFFIX = "_sd"
SEEDS_COLUMN = "n_seeds"
SEED_PREFIX = "seed"
# the retention floor (`retention_floor:` in a search space): whether a trial met it (mean
# retention >= floor x the target model's retention); None when no floor is set or the trial failed
FEASIBLE_COLUMN = "feasible"
# early stopping: why a `stopped` trial was stopped, and the step of its last evaluation
STOP_REASON_COLUMN = "stop_reason"
# attacks (`eval.attacks`): `attack.<name>.<metric>` (e.g. attack.relearn.forget.prob); an attack
# that failed leaves its metrics NaN and its reason in `attack.<name>.error`
ATTACK_PREFIX = "attack."
ATTACKED_SUFFIX = ".attacks.json"     # a reference model's attacked evaluations (attacked_reference)
TRIALS_REQUIRED_COLUMNS = ("trial_id", "family", "method", "status", "removal", "retention")
HP_PREFIX = "hp."


# ---------------------------------------------------------------------------------------------
# errors that cross process boundaries (recognised by type, never by message)

class DivergedError(UserError):
    """The divergence guard stopped a run: a non-finite loss or gradient norm. Deterministic for a
    given config and seed, so a sweep records it and does not retry it."""


# the text of a trial's `error` column and an attack's `attack.<name>.error`
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def short_error(exc: BaseException) -> str:
    """``Type: message`` on one line, without terminal colour codes, cut to 500 characters (a
    table cell, not a traceback)."""
    text = " ".join(_ANSI.sub("", f"{type(exc).__name__}: {exc}").split())
    return text if len(text) <= 500 else text[:497] + "..."
