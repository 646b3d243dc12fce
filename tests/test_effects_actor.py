"""G-effect sinks: LocalSink and the Ray aggregator actor write identical Parquet files holding
exactly the rows sent; rank partial sums are combined exactly once; the recorder's rows."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import perturbed_copy
from test_effects_support import effects_llama, forget_retain_batches

from rayunlearn.config import EffectsConfig
from rayunlearn.effects import gradient_effects
from rayunlearn.effects.actor import LocalSink
from rayunlearn.effects.recorder import make_recorder
from rayunlearn.effects.rows import GEFFECT_SCHEMA, result_rows, step_row
from rayunlearn.runs import INSTANCE_GA_KIND, INSTANCE_WEIGHT_KIND


def _sends(res):
    """A scripted sequence of sends: two trials, a 2-rank batch with a duplicate retry, a late
    duplicate of a finished batch, and steps rows."""
    rows0 = result_rows(res, "t0", "npo+kl", 0)
    rows5 = result_rows(res, "t0", "npo+kl", 5)
    half = {k: list(v) for k, v in rows5.items()}
    half["value"] = [v / 2 for v in half["value"]]
    other = {k: list(v) for k, v in result_rows(res, "t1", "ga", 0).items()}
    return [
        ("geffects", rows0, dict(trial_id="t0", step=0, part="exact")),
        ("geffects", half, dict(trial_id="t0", step=5, part="exact", rank=1, world_size=2)),
        ("geffects", half, dict(trial_id="t0", step=5, part="exact", rank=1, world_size=2)),  # retry
        ("geffects", other, dict(trial_id="t1", step=0, part="exact")),
        ("geffects", half, dict(trial_id="t0", step=5, part="exact", rank=0, world_size=2)),
        ("geffects", half, dict(trial_id="t0", step=5, part="exact", rank=0, world_size=2)),  # late dup
        ("steps", step_row("t0", "npo+kl", 0, lr=1e-3, removal=res.removal.total), dict(trial_id="t0", step=0)),
        ("geffects", rows0, dict(trial_id="t0", step=0, part="exact")),                      # dup
    ], rows0, rows5


@pytest.fixture(scope="module")
def result():
    model = effects_llama(layers=2, kv_heads=2)
    forget, retain = forget_retain_batches()
    return gradient_effects(model, "npo+kl", forget, retain, reference=perturbed_copy(model))


def test_local_sink_and_ray_actor_write_identical_exact_rows(tmp_path, result):
    ray = pytest.importorskip("ray")
    sends, rows0, rows5 = _sends(result)
    local = LocalSink(tmp_path / "local")
    for table, cols, kw in sends:
        local.add(table, cols, **kw)
    local.close()
    assert local.stats()["ignored"] == 3

    from rayunlearn.effects.actor import RaySink, make_aggregator

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sink = RaySink(make_aggregator(str(tmp_path / "ray")), max_in_flight=2)
        for table, cols, kw in sends:
            sink.add(table, cols, **kw)
        sink.close()
        assert sink.stats()["ignored"] == 3
    finally:
        ray.shutdown()

    for rel in ("effects/t0/geffects.parquet", "effects/t0/steps.parquet", "effects/t1/geffects.parquet"):
        a = pq.read_table(tmp_path / "local" / rel)
        b = pq.read_table(tmp_path / "ray" / rel)
        assert a.schema.equals(b.schema) and a.num_rows == b.num_rows, rel
        assert a.to_pandas().equals(b.to_pandas()), rel     # NaN-aware equality
    t0 = pq.read_table(tmp_path / "local" / "effects/t0/geffects.parquet")
    assert t0.schema.equals(GEFFECT_SCHEMA)
    # exactly the rows sent: step 0 once, step 5 = the sum of the two rank halves, once
    n = len(rows0["value"])
    assert t0.num_rows == 2 * n
    d = t0.to_pydict()
    np.testing.assert_array_equal(d["value"][:n], rows0["value"])
    np.testing.assert_allclose(d["value"][n:], rows5["value"], rtol=1e-15)
    assert d["step"] == [0] * n + [5] * n
    assert set(d["kind"]) == {"total", "term", "parameter", "instance", INSTANCE_WEIGHT_KIND, INSTANCE_GA_KIND}
    tot = [v for v, k, r, e in zip(d["value"][:n], d["kind"], d["risk"], d["estimator"])
           if k == "total" and r == "removal" and e == "exact"]
    assert tot == [result.removal.total]
    inst = [v for v, k, r in zip(d["value"][:n], d["kind"], d["risk"]) if k == "instance" and r == "retention"]
    np.testing.assert_array_equal(inst, result.retention.by_instance)
    steps = pq.read_table(tmp_path / "local" / "effects/t0/steps.parquet").to_pydict()
    assert steps["step"] == [0] and steps["removal"] == [result.removal.total]


def test_recorder_in_a_small_adamw_loop(tmp_path):
    model = effects_llama(layers=2, kv_heads=2, seed=4)
    ref = perturbed_copy(model, scale=0.0)
    forget, retain = forget_retain_batches()
    from rayunlearn.objectives import parse_method
    from rayunlearn.forward import token_view

    method = parse_method("npo+kl")
    cfg = EffectsConfig(every=2, probe="step", per_instance=True)
    sink = LocalSink(tmp_path)
    rec = make_recorder(cfg, model, method, None, None, ref, None, sink, "trial-a")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    lr = 1e-3
    for step in range(5):
        views = {"forget": token_view(model, forget, method.needs("forget"), reference=ref),
                 "retain": token_view(model, retain, method.needs("retain"), reference=ref)}
        loss, _, _ = method.loss(views)
        loss.backward()
        grads_before = [p.grad.clone() for p in model.parameters()]
        rec.before_step(step, lr, forget_batch=forget, retain_batch=retain)
        for p, g in zip(model.parameters(), grads_before):
            assert torch.equal(p.grad, g)          # the step's gradients are untouched
        opt.step()
        opt.zero_grad()
        rec.after_step(step)
    rec.close()
    steps = pq.read_table(tmp_path / "effects/trial-a/steps.parquet").to_pydict()
    assert steps["step"] == [0, 2, 4]
    # NPO at θ = θ_ref equals GA: removal effect < 0 at step 0
    assert steps["removal"][0] < 0
    # the realised-update prediction tracks the measured change of every measured step (Adam's
    # first step included, where the optimiser has no state yet)
    for k in (0, 1, 2):
        pred, meas = steps["predicted_removal_change_realised"][k], steps["measured_removal_change"][k]
        assert np.sign(pred) == np.sign(meas) and 0.8 < meas / pred < 1.25
        assert steps["removal_realised"][k] == pytest.approx(-pred / lr, rel=1e-12)
    assert steps["cumulative_removal"][-1] == pytest.approx(
        sum(lr * e * 2 for e in steps["removal"]), rel=1e-12)
    assert steps["cumulative_removal_realised"][1] == pytest.approx(
        -2 * (steps["predicted_removal_change_realised"][0] + steps["predicted_removal_change_realised"][1]),
        rel=1e-12)
    g = pq.read_table(tmp_path / "effects/trial-a/geffects.parquet").to_pydict()
    assert set(g["estimator"]) == {"exact", "realised"}
    assert {s for s, e in zip(g["step"], g["estimator"]) if e == "realised"} == {0, 2, 4}
    # realised rows: per parameter, summing to the total of the steps row
    for risk in ("removal", "retention"):
        tot = [v for v, e, k, r, s in zip(g["value"], g["estimator"], g["kind"], g["risk"], g["step"])
               if e == "realised" and k == "total" and r == risk and s == 2]
        per = [v for v, e, k, r, s in zip(g["value"], g["estimator"], g["kind"], g["risk"], g["step"])
               if e == "realised" and k == "parameter" and r == risk and s == 2]
        assert len(per) == len(list(model.parameters())) and sum(per) == pytest.approx(tot[0], rel=1e-9)
        assert tot[0] == pytest.approx(steps[f"{risk}_realised"][1], rel=1e-12)
    assert g["trial_id"][0] == "trial-a" and g["method"][0] == str(method)


def test_recorder_ema_estimator_rows(tmp_path):
    model = effects_llama(layers=2, kv_heads=2, seed=4)
    forget, retain = forget_retain_batches()
    cfg = EffectsConfig(every=1, probe="fixed", estimator="ema")
    sink = LocalSink(tmp_path)
    rec = make_recorder(cfg, model, "ga", forget, retain, None, None, sink, "e")
    rec.before_step(0, 0.0)
    rec.after_step(0)
    rec.close()
    g = pq.read_table(tmp_path / "effects/e/geffects.parquet").to_pydict()
    assert set(g["estimator"]) == {"ema"}
    assert {gr for gr, k in zip(g["group"], g["kind"]) if k == "group"} == \
        {"embed", "module1", "module2", "module3", "lm"}
    # GA removal under the EMA is -Σ EMA(g)² ≤ 0 (the code's identity)
    tot = [v for v, k, r in zip(g["value"], g["kind"], g["risk"]) if k == "total" and r == "removal"]
    assert tot[0] < 0
    # with one micro-batch the EMA is the plain gradient: equals the exact GA effect on it
    from rayunlearn.effects.ema import _slice, ema_effects

    fb, rb = _slice(forget, 0, 4), _slice(retain, 0, 4)
    e = ema_effects(model, "ga", fb, rb)
    exact = gradient_effects(model, "ga", fb, rb, per_instance=False)
    assert e["removal"]["total"] == pytest.approx(exact.removal.total, rel=1e-6)
    assert e["retention"]["total"] == pytest.approx(exact.retention.total, rel=1e-6)


def test_recorder_train_loop_callback_interface(tmp_path):
    """The training loop's interface: recorder.before_step(step, lr, batches) just
    before the optimiser step and recorder.after_step(step) just after it; the fidelity is
    measured across that very step; close() sends the final row without a measured change."""
    from rayunlearn.effects.recorder import default_sink
    from rayunlearn.forward import token_view
    from rayunlearn.objectives import parse_method

    model = effects_llama(layers=2, kv_heads=2, seed=4)
    forget, retain = forget_retain_batches()
    method = parse_method("ga+gd")
    cfg = EffectsConfig(every=2, probe="step")
    sink = default_sink(cfg, tmp_path / "sweep")
    rec = make_recorder(cfg, model, method, None, None, sink=sink, trial_id="t7")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(4):
        views = {"forget": token_view(model, forget), "retain": token_view(model, retain)}
        method.loss(views)[0].backward()
        rec.before_step(step, 1e-3, forget_batch=forget, retain_batch=retain)
        opt.step()
        rec.after_step(step)
        opt.zero_grad()
    rec.before_step(4, 1e-3, forget_batch=forget, retain_batch=retain)
    rec.close()
    steps = pq.read_table(tmp_path / "sweep/effects/t7/steps.parquet").to_pydict()
    assert steps["step"] == [0, 2, 4]
    assert np.isnan(steps["measured_removal_change"][2])             # the final weights: no next step
    assert np.isnan(steps["predicted_removal_change_realised"][2])
    for k in (0, 1):
        pred, meas = steps["predicted_removal_change_realised"][k], steps["measured_removal_change"][k]
        assert np.sign(pred) == np.sign(meas) and 0.8 < meas / pred < 1.25


def test_replay_on_saved_checkpoints(tmp_path):
    """Offline replay: step 0 (the target) and each checkpoints/step-<k>/model.safetensors give
    the same values as gradient_effects on those weights."""
    import copy

    from rayunlearn.effects.replay import replay
    from rayunlearn.io import save_safetensors

    target = effects_llama(layers=2, kv_heads=2, seed=2)
    forget, retain = forget_retain_batches()
    states = {}
    m = copy.deepcopy(target)
    for k in (5, 10):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        save_safetensors(tmp_path / "checkpoints" / f"step-{k}" / "model.safetensors", m.state_dict())
        states[k] = copy.deepcopy(m)
    ref = copy.deepcopy(target).requires_grad_(False)
    lrs = {t: 1e-3 for t in range(1, 11)}
    out = replay(tmp_path, copy.deepcopy(target), "npo", forget, retain, reference=ref, lrs=lrs, progress=False)
    steps = pq.read_table(out / "steps.parquet").to_pydict()
    assert steps["step"] == [0, 5, 10]
    for k, model in ((0, target), (5, states[5]), (10, states[10])):
        exact = gradient_effects(model, "npo", forget, retain, reference=ref)
        i = steps["step"].index(k)
        assert steps["removal"][i] == pytest.approx(exact.removal.total, rel=1e-9)
        assert steps["retention"][i] == pytest.approx(exact.retention.total, rel=1e-9)
    assert steps["predicted_removal_change"][0] == pytest.approx(-5e-3 * steps["removal"][0], rel=1e-12)
    assert steps["measured_removal_change"][0] == pytest.approx(steps["risk_removal"][1] - steps["risk_removal"][0])
    g = pq.read_table(out / "geffects.parquet").to_pydict()
    assert set(g["step"]) == {0, 5, 10} and set(g["trial_id"]) == {"replay"}
