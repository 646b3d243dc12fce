"""Unlearning runs (rayunlearn.train.unlearn): one short run per paper method preset on a tiny
model, the divergence guard, the reference-model cache, and the end-to-end files."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from rayunlearn.config import FinetuneConfig, UnlearnConfig, from_dict
from rayunlearn.io import read_json, read_jsonl

DATA = {"max_length": 128, "forget_split": "forget10",
        "synth": {"num_authors": 20, "min_qa_per_author": 4, "max_qa_per_author": 4,
                  "num_world_facts": 24, "retain_perturbed_size": 8, "seed": 2}}
MODEL = {"name": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "vocab_size": 400, "max_position_embeddings": 128}
PAPER_METHODS = ["ga", "ga+gd", "ga+kl", "npo", "npo+kl", "wga", "wga+kl", "tnpo+kl", "wtnpo+kl",
                 "rmu+kl", "po", "po+kl"]
REFUSAL_ONLY = {"po", "po+kl"}       # teach a refusal; they do not target the answer directly


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


def _data(root):
    return {**DATA, "synth": {**DATA["synth"], "out": str(root / "data")}}


@pytest.fixture(scope="session")
def target(tmp_path_factory):
    """A tiny model trained a few steps on the 80 QA of `full` (after 2 world steps)."""
    from rayunlearn.train import finetune

    root = tmp_path_factory.mktemp("unlearn")
    train = {"batch_size": 16, "micro_batch_size": 16, "lr": 5e-3, "warmup_epochs": 0, "progress": False}
    base = finetune(from_dict(FinetuneConfig, {"stage": "base", "out": str(root / "base"), "data": _data(root),
                                               "model": MODEL, "train": {**train, "max_steps": 2}}))
    tgt = finetune(from_dict(FinetuneConfig, {"stage": "target", "init": str(base), "out": str(root / "target"),
                                              "data": _data(root), "model": MODEL,
                                              "train": {**train, "max_steps": 10}}))
    return root, str(tgt)


def ul_cfg(target, out, method, evaluate=False, **train) -> UnlearnConfig:
    root, tgt = target
    t = {"batch_size": 8, "micro_batch_size": 4, "lr": 5e-3, "warmup_epochs": 0, "max_steps": 3,
         "progress": False, "seed": 0}
    t.update(train)
    return from_dict(UnlearnConfig, {"method": method, "target": tgt, "out": str(out), "data": _data(root),
                                     "model": MODEL, "train": t, "evaluate": evaluate,
                                     "eval": {"max_items": 3, "max_new_tokens": 8, "batch_size": 8}})


@torch.no_grad()
def forget_nll(model_dir, cfg, refusal=False) -> float:
    """Mean token NLL of the forget answers (or of their refusal answers) under a model."""
    from rayunlearn.forward import token_view
    from rayunlearn.models import load_model
    from rayunlearn.data import load_benchmark as _load_benchmark
    from rayunlearn.data.examples import collate_examples, encode_records, refusal_records

    model, tok = load_model(cfg.model, path=model_dir)
    recs = _load_benchmark(cfg.data).split(cfg.data.forget_split)
    if refusal:
        recs = refusal_records(recs, _load_benchmark(cfg.data).refusals, cfg.train.seed)
    batch = collate_examples(encode_records(recs, tok, cfg.data), tok.pad_token_id)
    v = token_view(model, batch)
    return float(-(v.logps * v.mask).sum() / v.mask.sum())


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_paper_method_runs_and_unlearns(method, target, tmp_path):
    from rayunlearn.train import unlearn

    cfg = ul_cfg(target, tmp_path / "run", method)
    unlearn(cfg)
    log = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
    labels = [k for k in log[0] if k.startswith("term.")]
    assert len(labels) == method.count("+") + 1                      # each term logged separately
    final = tmp_path / "run" / "checkpoints" / "step-3"
    before, after = load_file(os.path.join(target[1], "model.safetensors")), load_file(final / "model.safetensors")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated by {method}: {unchanged}"
    if method in REFUSAL_ONLY:
        assert forget_nll(final, cfg, refusal=True) < forget_nll(target[1], cfg, refusal=True)
    else:
        assert forget_nll(final, cfg) > forget_nll(target[1], cfg) + 0.05
    assert read_json(tmp_path / "run" / "status.json")["status"] == "completed"


def test_objective_stats_are_logged(target, tmp_path):
    from rayunlearn.train import unlearn

    unlearn(ul_cfg(target, tmp_path / "wga", "wga+kl", max_steps=1))
    rec = read_jsonl(tmp_path / "wga" / "log.jsonl")[0]
    assert 0 < rec["stat.wga.weight_mean"] <= 1 and rec["stat.wga.inv_p_mean"] >= 1
    assert rec["term.kl"] == pytest.approx(0.0, abs=1e-6)          # θ = θ_ref at step 1
    # GA term at step 1 = -(forget token-mean NLL) of the target on this batch: all 8 forget rows
    unlearn(ul_cfg(target, tmp_path / "ga", "ga", max_steps=1, micro_batch_size=8))
    rec = read_jsonl(tmp_path / "ga" / "log.jsonl")[0]
    assert rec["term.ga"] == pytest.approx(-forget_nll(target[1], ul_cfg(target, tmp_path, "ga")), rel=1e-4)


def test_reference_is_cached_when_only_forget_logps_are_needed(target, tmp_path):
    from rayunlearn.objectives import parse_method
    from rayunlearn.train.tasks import UnlearnTask as _UnlearnTask

    task = _UnlearnTask(ul_cfg(target, tmp_path, "npo"), parse_method("npo"), torch.device("cpu"))
    task.build()
    assert task.reference is None and len(task.ref_caches["forget"]) == len(task.examples) == 8
    task = _UnlearnTask(ul_cfg(target, tmp_path, "npo+kl"), parse_method("npo+kl"), torch.device("cpu"))
    task.build()                                   # kl needs reference logits on random retain rows
    assert task.reference is not None and not any(p.requires_grad for p in task.reference.parameters())
    task = _UnlearnTask(ul_cfg(target, tmp_path, "ga+gd"), parse_method("ga+gd"), torch.device("cpu"))
    task.build()
    assert task.reference is None and not task.ref_caches


def test_nan_loss_stops_and_keeps_last_good_checkpoint(target, tmp_path, monkeypatch):
    import rayunlearn.train as T
    from rayunlearn.objectives import Method
    from rayunlearn.runs import DivergedError

    real = Method.loss
    calls = {"n": 0}

    def poisoned(method, views, ctx):
        calls["n"] += 1
        total, terms, stats = real(method, views, ctx)
        if calls["n"] >= 5:                        # 2 micro-batches per step: step 3
            total = total * float("nan")
        return total, terms, stats

    monkeypatch.setattr(Method, "loss", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(DivergedError) as exc:
        T.unlearn(ul_cfg(target, run, "ga", max_steps=4, checkpoint_every=1))
    assert "diverged at step 3" in str(exc.value) and "step-2" in str(exc.value)
    status = read_json(run / "status.json")
    assert status["status"] == "diverged" and status["step"] == 3
    assert status["last_checkpoint"].endswith("step-2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    good = load_file(run / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())


def test_unlearn_end_to_end_writes_metrics_and_trajectory(target, tmp_path):
    from rayunlearn.train import unlearn_trial

    reports = []
    cfg = ul_cfg(target, tmp_path / "sweep", "npo+kl", evaluate=True, max_steps=2)
    cfg.trial_id = "t0"
    cfg.eval.every = 1
    metrics = unlearn_trial(cfg, report=reports.append)
    run = tmp_path / "sweep" / "trials" / "t0"
    assert (run / "metrics.json").exists() and (run / "config.yaml").exists()
    assert 0 <= metrics["removal"] <= 1 or math.isfinite(metrics["removal"])
    assert [r["step"] for r in read_jsonl(run / "trajectory.jsonl")] == [1, 2]
    assert [r["done"] for r in reports] == [False, True] and "retention" in reports[-1]
    # a finished trial is not rerun
    again = unlearn_trial(cfg)
    assert again["removal"] == metrics["removal"]


def test_fixed_probe_covers_every_forget_author_and_is_held_out_of_the_regulariser(target, tmp_path):
    from rayunlearn.data.examples import encode_records, retain_split
    from rayunlearn.effects.probes import probe_rows
    from rayunlearn.effects.recorder import build_probe
    from rayunlearn.objectives import parse_method
    from rayunlearn.train.tasks import UnlearnTask as _UnlearnTask

    cfg = ul_cfg(target, tmp_path, "ga+gd")
    cfg.effects.every, cfg.effects.probe_size, cfg.effects.retain_probe_size = 1, 4, 6
    method = parse_method("ga+gd")
    task = _UnlearnTask(cfg, method, torch.device("cpu"))
    task.build()
    bench = task.benchmark
    rows = probe_rows(bench, cfg.data.forget_split, 4, 6)
    forget = bench.split(cfg.data.forget_split)
    assert {forget[i]["author"] for i in rows.forget} == {r["author"] for r in forget}    # both forget authors
    retain = bench.split(retain_split(cfg.data.forget_split))
    assert len(rows.retain) == 3 and len(rows.world) == 3
    held = {tuple(e["input_ids"]) for e in encode_records([retain[i] for i in rows.retain], task.tokenizer, cfg.data)}
    trained = {tuple(e["input_ids"]) for e in task.retain}
    assert len(task.retain) == len(retain) - 3 and not held & trained
    fb, rb = build_probe(cfg, bench, task.tokenizer, method)
    assert fb["row_ids"].tolist() == list(rows.forget) and rb["input_ids"].shape[0] == 6
    # without recording the regulariser trains on every retain row
    cfg.effects.every = 0
    task = _UnlearnTask(cfg, method, torch.device("cpu"))
    task.build()
    assert len(task.retain) == len(retain)
