"""Early stopping of hopeless trials (rayunlearn.sweep.stopping): the dominance-beyond-the-band
rule and the collapse floor on hand-made points, the stopper against completed trials on disk, a
real tiny Ray sweep in which a collapsing family is stopped and recorded while the other runs
on, and the benchmark's hypervolume-against-compute curve."""

import json
import math
import os

import pyarrow.parquet as pq
import pytest

from rayunlearn import runs
from rayunlearn.config import ConfigError
from rayunlearn.io import read_json, write_json
from rayunlearn.sweep.space import EarlyStopping, load_space
from rayunlearn.sweep.stopping import (RetentionFloorError, TrajectoryStopper, dominates_beyond, fast_retention,
                                       make_stopper, noise_band, retention_floor, stop_reason)
from rayunlearn.sweep.synthetic import COLLAPSED_RETENTION, synthetic_point

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MAX = (True, True)


def test_dominance_beyond_the_band_on_hand_made_points():
    band = (0.125, 0.0625)     # dyadic numbers: the differences below are exact in floating point
    # better by more than the band in removal, equal in retention: dominated
    assert dominates_beyond((0.75, 0.5), (0.5, 0.5), band, MAX)
    # better in removal by exactly the band: not beyond it
    assert not dominates_beyond((0.625, 0.5), (0.5, 0.5), band, MAX)
    # better in removal beyond the band, worse in retention but within the band (0.0625): dominated
    assert dominates_beyond((0.75, 0.4375), (0.5, 0.5), band, MAX)
    # ... worse in retention by more than the band: not dominated (a trade-off)
    assert not dominates_beyond((0.75, 0.4), (0.5, 0.5), band, MAX)
    # better in retention beyond its band, removal a little worse (within 0.125)
    assert dominates_beyond((0.375, 0.625), (0.5, 0.5), band, MAX)
    # a zero band is plain dominance, without ties
    assert dominates_beyond((0.5, 0.6), (0.5, 0.5), (0.0, 0.0), MAX)
    assert not dominates_beyond((0.5, 0.5), (0.5, 0.5), (0.0, 0.0), MAX)
    # a minimised objective: smaller is better
    assert dominates_beyond((0.25, 0.5), (0.5, 0.5), (0.125, 0.0), (False, True))
    assert not dominates_beyond((0.5, 0.5), (0.25, 0.5), (0.125, 0.0), (False, True))


def test_stop_reason_rules():
    both = EarlyStopping(collapse=True, dominated=True, min_step=4, min_completed=2)
    front = [(0.7, 0.6), (0.3, 0.9)]
    # before min_step nothing is judged
    assert stop_reason((0.1, 0.1), 2, both, 0.4, front, (0.0, 0.0), MAX) is None
    assert stop_reason((0.5, 0.3), 4, both, 0.4, front, (0.0, 0.0), MAX) == \
        "collapse: retention 0.3 < floor 0.4 at step 4"
    why = stop_reason((0.5, 0.55), 6, both, 0.4, front, (0.1, 0.02), MAX)
    assert why.startswith("dominated: (removal 0.5, retention 0.55) by a completed trial's (0.7, 0.6) at step 6")
    # within the band of every front point: runs on
    assert stop_reason((0.65, 0.55), 6, both, 0.4, front, (0.1, 0.1), MAX) is None
    # too few completed trials at this step
    assert stop_reason((0.5, 0.55), 6, both, 0.4, front[:1], (0.0, 0.0), MAX) is None
    # rules off
    off = EarlyStopping(collapse=False, dominated=False)
    assert stop_reason((0.0, 0.0), 6, off, 0.4, front, (0.0, 0.0), MAX) is None


def _target_eval(prob=0.8, truth_ratio=0.8, rouge=0.1) -> dict:
    blocks = {s: {"prob": prob, "rouge": rouge, "truth_ratio": truth_ratio}
              for s in ("retain", "real_authors", "world_facts")}
    full = 9 / (3 / prob + 3 / rouge + 3 / truth_ratio)
    return {"retention": full, "model_utility": full, **blocks}


def test_floor_is_a_fraction_of_the_targets_fast_retention(tmp_path):
    # the harmonic mean of the six non-ROUGE numbers, by hand: 6 / (3/0.8 + 3/0.5)
    assert fast_retention(_target_eval(0.8, 0.5)) == pytest.approx(6 / (3 / 0.8 + 3 / 0.5), rel=1e-12)
    space = _space(tmp_path, "floor", retention_floor=0.5)
    # no target evaluation: the floor itself without a preparation (a synthetic trainable's
    # retention is a score in [0, 1]); with one, the missing evaluation is an error
    assert retention_floor(space, tmp_path) == 0.5
    prepared = _space(tmp_path, "floor", retention_floor=0.5, prepare={"enabled": True})
    with pytest.raises(RetentionFloorError, match="target.json does not exist"):
        retention_floor(prepared, tmp_path)
    write_json(runs.reference_eval(tmp_path, "target"), _target_eval())
    # 0.5 × 0.8, not 0.5 × the full retention (0.24, ROUGE included)
    assert retention_floor(space, tmp_path) == pytest.approx(0.4, rel=1e-12)
    assert retention_floor(_space(tmp_path, "nofloor"), tmp_path) is None
    # no floor and dominance off: no stopper at all
    assert make_stopper(_space(tmp_path, "nofloor"), tmp_path) is None


def test_space_checks_the_early_stopping_settings(tmp_path):
    with pytest.raises(ConfigError, match=r"retention_floor: must be a finite number in \(0, 1\]"):
        _space(tmp_path, "bad", retention_floor=0.0)
    with pytest.raises(ConfigError, match="early_stopping.min_step: must be an integer >= 1"):
        _space(tmp_path, "bad", early_stopping={"min_step": 0})
    with pytest.raises(ConfigError, match="early_stopping.dominated: .* unlearn.eval.every is 0"):
        _space(tmp_path, "bad", early_stopping={"dominated": True})
    rules = _space(tmp_path, "ok").early_stopping
    assert (rules.collapse, rules.dominated, rules.min_step, rules.min_completed) == (True, False, 1, 2)


def _completed_trial(sweep_dir, tid, trajectory, status=runs.COMPLETED):
    d = runs.trial_dir(sweep_dir, tid)
    d.mkdir(parents=True)
    (d / runs.TRAJECTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in trajectory))
    write_json(d / runs.RESULT_FILE, {"trial_id": tid, "status": status, "metrics": {}})


def test_stopper_judges_against_completed_trials_on_disk(tmp_path):
    sweep = tmp_path
    write_json(runs.noise_path(sweep), {"removal": 0.05, "retention": 0.02, "replicates": 3})
    assert noise_band(sweep) == (0.05, 0.02)
    _completed_trial(sweep, "a", [{"step": 2, "removal": 0.6, "retention": 0.8},
                                  {"step": 4, "removal": 0.7, "retention": 0.7}])
    _completed_trial(sweep, "b", [{"step": 2, "removal": 0.2, "retention": 0.9}])
    # a stopped trial's points are not part of the front
    _completed_trial(sweep, "c", [{"step": 4, "removal": 0.99, "retention": 0.99}], status=runs.STOPPED)
    rules = EarlyStopping(collapse=False, dominated=True, min_step=1, min_completed=2)
    stopper = TrajectoryStopper(sweep, rules, None, noise_band(sweep), MAX)
    run = runs.trial_dir(sweep, "x")
    run.mkdir(parents=True)
    write_json(run / runs.STATUS_FILE, {"status": runs.RUNNING, "step": 2})
    base = {"trial_id": "x", "family": "wga+kl", "method": "wga(alpha=1)+kl", "hp.wga.alpha": 1.0,
            "status": runs.RUNNING, "error": "", "done": False, "training_iteration": 1, "time_total_s": 9.0}
    # step 4: one completed trial only (c was stopped): not judged, whatever the point
    assert not stopper(("x"), {**base, "step": 4, "removal": 0.1, "retention": 0.1, "time_s": 3.0})
    # step 2: a's (0.6, 0.8) is within the band of (0.57, 0.79) in removal: runs on
    assert not stopper("x", {**base, "step": 2, "removal": 0.57, "retention": 0.79, "time_s": 3.0})
    assert not (run / runs.RESULT_FILE).exists()
    # ... and dominates (0.5, 0.79) beyond it
    assert stopper("x", {**base, "step": 2, "removal": 0.5, "retention": 0.79, "forget.prob": 0.4, "time_s": 3.5})
    res = read_json(run / runs.RESULT_FILE)
    assert res["status"] == runs.STOPPED and res["error"] == ""
    assert res["stop_reason"].startswith("dominated: (removal 0.5, retention 0.79) by a completed trial's (0.6, 0.8)")
    assert res["hp"] == {"wga.alpha": 1.0} and res["time_s"] == 3.5
    assert res["metrics"] == {"step": 2, "removal": 0.5, "retention": 0.79, "forget.prob": 0.4}
    assert read_json(run / runs.STATUS_FILE) == {"status": runs.STOPPED, "step": 2, "stop_reason": res["stop_reason"]}
    # a final result is never judged
    assert not stopper("y", {**base, "trial_id": "y", "status": runs.COMPLETED, "step": 2, "removal": 0.0,
                             "retention": 0.0})


# ---------------------------------------------------------------------------------------------
# a real tiny Ray sweep


def _space(tmp_path, name, **kw):
    data = {
        "name": name, "results": str(tmp_path),
        "families": {"wga+kl": {"wga.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
                                "kl.weight": {"type": "loguniform", "low": 0.1, "high": 10}},
                     "ga": {"ga.weight": {"type": "uniform", "low": 0.5, "high": 2.0}}},
        "num_samples": 6, "max_concurrent": 2, "seed": 0,
        "prepare": {"enabled": False},
        "trainable": "rayunlearn.sweep.synthetic:synthetic_trial",
    }
    data.update(kw)
    return load_space(data=data)


STEPS, EVERY = 10, 2


def _first_collapse(removal, retention, floor, collapse):
    """(step, point) of the first trajectory evaluation under the floor, by hand, or None."""
    for step in range(EVERY, STEPS, EVERY):
        r, u = synthetic_point(removal, retention, step / STEPS, collapse)
        if u < floor:
            return step, (r, u)
    return None


@pytest.mark.ray
def test_collapsing_trials_are_stopped_and_recorded_while_the_others_run_on(tmp_path, ray_local):
    import optuna

    from rayunlearn.sweep.driver import run_sweep

    space = _space(tmp_path, "collapse", retention_floor=0.25, unlearn={"eval": {"every": EVERY}},
                   trainable_options={"steps": STEPS, "step_s": 0.05, "collapse": ["ga"]})
    write_json(runs.reference_eval(tmp_path / "collapse", "target"), _target_eval())   # floor 0.25 × 0.8
    sweep_dir, summary = run_sweep(space)
    assert summary["finished"] == 6 and not summary["interrupted"]
    rows = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    study = {tuple(sorted(t.params.items())): t for t in
             optuna.load_study(study_name="collapse", storage=f"sqlite:///{sweep_dir / 'study.db'}").trials}
    for r in rows:
        if r["family"] == "ga":   # f = the weight's position, h = 1 + 4 (0.5 - 0.3)^2, retention × 5%
            f = (r["hp.ga.weight"] - 0.5) / 1.5
            final = (f, (1 - math.sqrt(f)) / 1.16 * COLLAPSED_RETENTION)
        else:                     # log positions in [0.1, 10]
            f, v = (math.log(r[k] / 0.1) / math.log(100) for k in ("hp.wga.alpha", "hp.kl.weight"))
            final = (f, (1 - math.sqrt(f)) / (1 + 4 * (v - 0.3) ** 2))
        hit = _first_collapse(*final, floor=0.2, collapse=r["family"] == "ga")
        res = read_json(sweep_dir / "trials" / r["trial_id"] / "result.json")
        if hit is not None:
            step, (rem, ret) = hit
            assert r["status"] == res["status"] == "stopped"
            assert r["stop_reason"] == res["stop_reason"] == \
                f"collapse: retention {ret:.4g} < floor 0.2 at step {step}"
            assert (r["step"], r["removal"], r["retention"]) == (step, pytest.approx(rem, abs=1e-12),
                                                                 pytest.approx(ret, abs=1e-12))
            assert 0 < r["time_s"] < 5
            # the trial ran no further than the evaluation it was stopped at
            traj = (sweep_dir / "trials" / r["trial_id"] / "trajectory.jsonl").read_text().splitlines()
            assert json.loads(traj[-1])["step"] == step and not (sweep_dir / "trials" / r["trial_id"] /
                                                                   "metrics.json").exists()
            # Optuna holds it as complete, with the objectives of the evaluation it was stopped at
            key = {"family": r["family"], **{f"{r['family']}:{k[3:]}": r[k] for k in r
                                             if k.startswith("hp.") and r[k] is not None}}
            told = study[tuple(sorted(key.items()))]
            assert told.state == optuna.trial.TrialState.COMPLETE
            assert told.values == pytest.approx([rem, ret], abs=1e-12)
        else:
            assert r["status"] == "completed" and r["stop_reason"] == ""
            assert (r["step"], r["removal"], r["retention"]) == (STEPS, pytest.approx(final[0], abs=1e-12),
                                                                 pytest.approx(final[1], abs=1e-12))
    # MLflow shows a stopped trial as such
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir / 'mlruns.db'}")
    tracked = {run.data.tags["trial_id"]: run for run in
               client.search_runs([client.get_experiment_by_name("collapse").experiment_id])}
    for r in rows:
        run = tracked[r["trial_id"]]
        assert run.data.tags["status"] == r["status"] and run.data.tags["stop_reason"] == r["stop_reason"]
        assert run.info.status == ("KILLED" if r["status"] == "stopped" else "FINISHED")
    statuses = {(r["family"], r["status"]) for r in rows}
    assert ("ga", "stopped") in statuses and any(s == "completed" for _, s in statuses)
    # the front holds completed trials only
    completed = {r["trial_id"] for r in rows if r["status"] == "completed"}
    assert set(read_json(sweep_dir / "pareto.json")["trials"]) <= completed and completed


def test_hypervolume_against_compute_by_hand():
    from rayunlearn.bench.sweep import compute_to_reach, hypervolume_curve

    # trials in the order they finished: (time_s, status, removal, retention)
    trials = [(2.0, "completed", 0.5, 0.5), (1.0, "stopped", 0.9, 0.1), (3.0, "completed", 0.2, 0.9),
              (2.0, "completed", 0.4, 0.4)]
    curve = hypervolume_curve(trials)
    # compute sums every trial's time; hypervolume counts completed trials only
    assert curve == [(2.0, pytest.approx(0.25)), (3.0, pytest.approx(0.25)),
                     (6.0, pytest.approx(0.5 * 0.5 + 0.2 * (0.9 - 0.5))), (8.0, pytest.approx(0.33))]
    # the reference at the retention floor 0.3: only what lies above it counts
    assert hypervolume_curve(trials, ref=(0.0, 0.3))[-1] == (8.0, pytest.approx(0.5 * 0.2 + 0.2 * (0.9 - 0.5)))
    assert compute_to_reach(curve, 0.3) == 6.0 and compute_to_reach(curve, 0.25) == 2.0
    assert compute_to_reach(curve, 0.4) is None
