"""Replicates, the retention floor and the noise floor: seed aggregation on
hand-made values, a synthetic sweep with two seeds per configuration and a floor, the floor's
constraint reaching the Optuna sampler, and the noise floor between retain replicates on
hand-made evaluations."""

import math
import os
import warnings

import pyarrow.parquet as pq
import pytest

from rayunlearn import runs
from rayunlearn.config import ConfigError
from rayunlearn.io import read_json
from rayunlearn.sweep.space import decode, load_space
from rayunlearn.sweep.synthetic import synthetic_objectives
from rayunlearn.sweep.trial import aggregate_seeds, feasible

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

FAMILIES = {"wga+kl": {"wga.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
                       "kl.weight": {"type": "loguniform", "low": 0.1, "high": 10}}}


def _space(tmp_path, name, **kw):
    data = {"name": name, "results": str(tmp_path), "families": FAMILIES, "num_samples": 3, "max_concurrent": 2,
            "seed": 0, "prepare": {"enabled": False}, "trainable": "rayunlearn.sweep.synthetic:synthetic_trial"}
    data.update(kw)
    return load_space(data=data)


# ----------------------------------------------------------------------------- replicate aggregation


def test_aggregate_seeds_means_sds_and_per_seed_columns():
    seeds = [{"removal": 0.2, "retention": 0.9, "forget.prob": 0.5, "time.steps": 3.0, "removal_kind": "tr_closeness"},
             {"removal": 0.4, "retention": 0.7, "forget.prob": 0.1, "time.steps": 5.0, "removal_kind": "tr_closeness"},
             {"removal": 0.9, "retention": 0.8, "forget.prob": 0.3, "time.steps": 1.0, "removal_kind": "tr_closeness"}]
    out = aggregate_seeds(seeds)
    assert out["removal"] == pytest.approx(0.5, abs=1e-15) and out["retention"] == pytest.approx(0.8, abs=1e-15)
    # sample sd: removal deviations −0.3, −0.1, 0.4 -> sqrt((0.09 + 0.01 + 0.16) / 2)
    assert out["removal_sd"] == pytest.approx(math.sqrt(0.13), rel=1e-12)
    assert out["retention_sd"] == pytest.approx(0.1, rel=1e-12)
    assert out["forget.prob"] == pytest.approx(0.3, abs=1e-15)
    assert out["time.steps"] == 9.0                                   # the trial's time: the sum
    assert out["removal_kind"] == "tr_closeness" and out["n_seeds"] == 3
    assert out["seed0.removal"] == 0.2 and out["seed1.retention"] == 0.7 and out["seed2.forget.prob"] == 0.3
    # one seed: its own values, no spread, no per-seed copies
    one = aggregate_seeds([seeds[0]])
    assert one["removal"] == 0.2 and math.isnan(one["removal_sd"]) and one["n_seeds"] == 1
    assert not any(k.startswith("seed0.") for k in one)
    # a seed without an objective (it failed) makes the mean NaN
    failed = aggregate_seeds([seeds[0], {"removal": math.nan, "retention": math.nan}])
    assert math.isnan(failed["removal"]) and failed["n_seeds"] == 2 and failed["forget.prob"] == 0.5


def test_feasible():
    assert feasible(0.5, None) is None
    assert feasible(0.5, 0.5) is True and feasible(0.49, 0.5) is False and feasible(math.nan, 0.5) is False


@pytest.mark.parametrize("key,value,match", [
    ("seeds", 0, "seeds"), ("seeds", 1.5, "seeds"), ("retention_floor", 0.0, "retention_floor"),
    ("retention_floor", 1.2, "retention_floor"), ("prepare", {"enabled": False, "retain_replicates": 2},
                                                  "retain_replicates"),
])
def test_settings_are_domain_checked(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        _space(tmp_path, "bad", **{key: value})


def test_retain_replicates_share_the_preparation(tmp_path):
    base = {"prepare": {"enabled": True}, "trainable": "rayunlearn.train:unlearn_trial"}
    one = _space(tmp_path, "a", **base)
    two = _space(tmp_path, "a", **{**base, "prepare": {"enabled": True, "retain_replicates": 2}})
    assert two.prepare.retain_replicates == 2 and one.prepare_key() == two.prepare_key()
    with pytest.raises(ConfigError, match="retain_replicates"):
        _space(tmp_path, "a", **{**base, "prepare": {"retain_replicates": 0}})
    with pytest.raises(ConfigError, match="reference_eval"):
        _space(tmp_path, "a", **{**base, "prepare": {"reference_eval": False}, "retention_floor": 0.9,
                                 "unlearn": {"eval": {"removal_score": "prob_removal"}}})


# ----------------------------------------------------------------------------- the floor reaches the sampler


def _drive(space, threshold, n):
    """Ask and tell the sweep's searcher ``n`` times on the synthetic objectives (no Ray): which
    trials missed the floor, in order, and the searcher's Optuna study."""
    from rayunlearn.sweep.tuner import make_search_alg

    searcher = make_search_alg(space, None, retention_threshold=threshold).searcher
    missed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            family, hp = decode(space, searcher.suggest(f"t{i}"))
            fam = space.parsed_families[family]
            removal, retention = synthetic_objectives(fam.unit(hp), fam.retain_keys(hp))
            searcher.on_trial_complete(f"t{i}", {"removal": removal, "retention": retention})
            missed.append(retention < 0.4)
    return missed, searcher._ot_study


def test_the_floor_reaches_the_sampler_and_steers_it_away(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = _space(tmp_path, "floor", num_samples=30)
    free, _ = _drive(space, None, 30)
    floored, study = _drive(space, 0.4, 30)
    # every trial carries its constraint, threshold − retention, where the sampler reads it
    for t in study.trials:
        assert t.system_attrs["constraints"] == (pytest.approx(0.4 - t.values[1], abs=1e-12),)
    # the first 10 are TPE's random start-up trials (the same draws); after them the sampler
    # without the floor keeps proposing configurations below it, the constrained one mostly not
    assert free[:10] == floored[:10]
    assert sum(free[10:]) >= 12 and sum(floored[10:]) <= 6


# ----------------------------------------------------------------------------- a sweep with seeds and a floor


@pytest.mark.ray
def test_sweep_with_two_seeds_and_a_floor(tmp_path, ray_local):
    import optuna

    from rayunlearn.sweep.driver import run_sweep

    space = _space(tmp_path, "seeds", num_samples=3, seeds=2, retention_floor=0.4,
                   trainable_options={"seed_jitter": 0.1})
    sweep_dir, summary = run_sweep(space)
    rows = pq.read_table(sweep_dir / runs.TRIALS_TABLE_FILE).to_pylist()
    assert summary["finished"] == 3 and len(rows) == 3
    for row in rows:
        tid = row["trial_id"]
        point = read_json(runs.trial_dir(sweep_dir, tid) / runs.TRIAL_FILE)
        fam = space.parsed_families[point["family"]]
        removal, retention = synthetic_objectives(fam.unit(point["hp"]), fam.retain_keys(point["hp"]))
        # seed j unlearns with train.seed = j: removal + 0.1 j, retention − 0.1 j
        assert row["seed0.removal"] == pytest.approx(removal, abs=1e-12)
        assert row["seed1.removal"] == pytest.approx(removal + 0.1, abs=1e-12)
        assert row["seed1.retention"] == pytest.approx(retention - 0.1, abs=1e-12)
        assert row["removal"] == pytest.approx(removal + 0.05, abs=1e-12)
        assert row["retention"] == pytest.approx(retention - 0.05, abs=1e-12)
        assert row["removal_sd"] == pytest.approx(0.1 / math.sqrt(2), rel=1e-9)
        assert row["retention_sd"] == pytest.approx(0.1 / math.sqrt(2), rel=1e-9)
        assert row["n_seeds"] == 2 and row["status"] == runs.COMPLETED
        assert row["feasible"] is (retention - 0.05 >= 0.4)
        # seed 0 where a one-seed trial's run is, seed 1 beside it (runs.seed_run_id)
        seed1 = runs.run_dir(sweep_dir, runs.seed_run_id(tid, 1))
        assert seed1 == runs.trial_dir(sweep_dir, tid) / "seed1"
        assert read_json(seed1 / runs.METRICS_FILE)["removal"] == pytest.approx(removal + 0.1, abs=1e-12)
        assert read_json(runs.trial_dir(sweep_dir, tid) / runs.METRICS_FILE)["removal"] == pytest.approx(removal)
    # Optuna saw one configuration with one value per trial: the means, and its constraint
    study = optuna.load_study(study_name="seeds", storage=f"sqlite:///{sweep_dir / runs.STUDY_FILE}")
    by_values = {(round(t.values[0], 9), round(t.values[1], 9)): t for t in study.trials}
    for row in rows:
        t = by_values[(round(row["removal"], 9), round(row["retention"], 9))]
        assert t.system_attrs["constraints"][0] == pytest.approx(0.4 - row["retention"], abs=1e-12)


# ----------------------------------------------------------------------------- the noise floor


def _evaluation(rng, shift_tr: float = 1.0, retain_loss: float = 1.0):
    """A hand-made stored evaluation: 6 authors x 4 forget items; every forget truth ratio times
    ``shift_tr``, the retain split's answer losses times ``retain_loss``."""
    import numpy as np

    from rayunlearn.eval import metrics as M

    def split(n):
        return {"avg_gt_loss": np.linspace(0.5, 2.0, n).tolist(), "avg_paraphrased_loss": np.linspace(1.0, 1.5, n).tolist(),
                "average_perturb_loss": np.tile([1.2, 1.4, 1.9], (n, 1)).tolist()}

    raw = {key: split(8) for key in ("retain", "real_authors", "world_facts")}
    raw["retain"]["avg_gt_loss"] = [v * retain_loss for v in raw["retain"]["avg_gt_loss"]]
    for key in ("retain", "real_authors", "world_facts"):
        raw[key]["truth_ratio"] = M.truth_ratios(raw[key]["avg_paraphrased_loss"], raw[key]["average_perturb_loss"]).tolist()
    f = split(24)
    f["truth_ratio"] = (rng.uniform(0.2, 2.0, 24) * shift_tr).tolist()
    f["extraction_strength"] = np.linspace(0.1, 0.9, 24).tolist()
    f["exact_memorization"] = np.linspace(0.1, 0.9, 24).tolist()
    f["author"] = [f"a{i // 4}" for i in range(24)]
    raw["forget"] = f
    return {"raw": raw, "fingerprint": {}}


def test_noise_floor_between_hand_made_replicates():
    import numpy as np

    from rayunlearn.config import EvalConfig
    from rayunlearn.eval.evaluate import metrics_from_raw
    from rayunlearn.sweep.prepare import noise_floor

    # three retain replicates: the same forget truth ratios times 1, 2 and 4 (log R shifted by
    # 0, ln 2, ln 4: W1 = ln 2 or ln 4 between two, so tr_closeness 1/2 or 1/4 against 1 for
    # itself); replicate 1 also has larger retain-split losses (a lower model utility)
    reps = [_evaluation(np.random.default_rng(0), s, loss) for s, loss in ((1, 1.0), (2, 1.3), (4, 1.0))]
    cfg = EvalConfig(removal_score="tr_closeness", selection_fraction=0.5, selection_seed=0)
    noise = noise_floor(reps, None, cfg)
    assert noise["replicates"] == 3 and noise["pairs"] == 6 and noise["removal_kind"] == "tr_closeness"
    # |closeness − 1| over the ordered pairs: (1,0) (0,1) (2,1) (1,2) 1/2 each, (2,0) (0,2) 3/4 each
    assert noise["removal"] == pytest.approx((4 * 0.5 + 2 * 0.75) / 6, rel=1e-12)
    assert noise["scores"]["removal"]["max"] == pytest.approx(0.75, rel=1e-12)
    assert noise["scores"]["report.tr_closeness"]["half_width"] == pytest.approx(noise["removal"], rel=1e-12)
    assert noise["scores"]["selection.ks_closeness"]["half_width"] > 0
    # retention (model utility) does not depend on the reference: |MU_i − MU_j| over the pairs
    mu = [metrics_from_raw(r["raw"], {}, removal_score="prob_removal")["retention"] for r in reps]
    assert mu[0] == mu[2] and mu[1] < mu[0]
    assert noise["retention"] == pytest.approx(4 * abs(mu[1] - mu[0]) / 6, rel=1e-12)
    assert noise["scores"]["retention"]["max"] == pytest.approx(abs(mu[1] - mu[0]), rel=1e-12)
    # identical replicates: no noise in any score
    same = noise_floor([reps[0], reps[0]], None, cfg)
    assert all(v["half_width"] == 0.0 for v in same["scores"].values())


# ----------------------------------------------------------------------------- the front the report draws


def test_front_data_and_figure_on_hand_made_trials(tmp_path):
    import pandas as pd

    from rayunlearn.report.analysis import front_data, front_in_words
    from rayunlearn.report.data import Collection
    from rayunlearn.report.figures import pareto_figure

    trials = pd.DataFrame([
        # a and b are within the band of each other (0.03 < 0.05, 0.01 < 0.02): both kept
        {"trial_id": "a", "removal": 0.50, "retention": 0.60, "feasible": True},
        {"trial_id": "b", "removal": 0.53, "retention": 0.61, "feasible": True},
        # c: better in removal beyond the band, worse in retention beyond it: a real trade-off
        {"trial_id": "c", "removal": 0.90, "retention": 0.50, "feasible": True},
        # d: the best removal, but below the retention floor: off both fronts
        {"trial_id": "d", "removal": 0.99, "retention": 0.30, "feasible": False},
        # e: dominated beyond the band by b
        {"trial_id": "e", "removal": 0.20, "retention": 0.40, "feasible": True},
    ]).assign(family="wga+kl", method=lambda t: "wga+kl#" + t["trial_id"], status="completed",
              removal_sd=0.01, retention_sd=0.005, n_seeds=2.0, **{"hp.wga.alpha": 1.5})
    coll = Collection(name="sweep", path=tmp_path, trials=trials,
                      reference={"target": {"removal": 0.05, "retention": 0.625}},
                      noise={"removal": 0.05, "retention": 0.02, "replicates": 2, "removal_kind": "tr_closeness"},
                      space={"retention_floor": 0.8})
    data = front_data(coll)
    by_id = {p["trial_id"]: p for p in data["points"]}
    assert {t for t, p in by_id.items() if p["on_front"]} == {"b", "c"}
    assert {t for t, p in by_id.items() if p["on_noise_front"]} == {"a", "b", "c"}
    assert data["floor"] == {"fraction": 0.8, "retention": pytest.approx(0.5, abs=1e-15)}
    assert data["band"] == {"removal": 0.05, "retention": 0.02, "replicates": 2, "removal_kind": "tr_closeness"}
    assert by_id["d"]["feasible"] is False and by_id["a"]["removal_sd"] == 0.01 and by_id["a"]["n_seeds"] == 2
    assert by_id["a"]["hps"] == {"wga.alpha": 1.5}
    words = " ".join(front_in_words(data))
    assert "1 of 5 trials miss it" in words
    assert "removal +0.03 (within noise), retention +0.01 (within noise)" in words     # a -> b
    assert "removal +0.37 (real), retention -0.11 (real)" in words                      # b -> c
    # without a measured band nothing is called real
    assert "no difference between trials can be called real" in " ".join(front_in_words({**data, "band": None}))
    pts = pd.DataFrame([{k: p[k] for k in ("trial_id", "family", "removal", "retention", "removal_sd", "retention_sd",
                                            "feasible", "label")} for p in data["points"]])
    out = pareto_figure(pts, {"b", "c"}, {}, coll.reference, "front", tmp_path / "front.png", band=data["band"],
                        floor=data["floor"], noise_front_ids={"a", "b", "c"})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_json_keeps_feasible_trials_and_the_front_beyond_the_noise(tmp_path):
    from rayunlearn.sweep.tables import pareto_json

    space = _space(tmp_path, "p", retention_floor=0.5)
    rows = [{"trial_id": "a", "status": "completed", "removal": 0.50, "retention": 0.60, "feasible": True, "method": "m"},
            {"trial_id": "b", "status": "completed", "removal": 0.53, "retention": 0.61, "feasible": True, "method": "m"},
            {"trial_id": "d", "status": "completed", "removal": 0.99, "retention": 0.30, "feasible": False, "method": "m"},
            {"trial_id": "f", "status": "failed", "removal": math.nan, "retention": math.nan, "feasible": None,
             "method": "m"}]
    out = pareto_json(space, rows, {"removal": 0.05, "retention": 0.02})
    assert out["trials"] == ["b"] and out["noise_trials"] == ["a", "b"] and out["noise_band"] == [0.05, 0.02]
    assert out["num_completed"] == 3 and out["num_infeasible"] == 1 and out["num_trials"] == 4
    assert out["hypervolume"] == pytest.approx(0.53 * 0.61, rel=1e-12)
    assert "noise_trials" not in pareto_json(space, rows)


def test_a_collection_finds_the_noise_floor_of_its_preparation(tmp_path):
    import shutil
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from fake_results import make_fake_results

    from rayunlearn.io import write_json
    from rayunlearn.report.data import ReportDataError, discover

    root = make_fake_results(tmp_path / "r", sweep=False)
    ref = runs.reference_eval(runs.prepared_dir(root, "abc"), "retain")
    ref.parent.mkdir(parents=True)
    write_json(runs.noise_path(runs.prepared_dir(root, "abc")), {"removal": 0.04, "retention": 0.01, "replicates": 2})
    write_json(ref, {"removal": 1.0, "retention": 0.1})           # another preparation's retain model
    assert discover(root)[0].noise is None
    shutil.copyfile(runs.reference_eval(root / "study", "retain"), ref)   # this collection's
    assert discover(root)[0].noise == {"removal": 0.04, "retention": 0.01, "replicates": 2}
    write_json(runs.noise_path(runs.prepared_dir(root, "abc")), {"removal": -1, "retention": 0.01})
    with pytest.raises(ReportDataError, match="half-width"):
        discover(root)
