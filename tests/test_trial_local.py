"""A study run where Ray is not installed (docs/results/smollm2-gpu/run_study.py on the GPU
machine): ``rayunlearn.sweep.trial.run_trial`` (the sweep trial's body) and the G-effect sink of
a run without an aggregator import no Ray, and the trials table the sweep writes reads them."""

import math
import sys

import pyarrow.parquet as pq

from rayunlearn import runs
from rayunlearn.config import EffectsConfig, to_dict
from rayunlearn.sweep.space import decode, load_space
from rayunlearn.sweep.tables import write_tables
from rayunlearn.sweep.trial import TrialContext, run_trial


def test_grid_trials_run_in_process_without_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` now raises ImportError
    space = load_space(data={
        "name": "local", "results": str(tmp_path), "sampler": "grid", "families": {"ga": {}, "ga+kl": {}},
        "prepare": {"enabled": False}, "trainable": "rayunlearn.sweep.synthetic:synthetic_trial"})
    sweep_dir = space.sweep_dir()
    ctx = TrialContext(space=to_dict(space), sweep_dir=str(sweep_dir), target="", data=None,
                       retain_reference=None, aggregator=None)
    reported = []
    for i, family in enumerate(space.families):
        name, hp = decode(space, {"family": family})
        run_trial(space, ctx, f"t{i}", name, hp, report_to=reported.append)
    summary = write_tables(space, sweep_dir)
    rows = {r["trial_id"]: r for r in pq.read_table(sweep_dir / runs.TRIALS_TABLE_FILE).to_pylist()}
    # no searched hyper-parameter: the synthetic objectives at positions 0.5 on both sides,
    # removal 0.5 and retention (1 - sqrt(0.5)) / (1 + 4 * 0.2**2) = 0.29289322 / 1.16 = 0.25249415
    assert summary["counts"] == {runs.COMPLETED: 2}
    assert [rows[t]["family"] for t in ("t0", "t1")] == ["ga", "ga+kl"]
    for r in rows.values():
        assert r["status"] == runs.COMPLETED
        assert math.isclose(r["removal"], 0.5, rel_tol=1e-12)
        assert math.isclose(r["retention"], (1 - math.sqrt(0.5)) / 1.16, rel_tol=1e-12)
    assert [r["status"] for r in reported] == [runs.COMPLETED, runs.COMPLETED]
    assert [r["trial_id"] for r in reported] == ["t0", "t1"]


def test_local_effects_sink_needs_no_ray(tmp_path, monkeypatch):
    from rayunlearn.effects.actor import LocalSink
    from rayunlearn.effects.recorder import default_sink

    monkeypatch.setitem(sys.modules, "ray", None)
    assert isinstance(default_sink(EffectsConfig(), tmp_path), LocalSink)
