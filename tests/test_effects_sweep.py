"""Live G-effects of sweep trials go through the per-sweep aggregator Ray actor.

A real (tiny) unlearning run with ``effects.aggregator=<name>`` must write exactly the rows the
same run writes in-process through a LocalSink, under ``<out>/effects/<trial_id>/``; a trial that
crashes after a checkpoint and is resumed must neither duplicate nor lose rows; resume and sink
selection at the unit level."""

import math
import os

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_unlearn import MODEL, _data, target  # noqa: F401  (target: the tiny target-model fixture)

from rayunlearn import UserError
from rayunlearn.config import EffectsConfig, UnlearnConfig, from_dict
from rayunlearn.effects import rows as R
from rayunlearn.effects.actor import LocalSink
from rayunlearn.effects.recorder import default_sink

TRIAL = "trial0"
TABLES = ("geffects", "steps")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


def _cfg(target, out, aggregator=None) -> UnlearnConfig:
    root, tgt = target
    return from_dict(UnlearnConfig, {
        "method": "ga+gd", "target": tgt, "out": str(out), "trial_id": TRIAL, "data": _data(root),
        "model": MODEL, "evaluate": False,
        "train": {"batch_size": 8, "micro_batch_size": 4, "lr": 5e-3, "warmup_epochs": 0, "max_steps": 3,
                  "checkpoint_every": 2, "progress": False, "seed": 0},
        "effects": {"every": 1, "probe_size": 4, "aggregator": aggregator}})


def _tables(out) -> dict:
    """{table: rows as a list of tuples sorted by every column} (row order is not part of the contract)."""
    res = {}
    for t in TABLES:
        d = pq.read_table(out / "effects" / TRIAL / f"{t}.parquet").to_pydict()
        cols = list(d)
        rows = list(zip(*(d[c] for c in cols)))
        res[t] = (cols, sorted(rows, key=lambda r: tuple((1, "") if isinstance(x, float) and math.isnan(x)
                                                         else (0, x) for x in r)))
    return res


def _assert_same(a: dict, b: dict, rtol: float = 0.0) -> None:
    for t in TABLES:
        (ca, ra), (cb, rb) = a[t], b[t]
        assert ca == cb and len(ra) == len(rb), t
        for x, y in zip(ra, rb):
            for c, u, v in zip(ca, x, y):
                if isinstance(u, float):
                    assert (math.isnan(u) and math.isnan(v)) or u == pytest.approx(v, rel=rtol, abs=1e-12 if rtol else 0), (t, c)
                else:
                    assert u == v, (t, c)


# ----------------------------------------------------------------------------------- unit level


def _send_steps(sink, trial, steps, scale=1.0):
    for s in steps:
        rb = R.RowBuilder(trial, "ga", s)
        rb.add("removal", "total", -scale * (s + 1))
        sink.add("geffects", rb.cols, trial_id=trial, step=s, part="exact")
        sink.add("steps", R.step_row(trial, "ga", s, lr=0.1, removal=-scale * (s + 1),
                                     cumulative_removal=-0.1 * scale * sum(range(1, s + 2))),
                 trial_id=trial, step=s, part="exact")


def test_resume_keeps_earlier_steps_from_disk_and_replaces_later_ones(tmp_path):
    a = LocalSink(tmp_path)
    _send_steps(a, "t", range(4))
    _send_steps(a, "u", range(2))
    a.close()
    # a fresh process (or a restarted sweep's new actor) resumes trial t at step 2
    b = LocalSink(tmp_path)
    last = b.resume("t", 2)
    assert last["step"] == 1 and last["cumulative_removal"] == pytest.approx(-0.3)
    _send_steps(b, "t", range(2, 4), scale=10.0)        # the re-sent steps replace the old ones
    _send_steps(b, "t", range(2, 4), scale=99.0)        # a duplicate within the attempt is ignored
    b.close()
    g = pq.read_table(tmp_path / "effects/t/geffects.parquet").to_pydict()
    assert g["step"] == [0, 1, 2, 3] and g["value"] == [-1.0, -2.0, -30.0, -40.0]
    s = pq.read_table(tmp_path / "effects/t/steps.parquet").to_pydict()
    assert s["step"] == [0, 1, 2, 3]
    assert pq.read_table(tmp_path / "effects/u/steps.parquet").to_pydict()["step"] == [0, 1]
    # in memory (the same actor across attempts): resume at 0 drops the trial, the file is emptied
    assert b.resume("t", 0) is None
    b.flush()
    assert pq.read_table(tmp_path / "effects/t/geffects.parquet").num_rows == 0
    assert pq.read_table(tmp_path / "effects/u/geffects.parquet").num_rows == 2


def test_recorder_resume_continues_cumulative_sums(tmp_path):
    import torch

    from rayunlearn.effects.recorder import Recorder

    sink = LocalSink(tmp_path)
    _send_steps(sink, "t", range(3))
    model = torch.nn.Linear(2, 2)
    rec = Recorder(EffectsConfig(every=1), model, "ga", None, None, None, None, sink, "t")
    rec.resume(2)
    assert rec.cum["removal"] == pytest.approx(-0.1 * (1 + 2)) and rec.cum["removal_realised"] == 0.0


def test_sink_selection_without_ray(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("needs a process without Ray")
    assert isinstance(default_sink(EffectsConfig(), tmp_path), LocalSink)
    with pytest.raises(UserError, match="effects.aggregator='agg'.*Ray is not running"):
        default_sink(EffectsConfig(aggregator="agg"), tmp_path)


def test_trial_config_names_the_sweep_aggregator(tmp_path):
    from rayunlearn.sweep.space import load_space
    from rayunlearn.sweep.trial import TrialContext, trial_config
    from rayunlearn.sweep.tuner import aggregator_name

    space = load_space("tiny", [f"results={tmp_path}"])
    ctx = TrialContext(space={}, sweep_dir=str(tmp_path), target="t", data=None, retain_reference=None,
                       aggregator="agg-1")
    cfg = trial_config(space, ctx, "tr1", "ga")
    assert cfg.effects.aggregator == "agg-1" and cfg.out == str(tmp_path)
    # the actor name does not depend on the process (Python salts str hashes per process), so a
    # resumed sweep gives its trials the same effects.aggregator
    import subprocess
    import sys

    code = ("from pathlib import Path; from rayunlearn.sweep.tuner import aggregator_name; "
            "from rayunlearn.sweep.space import load_space; "
            f"print(aggregator_name(load_space('tiny'), Path({str(tmp_path)!r})))")
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
    assert other == aggregator_name(space, tmp_path) and other.startswith("rayunlearn-geffects-tiny-")
    assert aggregator_name(space, tmp_path / "other") != other


# ------------------------------------------------------------------ real runs (Ray last)


@pytest.fixture(scope="module")
def local_run(target, tmp_path_factory):
    """The oracle: the same run in-process, G-effects through a LocalSink (no Ray)."""
    from rayunlearn.train import unlearn

    out = tmp_path_factory.mktemp("local")
    unlearn(_cfg(target, out))
    return out, _tables(out)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_local_run_writes_one_row_per_recorded_step(local_run):
    out, tabs = local_run
    cols, rows = tabs["steps"]
    steps = [r[cols.index("step")] for r in rows]
    assert steps == [0, 1, 2, 3]                    # every=1, 3 optimiser steps + the final weights
    cols, rows = tabs["geffects"]
    assert {r[cols.index("step")] for r in rows} == {0, 1, 2, 3}
    assert not (out / "trials" / TRIAL / "effects").exists()


def test_actor_writes_exactly_the_local_sink_tables(target, local_run, ray_local, tmp_path):
    from rayunlearn.effects.actor import make_aggregator
    from rayunlearn.train import unlearn

    name = "test-geffects-agg"
    actor = make_aggregator(str(tmp_path), name=name)
    unlearn(_cfg(target, tmp_path, aggregator=name))
    written = ray_local.get(actor.close.remote())        # what the sweep driver does at the end
    assert written == []                                 # the trial's close already wrote everything
    _assert_same(_tables(tmp_path), local_run[1])
    # the rows really came through the actor (not a fallback LocalSink)
    n = sum(len(local_run[1][t][1]) for t in TABLES)
    assert ray_local.get(actor.stats.remote()) == {"rows": n, "ignored": 0, "pending": 0}
    assert not (tmp_path / "trials" / TRIAL / "effects").exists()
    ray_local.kill(actor)


def test_resumed_trial_replaces_rows_through_the_actor(target, local_run, ray_local, tmp_path, monkeypatch):
    """Crash after the checkpoint at step 2, once the actor holds step 2's rows plus two bogus
    rows (a later step's key sent early, an extra part of step 2); rerun: the run resumes at
    step 2 and the tables equal the uninterrupted run's (re-sent steps replace the crashed
    attempt's rows, no duplicates, nothing lost, cumulative sums continued)."""
    from rayunlearn import train as T
    from rayunlearn.train.callbacks import UnlearnCallbacks
    from rayunlearn.effects.actor import make_aggregator

    name = "test-geffects-agg-resume"
    actor = make_aggregator(str(tmp_path), name=name)
    orig = UnlearnCallbacks.after_step

    def crash(self, step):
        if step == 3:
            sink = self.recorder.sink
            bogus = R.RowBuilder(TRIAL, "bogus", 3)
            bogus.add("removal", "total", 1e9)
            sink.add("geffects", bogus.cols, trial_id=TRIAL, step=3, part="exact")
            sink.add("steps", R.step_row(TRIAL, "bogus", 2, removal=1e9), trial_id=TRIAL, step=2, part="bogus")
            sink._drain()                  # what the attempt sent has reached the actor
            raise RuntimeError("simulated worker crash")
        return orig(self, step)

    monkeypatch.setattr(UnlearnCallbacks, "after_step", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        T.unlearn(_cfg(target, tmp_path, aggregator=name))
    path = tmp_path / "effects" / TRIAL / "steps.parquet"
    assert pq.read_table(path).to_pydict()["step"] == [0, 1]      # the checkpoint flush at step 2
    ray_local.get(actor.flush.remote())                           # e.g. a periodic flush
    assert pq.read_table(path).to_pydict()["step"] == [0, 1, 2, 2]
    monkeypatch.setattr(UnlearnCallbacks, "after_step", orig)
    T.unlearn(_cfg(target, tmp_path, aggregator=name))             # resumes from checkpoints/step-2
    ray_local.get(actor.close.remote())
    _assert_same(_tables(tmp_path), local_run[1], rtol=1e-6)
    ray_local.kill(actor)
