"""evaluate_model / Evaluator / write_eval / references / eval_command on a tiny random model."""

import json
import math
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rayunlearn import UserError
from rayunlearn.config import EvalConfig
from rayunlearn.eval.evaluate import (Evaluator, ReferenceMismatchError, evaluate_model, load_reference,
                                      metrics_from_raw, trajectory_record, write_eval)
from conftest import data_config, tiny_setup


@pytest.fixture(scope="module")
def tiny():
    target, tok, bench = tiny_setup(seed=0)
    retain = tiny_setup(seed=1)[0]
    return target, retain, tok, bench


@pytest.fixture(scope="module")
def ref_result(tiny):
    _, retain, tok, bench = tiny
    return evaluate_model(retain, tok, bench, data_config(), EvalConfig(max_new_tokens=6))


def test_metrics_follow_raw_arrays(tiny, ref_result):
    target, _, tok, bench = tiny
    res = evaluate_model(target, tok, bench, data_config(), EvalConfig(max_new_tokens=6), retain_reference=ref_result)
    raw = res["raw"]
    assert res["fingerprint"]["items"] == {"forget": 2, "retain": 8, "real_authors": 3, "world_facts": 3, "holdout": 2}
    # raw per-item consistency: mean = sum / count, K perturbed per item
    for key in ("forget", "retain", "real_authors", "world_facts"):
        d = raw[key]
        np.testing.assert_allclose(d["avg_gt_loss"], np.array(d["gt_loss"]) / np.array(d["num_token_gt"]))
        assert all(len(p) == 3 for p in d["average_perturb_loss"])
    # headline numbers recomputed by hand from the raw arrays
    f = raw["forget"]
    assert res["forget"]["prob"] == pytest.approx(np.mean(np.exp(-np.array(f["avg_gt_loss"]))))
    R = np.exp(np.array(f["avg_paraphrased_loss"]) - np.array(f["average_perturb_loss"]).mean(1))
    assert res["forget"]["truth_ratio"] == pytest.approx(np.mean(np.minimum(R, 1 / R)))
    w = raw["world_facts"]
    p, pp = np.exp(-np.array(w["avg_gt_loss"])), np.exp(-np.array(w["average_perturb_loss"])).sum(1)
    assert res["world_facts"]["prob"] == pytest.approx(np.mean(p / (p + pp)))
    Rw = np.exp(np.array(w["avg_gt_loss"]) - np.array(w["average_perturb_loss"]).mean(1))
    assert res["world_facts"]["truth_ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - Rw)))
    nine = [res[s][m] for s in ("retain", "real_authors", "world_facts") for m in ("prob", "rouge", "truth_ratio")]
    expected_mu = 0.0 if min(nine) == 0 else 9 / sum(1 / x for x in nine)
    assert res["model_utility"] == pytest.approx(expected_mu) and res["retention"] == res["model_utility"]
    six = [res[s][m] for s in ("retain", "real_authors", "world_facts") for m in ("prob", "truth_ratio")]
    assert min(six) > 0 and res["model_utility_no_rouge"] == pytest.approx(6 / sum(1 / x for x in six), rel=1e-12)
    # forget quality against the reference's raw truth ratios
    from scipy.stats import ks_2samp

    ks = ks_2samp(raw["forget"]["truth_ratio"], ref_result["raw"]["forget"]["truth_ratio"])
    assert res["forget_quality"] == pytest.approx(ks.pvalue) and res["ks_statistic"] == pytest.approx(ks.statistic)
    assert res["ks_n"] == [2, 2]
    # removal = the default score (tr_closeness) on the selection part; one forget author: all
    # items are selection, no report part
    from scipy.stats import wasserstein_distance

    assert res["heldout"]["items"] == {"selection": [0, 1], "report": []} and res["removal_report"] is None
    w1 = wasserstein_distance(np.log(raw["forget"]["truth_ratio"]), np.log(ref_result["raw"]["forget"]["truth_ratio"]))
    assert res["removal_kind"] == "tr_closeness" and res["removal"] == pytest.approx(np.exp(-w1), rel=1e-12)
    assert res["selection"]["forget_quality"] == pytest.approx(ks.pvalue) and res["selection"]["n_items"] == 2
    # MIA: AUC of forget vs holdout LOSS scores (higher = member) and privleak vs the reference
    lf, lh = -np.array(f["avg_gt_loss"]), -np.array(raw["holdout"]["avg_gt_loss"])
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in lf for b in lh])
    assert res["mia"]["loss_auc"] == pytest.approx(brute)
    ra = ref_result["mia"]["mink_auc"]
    if ra < 1:
        assert res["mia"]["privleak"] == pytest.approx(100 * ((1 - res["mia"]["mink_auc"]) - (1 - ra)) / (1 - ra))
    # recomputation from raw alone gives the same dict
    again = metrics_from_raw(raw, res["fingerprint"], ref_result)
    assert {k: v for k, v in again.items() if k != "raw"} == {k: v for k, v in res.items() if k != "raw"}


def test_without_reference_removal_is_one_minus_forget_prob(tiny, ref_result):
    assert ref_result["forget_quality"] is None and ref_result["ks_n"] is None
    assert ref_result["removal_kind"] == "prob_removal" and ref_result["selection"]["tr_closeness"] is None
    assert ref_result["removal"] == pytest.approx(1 - ref_result["forget"]["prob"])
    assert ref_result["mia"]["privleak"] is None


def test_write_and_load_reference(tmp_path, tiny, ref_result):
    target, _, tok, bench = tiny
    write_eval(ref_result, tmp_path / "retain_eval")
    metrics = json.loads((tmp_path / "retain_eval" / "metrics.json").read_text())
    assert "raw" not in metrics and metrics["fingerprint"] == ref_result["fingerprint"]
    assert (tmp_path / "retain_eval" / "raw.json").exists()
    write_eval(ref_result, tmp_path / "reference" / "retain.json")
    assert (tmp_path / "reference" / "retain.raw.json").exists()
    a = evaluate_model(target, tok, bench, data_config(), EvalConfig(max_new_tokens=6),
                       retain_reference=str(tmp_path / "retain_eval"))
    b = evaluate_model(target, tok, bench, data_config(), EvalConfig(max_new_tokens=6),
                       retain_reference=str(tmp_path / "reference" / "retain.json"))
    assert a["forget_quality"] == b["forget_quality"] is not None
    assert json.loads(json.dumps(load_reference(str(tmp_path / "retain_eval"))["raw"])) == \
        json.loads(json.dumps(ref_result["raw"]))
    (tmp_path / "retain_eval" / "raw.json").unlink()
    with pytest.raises(UserError, match="raw"):
        load_reference(str(tmp_path / "retain_eval"))
    with pytest.raises(UserError, match="does not exist"):
        load_reference(str(tmp_path / "missing"))


def test_fingerprint_mismatch_refused(tiny, ref_result):
    target, _, tok, bench = tiny
    with pytest.raises(ReferenceMismatchError, match=r"template: this evaluation 'llama2', reference 'plain'"):
        Evaluator(tok, bench, data_config(template="llama2"), EvalConfig(max_new_tokens=6), retain_reference=ref_result)
    with pytest.raises(ReferenceMismatchError, match=r"max_items.*items\.forget|items\.forget.*max_items"):
        Evaluator(tok, bench, data_config(), EvalConfig(max_new_tokens=6, max_items=1), retain_reference=ref_result)
    with pytest.raises(ReferenceMismatchError, match="generation.max_new_tokens"):
        Evaluator(tok, bench, data_config(), EvalConfig(max_new_tokens=7), retain_reference=ref_result)


def test_fast_evaluator_trajectory(tiny, ref_result):
    target, _, tok, bench = tiny
    ev = Evaluator(tok, bench, data_config(), EvalConfig(max_new_tokens=6), retain_reference=ref_result, fast=True)
    target.train()
    out = ev(target, step=5)
    assert target.training                                  # mode restored
    assert out["step"] == 5 and out["fingerprint"]["mode"] == "fast"
    assert out["retain"]["rouge"] is None and out["model_utility_terms"] == 6
    # the trajectory's utility: the final (full) evaluation of the same weights reports the same
    # six-term number beside its nine-term model utility
    full = evaluate_model(target, tok, bench, data_config(), EvalConfig(max_new_tokens=6), retain_reference=ref_result)
    assert out["model_utility_no_rouge"] == out["model_utility"]
    assert full["model_utility_no_rouge"] == pytest.approx(out["model_utility"], rel=1e-12)
    assert full["model_utility_terms"] == 9 and full["model_utility"] != pytest.approx(out["model_utility"])
    assert out["forget_quality"] is not None
    rec = trajectory_record(out)
    assert rec["step"] == 5 and "forget.prob" in rec and "mia.loss_auc" in rec and "raw" not in rec
    json.dumps(rec)
    # repeated calls reuse the cached probes and give identical numbers
    assert ev(target, step=6)["forget"] == out["forget"]


def test_max_items_explicit(tiny):
    target, _, tok, bench = tiny
    out = evaluate_model(target, tok, bench, data_config(), EvalConfig(max_new_tokens=4, max_items=1, mia=False))
    assert out["fingerprint"]["max_items"] == 1
    assert set(out["fingerprint"]["items"].values()) == {1}
    assert out["mia"]["loss_auc"] is None


def test_missing_split_is_user_error(tiny):
    target, _, tok, bench = tiny
    broken = types.SimpleNamespace(name="b", source="x", splits={k: v for k, v in bench.splits.items()
                                                                if k != "world_facts_perturbed"})
    with pytest.raises(UserError, match="world_facts_perturbed"):
        Evaluator(tok, broken, data_config(), EvalConfig())


def test_eval_command_on_model_and_run_dirs(tmp_path, tiny, monkeypatch, capsys):
    """`rayunlearn eval` with stand-ins for rayunlearn.data / rayunlearn.models."""
    target, _, tok, bench = tiny
    calls = {}

    def load_model(cfg, path=None, corpus=None):
        calls["model"] = (cfg.name, path)
        return target, tok

    def load_benchmark(cfg):
        calls["data"] = cfg
        return bench

    import rayunlearn.data.formatting  # noqa: F401  (the real modules stay reachable under the stand-ins)
    import rayunlearn.models.checkpoints  # noqa: F401

    monkeypatch.setitem(sys.modules, "rayunlearn.models", types.SimpleNamespace(load_model=load_model))
    monkeypatch.setitem(sys.modules, "rayunlearn.data", types.SimpleNamespace(load_benchmark=load_benchmark))
    from rayunlearn.eval.evaluate import eval_command

    model_dir = tmp_path / "models" / "target"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    assert eval_command(str(model_dir), None, ["data.forget_split=forget01", "eval.max_new_tokens=4",
                                                "data.max_length=64"]) == 0
    m = json.loads((model_dir / "metrics.json").read_text())
    assert m["fingerprint"]["generation"]["max_new_tokens"] == 4 and calls["model"][1] == str(model_dir)
    assert (model_dir / "tofu_eval" / "eval_log_forget.json").exists()
    assert "forget" in capsys.readouterr().out
    # a run dir: its config.yaml supplies data/eval settings; the final model is its last checkpoint
    run = tmp_path / "run"
    for k in (2, 10):
        (run / "checkpoints" / f"step-{k}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{k}" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("method: ga\ndata:\n  forget_split: forget01\n  max_length: 64\n"
                                     "eval:\n  max_items: 1\n  max_new_tokens: 3\n")
    assert eval_command(str(run), None, [], out=str(tmp_path / "out")) == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["fingerprint"]["max_items"] == 1 and calls["model"][1] == str(run / "checkpoints" / "step-10")
    with pytest.raises(UserError, match="neither a model directory"):
        eval_command(str(tmp_path / "out"), None, [])


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_eval_command_refuses_corrupt_weights(tmp_path, tiny, how):
    """A model directory whose model.safetensors is truncated or garbage: a UserError naming the
    file (the real loader, before transformers meets the file)."""
    from rayunlearn.eval.evaluate import eval_command

    target, _, tok, _ = tiny
    model_dir = tmp_path / "model"
    target.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if how == "truncated" else b"not a safetensors file" * 50)
    with pytest.raises(UserError, match=r"model\.safetensors is not a readable safetensors file"):
        eval_command(str(model_dir), None, ["data.forget_split=forget01"])


def test_evaluation_of_blown_up_weights_is_refused(tiny):
    """A truth ratio that overflows (NLL difference > 709 nats) or a NaN loss: a one-line error
    naming the split and the count, not a metric computed on infinities."""
    from rayunlearn.eval.evaluate import NonFiniteEvaluationError, check_finite
    from rayunlearn.eval.metrics import truth_ratios

    with np.errstate(over="ignore"):                  # the overflow is the case under test
        ratios = truth_ratios([800.0, 1.0], [[0.5, 0.5], [1.0, 2.0]])
    assert math.isinf(ratios[0]) and ratios[1] == pytest.approx(math.exp(1.0 - 1.5))
    raw = {"forget": {"avg_gt_loss": [1.0, 2.0], "avg_paraphrased_loss": [800.0, 1.0],
                      "average_perturb_loss": [[0.5, 0.5], [1.0, 2.0]], "truth_ratio": ratios.tolist()},
           "retain": {"avg_gt_loss": [1.0, float("nan"), 2.0], "avg_paraphrased_loss": [1.0, 1.0, 1.0],
                      "average_perturb_loss": [[1.0], [float("nan")], [1.0]], "truth_ratio": [1.0, 1.0, 1.0]}}
    with pytest.raises(NonFiniteEvaluationError) as exc:
        check_finite(raw, step=7)
    assert str(exc.value) == ("the model evaluated at step 7 gives non-finite values (forget truth_ratio in "
                              "1 of 2 items; retain avg_gt_loss in 1 of 3 items; retain average_perturb_loss "
                              "in 1 of 3 items): its weights blew up, so no metric would mean anything")
    raw["forget"]["truth_ratio"][0] = 1.0
    raw["retain"]["avg_gt_loss"][1] = raw["retain"]["average_perturb_loss"][1][0] = 1.0
    check_finite(raw, step=7)                      # all finite: no error


def test_generation_batches_follow_generate_batch_size(tiny, ref_result, monkeypatch):
    """eval.generate_batch_size sets the prompts per generate call (default: batch_size) and
    changes no number: the same generations and metrics as one-prompt batches."""
    import rayunlearn.eval.probe as P

    target, _, tok, bench = tiny
    sizes = []
    real = P.generate_batch

    def spy(model, prompts, chunk, *args, **kwargs):
        sizes.append(len(chunk))
        return real(model, prompts, chunk, *args, **kwargs)

    monkeypatch.setattr(P, "generate_batch", spy)
    one = evaluate_model(target, tok, bench, data_config(), EvalConfig(max_new_tokens=6, generate_batch_size=1),
                         retain_reference=ref_result)
    n_prompts = len(sizes)                         # forget 2 + retain 8 + real authors 3 + world facts 3
    assert sizes == [1] * 16 and n_prompts == 16
    sizes.clear()
    four = evaluate_model(target, tok, bench, data_config(), EvalConfig(max_new_tokens=6, batch_size=3,
                                                                        generate_batch_size=4),
                          retain_reference=ref_result)
    assert sizes == [4, 4, 4, 4]
    sizes.clear()
    evaluate_model(target, tok, bench, data_config(), EvalConfig(max_new_tokens=6, batch_size=5),
                   retain_reference=ref_result)
    assert sizes == [5, 5, 5, 1]                   # None: batch_size
    for key in ("forget", "retain", "real_authors", "world_facts"):
        assert four["raw"][key]["generated"] == one["raw"][key]["generated"]
    assert four["model_utility"] == pytest.approx(one["model_utility"], rel=1e-6)
