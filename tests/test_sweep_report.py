"""The real writers feed the report: a tiny real sweep (the shipped ``tiny`` space: preparation,
real unlearning trials, live G-effects through the sweep's aggregator actor, the tables) writes a
results directory, and the report reads back exactly what the writers wrote — no hand-made
fakes between them."""

import math
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from rayunlearn import runs
from rayunlearn.io import read_json
from rayunlearn.sweep.space import load_space

pytestmark = [pytest.mark.ray, pytest.mark.slow]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """(results root, sweep dir, trials.parquet as a frame) of a 2-trial real sweep."""
    ray = pytest.importorskip("ray")
    from rich.console import Console

    from rayunlearn.sweep.driver import run_sweep

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    root = tmp_path_factory.mktemp("results")
    # the shipped CI space with one epoch per preparation stage (the numbers only have to exist)
    space = load_space("tiny", [f"results={root}", "num_samples=2", "prepare.base.epochs=1",
                                "prepare.target.epochs=1", "prepare.retain.epochs=1"])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sweep_dir, summary = run_sweep(space, console=Console(quiet=True))
    finally:
        if started:
            ray.shutdown()
    assert summary["finished"] == 2 and not summary["interrupted"]
    return root, sweep_dir, pq.read_table(sweep_dir / runs.TRIALS_TABLE_FILE).to_pandas()


def test_written_layout_follows_runs(swept):
    _, sweep_dir, table = swept
    assert list(table.columns[:7]) == list(runs.TRIALS_FIXED_COLUMNS[:7])
    assert set(runs.TRIALS_FIXED_COLUMNS) <= set(table.columns)
    assert set(table["status"]) <= set(runs.STATUSES)
    assert (table["status"] == runs.COMPLETED).all()      # two ordinary trials: both complete
    for tid in table["trial_id"]:
        tdir = runs.trial_dir(sweep_dir, tid)
        for name in (runs.TRIAL_FILE, runs.ATTEMPTS_FILE, runs.RESULT_FILE, runs.METRICS_FILE,
                     runs.CONFIG_FILE, runs.STATUS_FILE):
            assert (tdir / name).exists(), name
        for t in runs.EFFECT_TABLES:
            written = pq.read_schema(runs.effects_table(sweep_dir, tid, t))
            assert written.names == runs.EFFECT_SCHEMAS[t].names, t


def test_report_reads_what_the_sweep_wrote(swept, tmp_path):
    from rayunlearn.report import build_report
    from rayunlearn.report.analysis import TABLE_COLUMNS, cumulative_effects, results_table
    from rayunlearn.report.data import discover

    root, sweep_dir, table = swept
    [coll] = discover(root)                     # prepared/ holds no trials table: one collection
    assert coll.path == sweep_dir
    pd.testing.assert_frame_equal(coll.trials, table)
    done = table[(table["status"] == runs.COMPLETED) & np.isfinite(table["removal"])
                 & np.isfinite(table["retention"])]
    assert list(coll.completed["trial_id"]) == list(done["trial_id"]) and len(done) == 2
    assert set(coll.reference) == {"target", "retain"}
    assert coll.reference["retain"] == read_json(runs.reference_eval(sweep_dir, "retain"))

    rows = results_table(coll).set_index("trial_id")
    for _, t in table.iterrows():
        row = rows.loc[t["trial_id"]]
        assert (row["removal"], row["retention"]) == (t["removal"], t["retention"])
        shared = [key for key, _, _ in TABLE_COLUMNS if key in table.columns and key != "ks_n"]
        assert "forget.prob" in shared and "model_utility" in shared and "removal_report" in shared
        # removal = the default score on the selection authors, removal_report on the held-out ones
        assert t["removal_kind"] == "tr_closeness"
        assert (t["removal"], t["removal_report"]) == (t["selection.tr_closeness"], t["report.tr_closeness"])
        assert t["selection.n_items"] > 0 and t["report.n_items"] > 0
        for key in shared:           # metrics.json (what the report reads) = the table's value
            assert row[key] == t[key] or (math.isnan(row[key]) and math.isnan(t[key])), key
        steps = pq.read_table(runs.effects_table(sweep_dir, t["trial_id"], "steps")).to_pandas()
        assert len(steps) > 0
        expected = float((steps["lr"] * steps["removal"]).sum())
        assert row["cum_lr_removal"] == pytest.approx(expected, rel=1e-12)
        assert cumulative_effects(steps)["sum_retention"] == row["sum_retention"]

    build_report(root, tmp_path / "report")
    summary = read_json(tmp_path / "report" / "summary.json")
    [c] = summary["collections"]
    assert c["trials"] == 2 and c["completed"] == 2
    assert c["pareto"] == sorted(read_json(sweep_dir / runs.PARETO_FILE)["trials"])
    assert c["pareto_json_agrees"] is True
