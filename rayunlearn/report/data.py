"""Reading a results directory for the report: discovery of sub-results directories, strict
validation of every file the report reads, and lazy per-trial loading.

The layout and the trials table's columns are ``rayunlearn.runs``'s (the writers' own names), and a
trial counts as completed when its status is ``runs.COMPLETED`` and both objectives are finite
(what the sweep's Pareto front uses). Optional files that are
missing are reported as ``None`` (the report skips the section with a note); files that exist
but are malformed raise :class:`ReportDataError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayunlearn import UserError, runs
from rayunlearn.io import read_jsonl

# the columns of the G-effect tables the report reads (a subset of runs.STEPS_SCHEMA / GEFFECT_SCHEMA)
STEPS_REQUIRED = ("step", "removal", "retention")
GEFFECTS_REQUIRED = ("step", "risk", "kind", "value")


class ReportDataError(UserError):
    """A results file the report needs is missing or malformed."""


def read_parquet(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a Parquet file into a DataFrame and check that ``required`` columns are present."""
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise ReportDataError(f"{path}: cannot read it as Parquet ({type(exc).__name__}: {exc}); "
                              "re-run the stage that writes it or remove the file") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ReportDataError(f"{path}: missing column(s) {missing} (has {list(df.columns)}); "
                              "the file does not follow the results layout in docs/ARCHITECTURE.md")
    return df


def read_json_file(path: Path) -> Any:
    """Read a JSON file; a syntax error becomes a ReportDataError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ReportDataError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it") from exc


def as_float(value: Any, where: str) -> float:
    """None -> NaN; numbers -> float; anything else is a malformed file."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise ReportDataError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    raise ReportDataError(f"{where}: expected a number, got {value!r}")


def get_path(d: dict | None, path: tuple[str, ...]) -> Any:
    """``d[path[0]][path[1]]...`` or None when any level is missing."""
    cur: Any = d
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def check_metrics(obj: Any, where: Path) -> dict:
    """A metrics.json (or reference/*.json) must be an object with numeric removal/retention."""
    if not isinstance(obj, dict):
        raise ReportDataError(f"{where}: expected a JSON object (metrics.json schema), got {type(obj).__name__}")
    for key in ("removal", "retention"):
        if key not in obj:
            raise ReportDataError(f"{where}: missing '{key}' (every metrics dict carries removal and retention)")
        as_float(obj[key], f"{where}:{key}")
    return obj


@dataclass
class Collection:
    """One sub-results directory (a study or a sweep): its trials table and lazy per-trial files."""

    name: str
    path: Path
    trials: pd.DataFrame
    reference: dict[str, dict] = field(default_factory=dict)
    pareto_file: dict | None = None
    noise: dict | None = None     # the noise floor between retain replicates (runs.noise_path)
    space: dict | None = None     # the resolved search space (sweep.yaml) of a sweep
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def completed(self) -> pd.DataFrame:
        """Trials that completed (``runs.COMPLETED``) with both objectives finite."""
        t = self.trials
        ok = (t["status"] == runs.COMPLETED).to_numpy(bool) & np.isfinite(t["removal"].to_numpy(float)) \
            & np.isfinite(t["retention"].to_numpy(float))
        return t[ok].reset_index(drop=True)

    @property
    def hp_columns(self) -> list[str]:
        return [c for c in self.trials.columns if c.startswith(runs.HP_PREFIX)]

    def _load(self, key: str, trial_id: str, loader):
        ck = (key, trial_id)
        if ck not in self._cache:
            self._cache[ck] = loader()
        return self._cache[ck]

    def trial_dir(self, trial_id: str) -> Path:
        return runs.trial_dir(self.path, trial_id)

    def metrics(self, trial_id: str) -> dict | None:
        p = self.trial_dir(trial_id) / runs.METRICS_FILE
        return self._load("metrics", trial_id, lambda: check_metrics(read_json_file(p), p) if p.exists() else None)

    def log(self, trial_id: str) -> pd.DataFrame | None:
        p = self.trial_dir(trial_id) / runs.LOG_FILE
        return self._load("log", trial_id, lambda: _jsonl_frame(p, runs.LOG_FILE))

    def trajectory(self, trial_id: str) -> pd.DataFrame | None:
        p = self.trial_dir(trial_id) / runs.TRAJECTORY_FILE
        return self._load("trajectory", trial_id, lambda: _jsonl_frame(p, runs.TRAJECTORY_FILE))

    def steps(self, trial_id: str) -> pd.DataFrame | None:
        p = runs.effects_table(self.path, trial_id, "steps")
        return self._load("steps", trial_id, lambda: _sorted(read_parquet(p, STEPS_REQUIRED)) if p.exists() else None)

    def geffects(self, trial_id: str) -> pd.DataFrame | None:
        p = runs.effects_table(self.path, trial_id, "geffects")
        return self._load("geffects", trial_id, lambda: _prefer_exact(read_parquet(p, GEFFECTS_REQUIRED)) if p.exists() else None)

    def metric(self, row: pd.Series, path: tuple[str, ...]) -> float:
        """A metric of a trial: from its metrics.json, else from the flattened trials.parquet
        columns (``a.b``, ``a_b`` or ``a/b``); NaN when recorded nowhere. A trial of several
        seeds reads the table first: its metrics.json is seed 0's, the table holds the means."""
        m = self.metrics(str(row["trial_id"]))
        if _seeds(row) > 1 and ".".join(path) in row.index and _is_number(row[".".join(path)]):
            return float(row[".".join(path)])
        if m is not None:
            v = get_path(m, path)
            if v is not None:
                if path[-1] == "ks_n":
                    return v
                return as_float(v, f"{self.trial_dir(row['trial_id']) / runs.METRICS_FILE}:{'.'.join(path)}")
        for sep in (".", "_", "/"):
            for prefix in ("", "metrics."):
                col = prefix + sep.join(path)
                if col in row.index and row[col] is not None:
                    v = row[col]
                    if path[-1] == "ks_n":
                        return v
                    try:
                        return float(v)
                    except (TypeError, ValueError):
                        raise ReportDataError(f"{self.path / runs.TRIALS_TABLE_FILE}: column {col!r} of trial "
                                              f"{row['trial_id']} is not numeric: {v!r}")
        return math.nan


def _seeds(row: pd.Series) -> int:
    v = row.get(runs.SEEDS_COLUMN)
    return int(v) if _is_number(v) else 1


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("step", kind="stable").reset_index(drop=True)


def _prefer_exact(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the exact estimator's rows when the table holds several estimators."""
    if "estimator" in df.columns and df["estimator"].nunique() > 1 and (df["estimator"] == "exact").any():
        df = df[df["estimator"] == "exact"]
    return df.reset_index(drop=True)


def _jsonl_frame(path: Path, what: str) -> pd.DataFrame | None:
    if not path.exists():
        return None
    rows = read_jsonl(path)
    if not rows:
        return None
    if not all(isinstance(r, dict) for r in rows):
        raise ReportDataError(f"{path}: every line of {what} must be a JSON object")
    df = pd.DataFrame(rows)
    if "step" not in df.columns:
        raise ReportDataError(f"{path}: lines of {what} carry no 'step' field")
    return _sorted(df)


def load_collection(path: Path, root: Path) -> Collection:
    """Load one sub-results directory (it holds trials.parquet)."""
    table = path / runs.TRIALS_TABLE_FILE
    trials = read_parquet(table, runs.TRIALS_REQUIRED_COLUMNS)
    trials = trials.copy()
    trials["trial_id"] = trials["trial_id"].astype(str)
    for col in ("removal", "retention"):
        try:
            trials[col] = pd.to_numeric(trials[col], errors="raise").astype(float)
        except (TypeError, ValueError) as exc:
            raise ReportDataError(f"{table}: column '{col}' must be numeric ({exc})") from exc
    if trials["trial_id"].duplicated().any():
        dup = trials.loc[trials["trial_id"].duplicated(), "trial_id"].tolist()
        raise ReportDataError(f"{table}: duplicate trial ids {dup}")
    reference: dict[str, dict] = {}
    for which in ("target", "retain"):
        for base in (path, *path.parents):
            p = runs.reference_eval(base, which)
            if p.exists():
                reference[which] = check_metrics(read_json_file(p), p)
                break
            if base == root:
                break
    pareto_file = None
    pp = path / runs.PARETO_FILE
    if pp.exists():
        pareto_file = read_json_file(pp)
        if not isinstance(pareto_file, dict) or not isinstance(pareto_file.get("trials", []), list):
            raise ReportDataError(f"{pp}: expected an object with a 'trials' list")
    noise = None
    for base in (path, *path.parents):
        p = runs.noise_path(base)
        if p.exists():
            noise = check_noise(read_json_file(p), p)
            break
        if base == root:
            break
    if noise is None and "retain" in reference:
        p = prepared_noise(root, reference["retain"])
        noise = check_noise(read_json_file(p), p) if p is not None else None
    space = None
    sp = path / runs.SWEEP_SPACE_FILE
    if sp.exists():
        import yaml

        space = yaml.safe_load(sp.read_text(encoding="utf-8"))
        if not isinstance(space, dict):
            raise ReportDataError(f"{sp}: expected a mapping (the resolved search space)")
    name = path.relative_to(root).as_posix() if path != root else (path.name or str(path))
    return Collection(name=name, path=path, trials=trials, reference=reference, pareto_file=pareto_file,
                      noise=noise, space=space)


def prepared_noise(root: Path, retain: dict) -> Path | None:
    """The noise floor of the preparation whose retain model this collection was measured
    against: a study and a sweep of one demo share ``<root>/prepared/<key>/``, but only a sweep
    that asked for retain replicates copied their noise floor beside its references."""
    for cand in sorted((root / runs.PREPARED_DIR).glob(f"*/{runs.REFERENCE_DIR}/{runs.NOISE_FILE}")):
        mine = runs.reference_eval(cand.parents[1], "retain")
        if mine.exists() and read_json_file(mine) == retain:
            return cand
    return None


def check_noise(obj: Any, where: Path) -> dict:
    """A noise.json must give finite, non-negative half-widths of both objectives."""
    if not isinstance(obj, dict):
        raise ReportDataError(f"{where}: expected a JSON object (rayunlearn.runs.noise_path), got {type(obj).__name__}")
    for key in ("removal", "retention"):
        v = as_float(obj.get(key), f"{where}:{key}")
        if not (math.isfinite(v) and v >= 0):
            raise ReportDataError(f"{where}: '{key}' must be a half-width >= 0, got {obj.get(key)!r}; rerun the "
                                  "preparation with prepare.retain_replicates >= 2")
    return obj


def discover(results_dir: str | Path) -> list[Collection]:
    """All sub-results directories under ``results_dir`` (itself when it holds trials.parquet),
    found by the presence of ``trials.parquet``."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ReportDataError(f"{root}: no such results directory; pass the directory a sweep, a study "
                              "or `rayunlearn demo` wrote (e.g. results/demo)")
    if (root / runs.TRIALS_TABLE_FILE).exists():
        dirs = [root]
    else:
        dirs = sorted({p.parent for p in root.rglob(runs.TRIALS_TABLE_FILE)
                       if runs.TRIALS_DIR not in p.parent.relative_to(root).parts
                       and runs.REPORT_DIR not in p.parent.relative_to(root).parts[:1]})
    if not dirs:
        raise ReportDataError(f"{root}: no trials.parquet here or below; the report reads the results of "
                              "a sweep or study (run `rayunlearn sweep` or `rayunlearn demo` first)")
    return [load_collection(d, root) for d in dirs]
