"""A sweep's tables: ``trials.parquet`` (one row per trial directory, built from the
``result.json`` each trial writes), ``pareto.json`` (the non-dominated completed trials) and the
summary printed at the end.

trials.parquet holds ``rayunlearn.runs.TRIALS_FIXED_COLUMNS`` (trial_id, family, method, status,
error, time_s, attempts, removal, retention) and ``stop_reason`` (why early stopping ended a
``stopped`` trial, else empty), then ``hp.<term>.<param>`` per hyper-parameter and every flattened
scalar metric of the trial's final evaluation (``forget.prob``, ...; a stopped trial's: those of
the trajectory evaluation it was stopped at, ``step`` among them): for a trial of several seeds
the means, ``removal_sd`` / ``retention_sd``, ``n_seeds`` and every seed's own
``seed<j>.<metric>`` (``rayunlearn.sweep.trial.aggregate_seeds``), and ``feasible`` against the
retention floor. A trial
directory without a result is ``incomplete`` (the sweep was interrupted) or, when Tune reported
an error for it (a worker killed beyond ``max_failures``), ``failed`` with Tune's error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pyarrow as pa

from rayunlearn import runs
from rayunlearn.io import read_json, write_json, write_parquet
from rayunlearn.pareto import hypervolume_2d, noisy_pareto_front, pareto_front
from rayunlearn.sweep.space import OBJECTIVES, SearchSpace
from rayunlearn.runs import short_error
from rayunlearn.sweep.trial import root_error


def write_tables(space: SearchSpace, sweep_dir: Path, errors: Optional[dict[str, str]] = None) -> dict:
    """Write ``trials.parquet`` and ``pareto.json`` (each atomically: the driver rewrites them as
    trials finish, so a killed driver leaves current tables); ``errors``: Tune's error per trial
    id, for trials that died without a result. Return a summary (counts by status, finished
    trials, Pareto trial ids, rows, hypervolume)."""
    rows = collect_rows(sweep_dir, errors or {})
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    table = pa.table({c: _column([r.get(c) for r in rows]) for c in columns or runs.TRIALS_FIXED_COLUMNS})
    write_parquet(sweep_dir / runs.TRIALS_TABLE_FILE, table)
    noise_file = runs.noise_path(sweep_dir)
    pareto = pareto_json(space, rows, read_json(noise_file) if noise_file.exists() else None)
    write_json(sweep_dir / runs.PARETO_FILE, pareto)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    finished = sum(v for k, v in counts.items() if k in runs.FINISHED_STATUSES)
    return {"counts": counts, "finished": finished, "pareto": pareto["trials"], "rows": rows,
            "hypervolume": pareto["hypervolume"]}


def grid_errors(sweep_dir: Path, grid) -> dict[str, str]:
    """Tune's error per trial id from its ResultGrid (trials that died without a result: a worker
    killed beyond ``max_failures``)."""
    errors: dict[str, str] = {}
    for r in grid:
        if r.error is not None:
            tid = (r.metrics or {}).get("trial_id") or _trial_id_from_path(sweep_dir, r.path)
            if tid:
                errors[tid] = short_error(root_error(r.error))
    return errors


def collect_rows(sweep_dir: Path, errors: dict[str, str]) -> list[dict]:
    """One row per trial directory: from ``result.json`` (written by the trial), with Tune's
    error (``errors``, by trial id) for trials that died without one."""
    rows = []
    for trial_file in sorted((sweep_dir / runs.TRIALS_DIR).glob(f"*/{runs.TRIAL_FILE}")):
        tdir = trial_file.parent
        rec = read_json(trial_file)
        res = read_json(tdir / runs.RESULT_FILE) if (tdir / runs.RESULT_FILE).exists() else {}
        tid = rec["trial_id"]
        status = res.get("status")
        error = res.get("error", "")
        if status is None:
            status, error = (runs.FAILED, errors[tid]) if tid in errors else (runs.INCOMPLETE, "")
        elif status == runs.FAILED and tid in errors:
            error = errors[tid]
        attempts_file = tdir / runs.ATTEMPTS_FILE
        attempts = len(attempts_file.read_text().splitlines()) if attempts_file.exists() else 0
        row = {"trial_id": tid, "family": rec["family"], "method": rec["method"], "status": status,
               "error": error, "time_s": float(res.get("time_s", float("nan"))), "attempts": attempts,
               runs.STOP_REASON_COLUMN: res.get(runs.STOP_REASON_COLUMN, "")}
        for k, v in rec["hp"].items():
            row[f"{runs.HP_PREFIX}{k}"] = v
        metrics = res.get("metrics", {})
        for k in OBJECTIVES:
            # strict JSON stores a non-finite objective as null: NaN again in the table
            row[k] = float("nan") if metrics.get(k) is None else metrics[k]
        for k, v in metrics.items():
            if k not in row:
                row[k] = v
        rows.append(row)
    return rows


def _trial_id_from_path(sweep_dir: Path, path: Optional[str]) -> Optional[str]:
    """The trial directory whose id is part of Tune's trial path (Tune names it after the id)."""
    if not path:
        return None
    name = Path(path).name
    for d in (sweep_dir / runs.TRIALS_DIR).glob("*"):
        if d.name in name:
            return d.name
    return None


def _column(vals: list) -> pa.Array:
    """A Parquet column: float64 for numbers, bool for flags, else strings (JSON for the rest)."""
    present = [v for v in vals if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.array([float(v) if v is not None else None for v in vals], pa.float64())
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(vals, pa.bool_())
    return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in vals],
                    pa.string())


def pareto_json(space: SearchSpace, rows: list[dict], noise: Optional[dict] = None) -> dict:
    """The non-dominated completed trials that meet the retention floor
    (``rayunlearn.pareto.pareto_front``; ``feasible`` is not false) and the hypervolume with
    reference point (0, 0) (both objectives are scores in [0, 1]); with the noise floor between
    retain replicates (``noise``: runs.noise_path's content) also the front beyond the noise
    (``noise_trials``: ``rayunlearn.pareto.noisy_pareto_front`` with its half-widths)."""
    done = [r for r in rows if r["status"] == runs.COMPLETED and r.get(runs.FEASIBLE_COLUMN) is not False]
    points = [[r["removal"], r["retention"]] for r in done]
    front = pareto_front(points, maximize=space.maximize)
    front = sorted(front, key=lambda i: (points[i][0], points[i][1]))
    hv = hypervolume_2d(points, ref=(0.0, 0.0), maximize=space.maximize) if all(space.maximize) else None
    out = {"objectives": list(OBJECTIVES), "maximize": list(space.maximize),
           "trials": [done[i]["trial_id"] for i in front],
           "points": [points[i] for i in front],
           "methods": [done[i]["method"] for i in front],
           "hypervolume": hv, "hypervolume_reference": [0.0, 0.0],
           "num_completed": sum(r["status"] == runs.COMPLETED for r in rows),
           "num_infeasible": sum(r.get(runs.FEASIBLE_COLUMN) is False for r in rows), "num_trials": len(rows)}
    if noise is not None:
        band = [float(noise["removal"]), float(noise["retention"])]
        noisy = noisy_pareto_front(points, band, maximize=space.maximize)
        out.update({"noise_band": band, "noise_trials": [done[i]["trial_id"] for i in
                                                         sorted(noisy, key=lambda i: (points[i][0], points[i][1]))]})
    return out


def fmt(v) -> str:
    """A number with 4 decimals, anything else as text."""
    return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)


def _pm(row: dict, key: str) -> str:
    """A mean with its seeds' sd (``0.5123 ± 0.0100``) when the trial ran several seeds."""
    sd = row.get(f"{key}{runs.SD_SUFFIX}")
    return fmt(row[key]) + (f" ± {sd:.4f}" if isinstance(sd, float) and math.isfinite(sd) else "")


def print_summary(space: SearchSpace, sweep_dir: Path, summary: dict, console) -> None:
    """The trials sorted by removal, the Pareto front starred."""
    from rich.table import Table

    front = set(summary["pareto"])
    table = Table(title=f"sweep {space.name}: {summary['counts']}  (Pareto front: *)")
    for c in ("", "trial", "status", "removal", "removal (report)", "retention", "method"):
        table.add_column(c)
    for r in sorted(summary["rows"], key=lambda r: -(r["removal"] if math.isfinite(r["removal"]) else -1e9)):
        held_out = r.get("removal_report")     # the removal score on the held-out authors
        status = r["status"] + (" (below floor)" if r.get(runs.FEASIBLE_COLUMN) is False else "")
        table.add_row("*" if r["trial_id"] in front else "", r["trial_id"], status, _pm(r, "removal"),
                      "–" if held_out is None else fmt(held_out), _pm(r, "retention"),
                      r["error"][:60] if r["status"] == runs.FAILED else
                      r[runs.STOP_REASON_COLUMN][:60] if r["status"] == runs.STOPPED else r["method"])
    console.print(table)
    console.print(f"wrote {sweep_dir / runs.TRIALS_TABLE_FILE} and {runs.PARETO_FILE} "
                  f"(hypervolume {fmt(summary['hypervolume'])})")
