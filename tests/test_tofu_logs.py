"""The original TOFU log format: hand-made directories, the round trip from our evaluation, and
refusal of malformed / mismatched directories."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from rayunlearn import UserError
from rayunlearn.eval.tofu_logs import FILES, export_tofu_logs, summarize_tofu_dir, summary_command

LN = math.log


def _write_split(d, name, gt, para, pert, rouge, with_para=True):
    idx = [str(i) for i in range(len(gt))]
    log = {"avg_gt_loss": dict(zip(idx, gt)), "average_perturb_loss": dict(zip(idx, pert)),
           "rougeL_recall": dict(zip(idx, rouge)),
           "generated_text": {i: ["q", "g", "a"] for i in idx}}
    if with_para:
        log["avg_paraphrased_loss"] = dict(zip(idx, para))
    (d / FILES[name]).write_text(json.dumps(log))


def make_dir(tmp_path, name="model", forget_ratios=(1.0, 2.0, 3.0), with_real_para=True):
    """A hand-made log directory whose numbers are easy to summarise by hand.

    avg losses are logs of simple probabilities; perturbed losses of 0 make R = exp(para)."""
    d = tmp_path / name
    d.mkdir()
    # retain: P(gt) = 1/2, 1/4 -> prob 3/8; R = exp(para - 0) = 1/2, 2 -> TR = mean(1/2, 0) = 1/4
    _write_split(d, "retain", [LN(2), LN(4)], [LN(0.5), LN(2)], [[0.0, 0.0], [0.0, 0.0]], [1.0, 0.5])
    # real authors: p = 1/2 with perturbed 1/4+1/4 -> 1/2; p = 1 with perturbed 1,1 -> 1/3
    #   base (=answer) vs perturbed: R = exp(ln2 - ln4) = 1/2 and exp(0 - 0) = 1 -> TR = mean(1/2, 0) = 1/4
    _write_split(d, "real_authors", [LN(2), 0.0], [LN(2), 0.0], [[LN(4), LN(4)], [0.0, 0.0]], [0.5, 0.5],
                 with_para=with_real_para)
    # world facts: p = 1 with perturbed 1/2 -> 2/3; R = exp(0 - ln2) = 1/2 -> TR 1/2
    _write_split(d, "world_facts", [0.0], [0.0], [[LN(2)]], [0.25])
    # forget: P(gt) = 1 each -> prob 1; R = given ratios -> TR = mean(min(R, 1/R))
    n = len(forget_ratios)
    _write_split(d, "forget", [0.0] * n, [LN(r) for r in forget_ratios], [[0.0]] * n, [1.0] * n)
    return d


def test_summary_hand_computed(tmp_path):
    s = summarize_tofu_dir(make_dir(tmp_path))
    assert set(s) == {"model_utility", "forget_quality", "ks_statistic", "retain", "real_authors",
                      "world_facts", "forget"}
    assert s["retain"] == pytest.approx({"prob": 3 / 8, "rouge": 0.75, "truth_ratio": 0.25})
    assert s["real_authors"] == pytest.approx({"prob": (0.5 + 1 / 3) / 2, "rouge": 0.5, "truth_ratio": 0.25})
    assert s["world_facts"] == pytest.approx({"prob": 2 / 3, "rouge": 0.25, "truth_ratio": 0.5})
    assert s["forget"] == pytest.approx({"prob": 1.0, "rouge": 1.0, "truth_ratio": (1 + 0.5 + 1 / 3) / 3})
    nine = [3 / 8, 0.75, 0.25, 5 / 12, 0.5, 0.25, 2 / 3, 0.25, 0.5]
    assert s["model_utility"] == pytest.approx(9 / sum(1 / x for x in nine))
    assert s["forget_quality"] is None and s["ks_statistic"] is None


def test_real_authors_base_falls_back_to_gt_loss(tmp_path):
    a = summarize_tofu_dir(make_dir(tmp_path, "a"))
    b = summarize_tofu_dir(make_dir(tmp_path, "b", with_real_para=False))
    assert a == b


def test_forget_quality_against_retain_dir(tmp_path, capsys):
    model = make_dir(tmp_path, "model", forget_ratios=(1.0, 2.0, 3.0))
    retain = make_dir(tmp_path, "retain", forget_ratios=(4.0, 5.0, 6.0))
    s = summarize_tofu_dir(model, retain)
    # separated samples of 3: KS D = 1, exact p = 2 / C(6, 3) = 0.1
    assert s["ks_statistic"] == 1.0
    assert s["forget_quality"] == pytest.approx(0.1, abs=1e-12)
    assert summary_command(model, retain, as_json=True) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["forget_quality"] == pytest.approx(0.1, abs=1e-12)
    assert summary_command(model, retain) == 0
    assert "forget quality" in capsys.readouterr().out


def test_missing_file(tmp_path):
    d = make_dir(tmp_path)
    (d / "eval_real_world_wo_options.json").unlink()
    with pytest.raises(UserError, match="eval_real_world_wo_options.json"):
        summarize_tofu_dir(d)


def test_missing_field(tmp_path):
    d = make_dir(tmp_path)
    p = d / "eval_log.json"
    log = json.loads(p.read_text())
    del log["rougeL_recall"]
    p.write_text(json.dumps(log))
    with pytest.raises(UserError, match=r"eval_log.json.*'rougeL_recall'"):
        summarize_tofu_dir(d)


def test_non_numeric_value(tmp_path):
    d = make_dir(tmp_path)
    p = d / "eval_log_forget.json"
    log = json.loads(p.read_text())
    log["avg_paraphrased_loss"]["1"] = "0.3"
    p.write_text(json.dumps(log))
    with pytest.raises(UserError, match=r"eval_log_forget.json.*'avg_paraphrased_loss'.*item 1"):
        summarize_tofu_dir(d)


def test_fields_with_different_items_in_one_file(tmp_path):
    d = make_dir(tmp_path)
    p = d / "eval_log.json"
    log = json.loads(p.read_text())
    del log["average_perturb_loss"]["1"]
    p.write_text(json.dumps(log))
    with pytest.raises(UserError, match=r"'average_perturb_loss' covers other items"):
        summarize_tofu_dir(d)


def test_model_and_retain_with_different_forget_items(tmp_path):
    model = make_dir(tmp_path, "model", forget_ratios=(1.0, 2.0, 3.0))
    retain = make_dir(tmp_path, "retain", forget_ratios=(4.0, 5.0))
    with pytest.raises(UserError, match="different forget items"):
        summarize_tofu_dir(model, retain)


def test_not_a_directory(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        summarize_tofu_dir(tmp_path / "nope")


def test_round_trip_our_evaluation(tmp_path):
    """our evaluation -> original format -> summarize_tofu_dir gives the same numbers."""
    from rayunlearn.config import EvalConfig
    from rayunlearn.eval.evaluate import evaluate_model
    from conftest import data_config, tiny_setup

    target, tok, bench = tiny_setup(seed=0)
    retain_model = tiny_setup(seed=1)[0]
    dcfg, ecfg = data_config(), EvalConfig(max_new_tokens=6)
    ref = evaluate_model(retain_model, tok, bench, dcfg, ecfg)
    res = evaluate_model(target, tok, bench, dcfg, ecfg, retain_reference=ref)
    export_tofu_logs(ref, tmp_path / "retain")
    export_tofu_logs(res, tmp_path / "target")
    s = summarize_tofu_dir(tmp_path / "target", tmp_path / "retain")
    for split in ("retain", "real_authors", "world_facts", "forget"):
        for m in ("prob", "rouge", "truth_ratio"):
            assert s[split][m] == pytest.approx(res[split][m], rel=1e-12, abs=1e-15), (split, m)
    assert s["model_utility"] == pytest.approx(res["model_utility"], rel=1e-12)
    assert s["forget_quality"] == pytest.approx(res["forget_quality"], rel=1e-12)
    assert s["ks_statistic"] == pytest.approx(res["ks_statistic"], rel=1e-12)
    # the exported raw fields are the original's: sums / counts / per-token means agree
    log = json.loads((tmp_path / "target" / "eval_log_forget.json").read_text())
    for i in log["avg_gt_loss"]:
        assert log["avg_gt_loss"][i] == pytest.approx(log["gt_loss"][i] / log["num_token_gt"][i])
        assert len(log["perturb_loss"][i]) == len(log["num_token_perturb"][i]) == 3
        assert len(log["generated_text"][i]) == 3
    real = json.loads((tmp_path / "target" / "eval_real_author_wo_options.json").read_text())
    assert "normalized_gt_loss" in real
