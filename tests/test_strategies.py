"""Data-parallel strategies of the unlearning loop (rayunlearn.train.strategies + train.loop.run_loop):
DDP and FSDP2 over 2 CPU processes (gloo) give the single-process run at the same effective
batch (losses, gradient norms, weights, live G-effects), FSDP2 resume after an interruption gives
the uninterrupted weights, and the G-effect recorder's fidelity rows are real.

One `torch.multiprocessing.spawn` of 2 ranks runs every distributed job (the loop function
itself, as a Ray Train worker would), shared by the assertions through a module fixture."""

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rayunlearn import UserError
from rayunlearn.config import FinetuneConfig, UnlearnConfig, from_dict, to_dict
from rayunlearn.io import read_jsonl

DATA = {"max_length": 128, "forget_split": "forget10",
        "synth": {"num_authors": 20, "min_qa_per_author": 4, "max_qa_per_author": 4,
                  "num_world_facts": 24, "retain_perturbed_size": 8, "seed": 3}}
MODEL = {"name": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "vocab_size": 400, "max_position_embeddings": 128, "dtype": "float64"}
METHOD = "npo+kl"          # reference model kept (KL on retain), forget + retain views


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny float64 model trained 2 steps on the world facts: the 'target' we unlearn from."""
    from rayunlearn.train import finetune

    root = tmp_path_factory.mktemp("strategies")
    data = {**DATA, "synth": {**DATA["synth"], "out": str(root / "data")}}
    finetune(from_dict(FinetuneConfig, {
        "stage": "base", "out": str(root / "target"), "data": data, "model": MODEL,
        "train": {"batch_size": 16, "micro_batch_size": 16, "lr": 5e-3, "warmup_epochs": 0,
                  "max_steps": 2, "progress": False}}))
    return root


def ul_cfg(root, out, method=METHOD, effects=None, model=None, trial_id="", evaluate=False, **train) -> UnlearnConfig:
    t = {"batch_size": 8, "micro_batch_size": 2, "lr": 5e-3, "warmup_epochs": 0, "max_steps": 4,
         "checkpoint_every": 2, "progress": False, "seed": 0}
    t.update(train)
    return from_dict(UnlearnConfig, {
        "method": method, "target": str(root / "target"), "out": str(out), "trial_id": trial_id,
        "data": {**DATA, "synth": {**DATA["synth"], "out": str(root / "data")}},
        "model": {**MODEL, **(model or {})}, "train": t, "effects": effects or {"every": 0},
        "evaluate": evaluate, "eval": {"every": 2, "max_items": 2, "max_new_tokens": 4, "batch_size": 4}})


EFFECTS = {"every": 1, "probe": "fixed", "probe_size": 4}


# --------------------------------------------------------------------------------------------
# the 2-rank jobs


class _Cut(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, jobs):
    import torch.distributed as dist

    from rayunlearn.objectives import parse_method
    from rayunlearn.train import launch, loop
    from rayunlearn.train.progress import Bar

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for cfg_dict, run_dir, cut_after in jobs:
            cfg = from_dict(UnlearnConfig, cfg_dict)
            results_dir, trial_id = launch.effects_destination(cfg)
            if cut_after:
                real, calls = Bar.advance, {"n": 0}

                def advance(self, loss):
                    calls["n"] += 1
                    if calls["n"] == cut_after:      # after that step's update, before its checkpoint
                        raise _Cut
                    real(self, loss)

                Bar.advance = advance
                try:
                    loop.run_loop("unlearn", cfg, Path(run_dir), parse_method(cfg.method),
                                  results_dir=results_dir, trial_id=trial_id)
                    raise AssertionError("the run was not interrupted")
                except _Cut:
                    pass
                finally:
                    Bar.advance = real
                if rank == 0:
                    ck = sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())
                    (Path(run_dir) / "checkpoints_at_cut.json").write_text(json.dumps(ck))
                dist.barrier()
            loop.run_loop("unlearn", cfg, Path(run_dir), parse_method(cfg.method),
                          results_dir=results_dir, trial_id=trial_id)      # (re)start: resumes from the last checkpoint
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(root):
    """single (1 process), ddp / fsdp (2 ranks, with live G-effects), fsdp_cut (2 ranks,
    interrupted after step 3, resumed; reference sharded; evaluated every 2 steps on the weights
    gathered to rank 0)."""
    import torch.multiprocessing as mp

    from rayunlearn.train import unlearn

    out = root / "runs"
    single = ul_cfg(root, out / "single", effects=EFFECTS)
    unlearn(single)
    ddp = ul_cfg(root, out / "ddp", effects=EFFECTS, num_workers=2, strategy="ddp")
    fsdp = ul_cfg(root, out / "fsdp", effects=EFFECTS, num_workers=2, strategy="fsdp")
    # the same effects settings as fsdp: a fixed probe's retain rows are held out of the regulariser's
    # training rows, so recording (not just its cost) is part of what the resumed run must reproduce
    cut = ul_cfg(root, out / "fsdp_cut", effects=EFFECTS, num_workers=2, strategy="fsdp", shard_reference=True,
                 evaluate=True)
    jobs = []
    for cfg, cut_after in ((ddp, 0), (fsdp, 0), (cut, 3)):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        jobs.append((to_dict(cfg), cfg.out, cut_after))
    mp.spawn(_worker, args=(2, _free_port(), jobs), nprocs=2, join=True)
    return {k: out / k for k in ("single", "ddp", "fsdp", "fsdp_cut")}


def _log(run):
    return [r for r in read_jsonl(run / "log.jsonl") if "loss" in r]


def _weights(run, step=4):
    return load_file(str(run / "checkpoints" / f"step-{step}" / "model.safetensors"))


def _geffects(run):
    import pyarrow.parquet as pq

    [d] = list((run / "effects").iterdir())
    return pq.read_table(d / "geffects.parquet").to_pandas(), pq.read_table(d / "steps.parquet").to_pandas()


# Tolerances. Everything is float64, so one process with 4 micro-batches and 2 ranks with 2
# each differ only in the order of summation (micro-batches, ranks, DDP buckets / FSDP
# reduce-scatter): measured ~1e-16 relative on losses, gradient norms and G-effects, ~3e-17
# absolute on weights after 4 AdamW steps. We allow 1e-12 / 1e-12. A wrong loss scale (averaged
# instead of summed gradients) halves the gradient norm, a missing gradient sync moves the
# weights by ~lr = 5e-3.
LOSS_REL = 1e-12
W_ATOL = 1e-12
GE_REL = 1e-10


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(runs, strategy):
    one, two = _log(runs["single"]), _log(runs[strategy])
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_REL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=LOSS_REL)
        for k in a:
            if k.startswith("term."):
                assert b[k] == pytest.approx(a[k], rel=LOSS_REL, abs=1e-12), k
    w1, w2 = _weights(runs["single"]), _weights(runs[strategy])
    w0 = load_file(str(runs["single"].parent.parent / "target" / "model.safetensors"))
    assert set(w1) == set(w2)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=W_ATOL), (k, float((w1[k] - w2[k]).abs().max()))
    assert max(float((w1[k] - w0[k]).abs().max()) for k in w1) > 1e-2       # the steps moved weights


def test_fsdp_resume_after_interruption_gives_uninterrupted_weights(runs):
    cut = runs["fsdp_cut"]
    assert json.loads((cut / "checkpoints_at_cut.json").read_text()) == ["step-2"]
    assert sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-2", "step-4"]
    assert [r["step"] for r in _log(cut)] == [1, 2, 3, 4]
    # same strategy and batches, fresh processes after step 2: the resumed optimiser state is the
    # gathered full state, re-sharded. (The uninterrupted run kept a replicated reference, the cut
    # one a sharded one: that may not change the training.)
    wa, wb = _weights(runs["fsdp"]), _weights(cut)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-12), (k, float((wa[k] - wb[k]).abs().max()))
    la, lb = _log(runs["fsdp"]), _log(cut)
    for a, b in zip(la, lb):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)
    # evaluation under fsdp: full weights gathered into an unsharded copy on rank 0
    from rayunlearn.io import read_json

    assert [r["step"] for r in read_jsonl(cut / "trajectory.jsonl")] == [2, 4]
    metrics = read_json(cut / "metrics.json")
    assert metrics["step"] == 4 and math.isfinite(metrics["removal"]) and math.isfinite(metrics["retention"])
    opt = load_file(str(cut / "checkpoints" / "step-4" / "optimizer.safetensors"))
    assert any(k.startswith("state.model.layers.0.") for k in opt)            # FQN-keyed full state


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sharded_live_geffects_match_one_process(runs, strategy):
    g1, s1 = _geffects(runs["single"])
    g2, s2 = _geffects(runs[strategy])
    assert sorted(s1["step"]) == sorted(s2["step"]) == [0, 1, 2, 3, 4]
    key = ["step", "risk", "parameter", "estimator"]
    p1 = g1[g1.kind == "parameter"].set_index(key)["value"]
    p2 = g2[g2.kind == "parameter"].set_index(key)["value"]
    assert len(p1) > 0 and set(p1.index) == set(p2.index)
    p2 = p2.loc[p1.index]
    for (step, risk, est), grp in p1.groupby(level=[0, 1, 3]):
        scale = float(np.abs(grp.values).max())
        diff = np.abs(grp.values - p2.loc[grp.index].values).max()
        assert diff <= GE_REL * scale, (strategy, step, risk, est, diff, scale)
    t1 = s1.set_index("step").sort_index()
    t2 = s2.set_index("step").sort_index()
    assert np.isfinite(t2.loc[[0, 1, 2, 3], "measured_removal_change"]).all()
    assert math.isnan(t2.loc[4, "measured_removal_change"])     # the final weights: no step to measure
    for col in ("removal", "retention", "removal_realised", "retention_realised", "risk_removal",
                "measured_removal_change"):
        np.testing.assert_allclose(t2[col].values, t1[col].values, rtol=GE_REL, atol=1e-14, err_msg=col)
    inst2 = g2[g2.kind == "instance"]
    if strategy == "ddp":       # rank 0 records on the bare replicated module: per-instance too
        inst1 = g1[g1.kind == "instance"].set_index(["step", "risk", "term", "instance", "estimator"])["value"]
        inst2 = inst2.set_index(["step", "risk", "term", "instance", "estimator"])["value"].loc[inst1.index]
        assert len(inst1) > 0
        np.testing.assert_allclose(inst2.values, inst1.values, rtol=0, atol=GE_REL * np.abs(inst1.values).max())
    else:                       # documented gap of the engine: no per-instance values for DTensors
        assert len(inst2) == 0


# --------------------------------------------------------------------------------------------
# single process: fidelity of the live recorder, gradient checkpointing, config checks


def test_recorder_fidelity_rows_of_a_real_run(root, tmp_path):
    """GA with the step's own batch as probe: the removal effect is −‖∇R‖² (≤ 0, exactly), the
    prediction is −lr·e and the measured change of that very optimiser step is real."""
    import pyarrow.parquet as pq

    from rayunlearn.effects.rows import GEFFECT_SCHEMA, STEPS_SCHEMA
    from rayunlearn.train import unlearn_trial

    cfg = ul_cfg(root, tmp_path / "sweep", "ga", effects={"every": 2, "probe": "step"}, trial_id="t0",
                 checkpoint_every=0)
    unlearn_trial(cfg)
    d = tmp_path / "sweep" / "effects" / "t0"
    g = pq.read_table(d / "geffects.parquet")
    s = pq.read_table(d / "steps.parquet")
    assert g.schema.names == GEFFECT_SCHEMA.names and s.schema.names == STEPS_SCHEMA.names
    g, s = g.to_pandas(), s.to_pandas().set_index("step").sort_index()
    assert list(s.index) == [0, 2]          # before steps 1 and 3 (probe "step": no batch at the end)
    tot = g[(g.kind == "total") & (g.risk == "removal") & (g.estimator == "exact")].set_index("step")["value"]
    assert (tot <= 0).all() and (s["removal"] <= 0).all()
    np.testing.assert_allclose(s["removal"], -s["objective_grad_norm"] ** 2, rtol=1e-9)
    np.testing.assert_allclose(tot.sort_index().values, s["removal"].values, rtol=1e-12)
    lr = {0: 5e-3, 2: 5e-3 * 2 / 4}                              # linear decay, T = 4, no warm-up
    for step in (0, 2):
        row = s.loc[step]
        assert row["lr"] == pytest.approx(lr[step], rel=1e-12)
        assert row["predicted_removal_change"] == pytest.approx(-lr[step] * row["removal"], rel=1e-12)
        assert math.isfinite(row["measured_removal_change"]) and row["measured_removal_change"] > 0
        assert math.isfinite(row["risk_removal"])
    # the step-0 risk is the forget NLL of step 1's effective batch, as logged (term.ga = −R)
    first = _log(tmp_path / "sweep" / "trials" / "t0")[0]
    assert s.loc[0, "risk_removal"] == pytest.approx(-first["term.ga"], rel=1e-6)


def test_gradient_checkpointing_same_weights_and_geffects(root, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    from rayunlearn.train import unlearn

    effects = {"every": 1, "probe": "fixed", "probe_size": 4}
    kw = dict(method="wga+gd", effects=effects, max_steps=2, checkpoint_every=0)
    calls = {"n": 0, "reentrant": set()}
    real = mu.checkpoint

    def counted(fn, *a, **k):
        calls["n"] += 1
        calls["reentrant"].add(k.get("use_reentrant"))
        return real(fn, *a, **k)

    monkeypatch.setattr(mu, "checkpoint", counted)
    unlearn(ul_cfg(root, tmp_path / "plain", **kw))
    assert calls["n"] == 0
    unlearn(ul_cfg(root, tmp_path / "ckpt", model={"gradient_checkpointing": True}, **kw))
    assert calls["n"] > 0 and calls["reentrant"] == {False}   # training and recording checkpointed
    wp, wc = _weights(tmp_path / "plain", 2), _weights(tmp_path / "ckpt", 2)
    for k in wp:      # float64; recomputation is bitwise the same forward on CPU
        assert torch.allclose(wp[k], wc[k], rtol=0, atol=1e-12), k
    gp, sp = _geffects(tmp_path / "plain")
    gc, sc = _geffects(tmp_path / "ckpt")
    key = ["step", "risk", "kind", "parameter", "term", "instance", "estimator"]
    a, b = gp.set_index(key)["value"], gc.set_index(key)["value"]
    assert set(a.index) == set(b.index) and (gp.kind == "instance").sum() > 0
    np.testing.assert_allclose(b.loc[a.index].values, a.values, rtol=1e-9, atol=1e-12)


def test_gradient_checkpointing_is_active_in_the_engine():
    """The engine's per-instance hooks see the recomputed forward: values equal the plain ones
    and the checkpoint function really ran (once per block per forward/recompute)."""
    from test_effects_support import effects_llama, forget_retain_batches

    from rayunlearn.effects import gradient_effects

    model = effects_llama(layers=2, kv_heads=2, seed=4)
    forget, retain = forget_retain_batches()
    model.train()
    plain = gradient_effects(model, "npo+gd", forget, retain, reference=effects_llama(layers=2, kv_heads=2, seed=5))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = {"n": 0}
    for layer in model.model.layers:
        real = layer._gradient_checkpointing_func

        def counted(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        layer._gradient_checkpointing_func = counted
    ckpt = gradient_effects(model, "npo+gd", forget, retain, reference=effects_llama(layers=2, kv_heads=2, seed=5))
    assert calls["n"] >= 4                       # 2 blocks x (forget, retain) forwards
    for risk in ("removal", "retention"):
        p, c = getattr(plain, risk), getattr(ckpt, risk)
        assert c.total == pytest.approx(p.total, rel=1e-10)
        for name, v in p.by_parameter.items():
            assert c.by_parameter[name] == pytest.approx(v, rel=1e-8, abs=1e-12 * abs(p.total))
        np.testing.assert_allclose(c.by_instance, p.by_instance, rtol=1e-9, atol=1e-14)


def test_strategy_config_checks(root, tmp_path):
    from rayunlearn.train import unlearn

    try:
        import deepspeed  # noqa: F401
        has_ds = True
    except ImportError:
        has_ds = False
    if not has_ds:
        with pytest.raises(UserError, match="pip install deepspeed"):
            unlearn(ul_cfg(root, tmp_path / "ds", strategy="deepspeed"))
    with pytest.raises(UserError, match="lora_r"):
        unlearn(ul_cfg(root, tmp_path / "lf", strategy="fsdp", model={"lora_r": 4}))


def test_loss_scale_and_deepspeed_config():
    from rayunlearn.train.strategies import deepspeed_config, loss_scale

    assert loss_scale("ddp") == 1.0                 # no process group here
    cfg = deepspeed_config(micro_batch_size=2, grad_accum=4, world_size=2, lr=1e-5, zero_stage=3)
    assert cfg["train_batch_size"] == 16 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["optimizer"]["type"] == "AdamW" and "scheduler" not in cfg


def test_deepspeed_config_validates_with_deepspeed():
    pytest.importorskip("deepspeed", reason="deepspeed is an optional extra (GPU machines); "
                                            "the lead runs the deepspeed path there")
    from rayunlearn.train.strategies import deepspeed_config, validate_deepspeed_config

    validate_deepspeed_config(deepspeed_config(2, 4, 2, 1e-5, offload=True))
