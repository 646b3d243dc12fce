"""Unlearning runs (rayunlearn.train.unlearn): one short run per paper method preset on a tiny
model, the divergence guard, the reference-model cache, and the end-to-end files."""

import math
import os
import re

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
    assert "diverged at step 3: the loss is nan" in str(exc.value) and "step-2" in str(exc.value)
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


def _copy_target(target, dest):
    import shutil

    return shutil.copytree(target[1], dest, ignore=shutil.ignore_patterns("checkpoints", "*.jsonl"))


def test_corrupt_target_weights_are_refused_before_training(target, tmp_path):
    from rayunlearn import UserError
    from rayunlearn.train import unlearn

    bad = _copy_target(target, tmp_path / "target")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])                   # truncated
    cfg = ul_cfg((target[0], str(bad)), tmp_path / "run", "ga")
    with pytest.raises(UserError, match=re.escape(f"{weights} is not a readable safetensors file")):
        unlearn(cfg)
    assert not (tmp_path / "run").exists()                              # nothing started


def _reference(target, cfg, out):
    """The target model's evaluation under `cfg.eval` written as a reference (standing in for
    the retain model's: only its fingerprint and raw arrays matter here)."""
    from rayunlearn.data import load_benchmark
    from rayunlearn.eval.evaluate import evaluate_model, write_eval
    from rayunlearn.models import load_model

    model, tok = load_model(cfg.model, path=target[1])
    return write_eval(evaluate_model(model, tok, load_benchmark(cfg.data), cfg.data, cfg.eval), out)


@pytest.fixture(scope="module")
def reference(target, tmp_path_factory):
    """A reference evaluated with max_new_tokens=8 (ul_cfg's eval settings)."""
    cfg = ul_cfg(target, tmp_path_factory.mktemp("x"), "ga", evaluate=True)
    return _reference(target, cfg, tmp_path_factory.mktemp("ref") / "retain.json")


def test_bad_retain_reference_is_found_before_training(target, reference, tmp_path):
    from rayunlearn import UserError
    from rayunlearn.eval.evaluate import ReferenceMismatchError
    from rayunlearn.train import unlearn

    def run(ref, **eval_kw):
        cfg = ul_cfg(target, tmp_path / "run", "ga", evaluate=True)
        cfg.eval.retain_reference = str(ref)
        for k, v in eval_kw.items():
            setattr(cfg.eval, k, v)
        return unlearn(cfg)

    with pytest.raises(UserError, match="missing.json does not exist"):
        run(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x89PNG not json")
    with pytest.raises(UserError, match="garbage.json: not valid JSON"):
        run(garbage)
    # evaluated at 8 new tokens, this run evaluates at 12: refused at once, naming the field
    with pytest.raises(ReferenceMismatchError, match=r"generation\.max_new_tokens: this evaluation 12, reference 8"):
        run(reference, max_new_tokens=12)
    assert not (tmp_path / "run" / "log.jsonl").exists()                # no training happened
    run(reference)                                                       # the matching settings run
    assert read_json(tmp_path / "run" / "status.json")["status"] == "completed"


def test_moved_reference_resumes_an_unfinished_run(target, reference, tmp_path, monkeypatch):
    """Only eval.retain_reference's path changed (same content, or the saved one is gone): the
    unfinished run resumes; a reference with other content is a different config."""
    import json
    import shutil

    import yaml

    from rayunlearn.config import ConfigError
    from rayunlearn.train import unlearn
    from rayunlearn.train.progress import Bar

    first = tmp_path / "a" / "retain.json"
    first.parent.mkdir()
    for p in (reference, reference.with_name("retain.raw.json")):
        shutil.copy(p, first.parent / p.name)

    def cfg_with(ref):
        cfg = ul_cfg(target, tmp_path / "run", "ga", evaluate=True, checkpoint_every=1)
        cfg.eval.retain_reference = str(ref)
        return cfg

    real_advance = Bar.advance

    def interrupt(self, loss):
        raise KeyboardInterrupt

    monkeypatch.setattr(Bar, "advance", interrupt)
    with pytest.raises(KeyboardInterrupt):
        unlearn(cfg_with(first))
    monkeypatch.setattr(Bar, "advance", real_advance)

    other = tmp_path / "c" / "retain.json"          # same fingerprint, other truth ratios
    other.parent.mkdir()
    shutil.copy(first, other)
    raw = json.loads(first.with_name("retain.raw.json").read_text())
    raw["forget"]["truth_ratio"] = [0.5 * r for r in raw["forget"]["truth_ratio"]]
    other.with_name("retain.raw.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="different config.*retain_reference"):
        unlearn(cfg_with(other))

    moved = tmp_path / "b" / "retain.json"
    shutil.move(first.parent, moved.parent)
    monkeypatch.setattr(Bar, "advance", interrupt)
    with pytest.raises(KeyboardInterrupt):                 # accepted: it runs (and is interrupted again)
        unlearn(cfg_with(moved))
    monkeypatch.setattr(Bar, "advance", real_advance)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["eval"]["retain_reference"] == str(moved)

    # a run that names a reference evaluated under other settings (as written before references
    # were checked up front) never scored anything against it: any matching one may replace it
    stale = json.loads(moved.read_text())
    stale["fingerprint"]["generation"]["max_new_tokens"] = 12
    (moved.parent / "stale.json").write_text(json.dumps(stale))
    shutil.copy(moved.with_name("retain.raw.json"), moved.parent / "stale.raw.json")   # it loads
    saved["eval"]["retain_reference"] = str(moved.parent / "stale.json")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    metrics = unlearn(cfg_with(other))
    assert metrics["removal_kind"] == "tr_closeness"        # the default score, against the retain reference
    assert read_json(tmp_path / "run" / "status.json")["status"] == "completed"


def test_an_error_marks_the_run_failed(target, tmp_path, monkeypatch):
    from rayunlearn.objectives import Method
    from rayunlearn.train import unlearn

    def broken(method, views, ctx):
        raise RuntimeError("boom in the loss")

    monkeypatch.setattr(Method, "loss", broken)
    with pytest.raises(RuntimeError, match="boom"):
        unlearn(ul_cfg(target, tmp_path / "run", "ga"))
    status = read_json(tmp_path / "run" / "status.json")
    assert status == {"status": "failed", "step": 0, "error": "RuntimeError: boom in the loss"}


def test_a_model_that_blows_up_at_evaluation_is_diverged(target, tmp_path, monkeypatch):
    """Finite training loss, infinite truth ratios at the final evaluation (what GA at a huge lr
    does): a one-line DivergedError, status diverged, no metrics.json."""
    from rayunlearn.eval.evaluate import Evaluator
    from rayunlearn.runs import DivergedError
    from rayunlearn.train import unlearn

    real = Evaluator.build_raw

    def overflowing(self, scores, gens):
        raw = real(self, scores, gens)
        raw["forget"]["truth_ratio"][1] = float("inf")          # exp(NLL difference > 709)
        return raw

    monkeypatch.setattr(Evaluator, "build_raw", overflowing)
    run = tmp_path / "run"
    with pytest.raises(DivergedError) as exc:
        unlearn(ul_cfg(target, run, "ga", evaluate=True))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("training diverged at step 3: the model evaluated at step 3")
    assert "forget truth_ratio in 1 of 3 items" in msg
    assert "loss stayed finite" in msg
    status = read_json(run / "status.json")
    assert status == {"status": "diverged", "step": 3, "message": msg}
    assert not (run / "metrics.json").exists()


def test_non_finite_gradient_norm_is_not_blamed_on_the_lr(target, tmp_path, monkeypatch):
    from rayunlearn.runs import DivergedError
    from rayunlearn.train.parallel import Parallel
    from rayunlearn.train import unlearn

    real = Parallel.grad_norm
    calls = {"n": 0}

    def overflow(self, max_norm):
        calls["n"] += 1
        norm = real(self, max_norm)
        return float("inf") if calls["n"] == 2 else norm

    monkeypatch.setattr(Parallel, "grad_norm", overflow)
    with pytest.raises(DivergedError) as exc:
        unlearn(ul_cfg(target, tmp_path / "run", "ga", checkpoint_every=1))
    msg = str(exc.value)
    assert msg.startswith("training diverged at step 2: the gradient norm is inf while the loss is finite (")
    assert "cannot clip a non-finite norm" in msg and "step-1" in msg      # float32: not the precision


def test_rerunning_a_finished_run_without_evaluation_does_nothing(target, tmp_path, capsys):
    """A completed run with evaluate=false is not resumed again (which re-entered the loop at
    its last step and showed "loss nan"): the rerun returns its last log record, files untouched."""
    from rayunlearn.train import unlearn

    cfg = ul_cfg(target, tmp_path / "run", "ga", max_steps=2)
    first = unlearn(cfg)
    log = (tmp_path / "run" / "log.jsonl").read_text()
    capsys.readouterr()
    again = unlearn(cfg)
    # the first call measured its phases; the rerun spent nothing on the run and reports no breakdown
    assert again == {k: v for k, v in first.items() if k != "time"} and first["step"] == 2
    assert "final_accuracy" not in first
    assert (tmp_path / "run" / "log.jsonl").read_text() == log and "resuming" not in capsys.readouterr().out


def test_time_breakdown_covers_the_phases_without_double_counting(target, tmp_path):
    """Each phase of a run is measured (G-effects inside a step count once, as effects) and the
    trial's breakdown sums to its time: time.other is the remainder, never negative."""
    import time

    from rayunlearn import runs
    from rayunlearn.sweep.trial import flatten_metrics, time_breakdown
    from rayunlearn.train import unlearn_trial

    cfg = ul_cfg(target, tmp_path / "sweep", "npo+kl", evaluate=True, max_steps=2)
    cfg.trial_id = "t0"
    cfg.eval.every = 1
    cfg.effects.every = 1
    t0 = time.time()
    metrics = unlearn_trial(cfg)
    time_s = time.time() - t0
    assert set(metrics["time"]) == set(runs.TIME_PHASES)
    assert all(metrics["time"][p] > 0 for p in runs.TIME_PHASES if p != "attacks"), metrics["time"]
    assert metrics["time"]["attacks"] == 0          # no eval.attacks
    flat = flatten_metrics(metrics)
    other = time_breakdown(flat, time_s)[runs.TIME_PREFIX + runs.TIME_OTHER]
    parts = [flat[runs.TIME_PREFIX + p] for p in runs.TIME_PHASES]
    assert other >= 0 and sum(parts) <= time_s
    assert sum(parts) + other == pytest.approx(time_s, abs=1e-9)
    assert time_breakdown({"removal": 0.5}, 3.0) == {}       # a run that measured nothing


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


def _run_outputs(sweep_dir, trial_id: str) -> dict:
    """What a finished trial wrote that depends on its computation: metrics, raw evaluation,
    the loss log (times aside) and the G-effect tables."""
    import pyarrow.parquet as pq

    from rayunlearn import runs

    run = runs.run_dir(sweep_dir, trial_id)
    out = {name: read_json(run / name) for name in (runs.METRICS_FILE, runs.RAW_FILE)}
    out["log"] = [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(run / runs.LOG_FILE)]
    for table in runs.EFFECT_TABLES:
        # NaN (no measured change at the last step) compares unequal to itself: name it
        out[table] = [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
                      for r in pq.read_table(runs.effects_table(sweep_dir, trial_id, table)).to_pylist()]
    return out


def test_a_trial_in_a_reused_process_gives_what_a_fresh_process_gives(target, tmp_path):
    """A sweep runs a trial in the process of a finished one (``ray.reuse_actors``): a run must not
    depend on what ran before it in its process. The same run in a fresh interpreter and here, after
    a run of another method with another seed, writes identical metrics, evaluations, losses and
    G-effects."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import rayunlearn
    from rayunlearn.config import to_dict
    from rayunlearn.train import unlearn_trial

    def cfg(out, method, seed):
        c = ul_cfg(target, out, method, evaluate=True, max_steps=3, seed=seed)
        c.trial_id = "t0"
        c.effects.every = 1
        return c

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unlearn_trial(cfg(tmp_path / "before", "npo+kl", seed=5))
        unlearn_trial(cfg(tmp_path / "reused", "wga+kl", seed=0))
    finally:
        torch.set_num_threads(threads)
    fresh = cfg(tmp_path / "fresh", "wga+kl", seed=0)
    code = ("import json, sys, torch\n"
            "from rayunlearn.config import UnlearnConfig, from_dict\n"
            "from rayunlearn.train import unlearn_trial\n"
            "torch.set_num_threads(1)\n"
            "unlearn_trial(from_dict(UnlearnConfig, json.loads(sys.argv[1])))\n")
    repo = str(Path(rayunlearn.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(to_dict(fresh))], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    reused, alone = _run_outputs(tmp_path / "reused", "t0"), _run_outputs(tmp_path / "fresh", "t0")
    assert len(alone["geffects"]) > 0 and len(alone["log"]) == 3 and math.isfinite(alone["metrics.json"]["removal"])
    for key in alone:
        assert reused[key] == alone[key], key
