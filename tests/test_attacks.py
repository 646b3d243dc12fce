"""Robustness attacks (rayunlearn.eval.attacks): their settings refused at load, the relearning
subset held out of the evaluated items, relearning bringing a GA-unlearned model's forget
probability back, torchao's quantization round trip, the recovered fraction, failures recorded
and not raised."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import benchmark_words, data_config, tiny_llama, tiny_tokenizer, toy_benchmark

from rayunlearn.config import AttackConfig, ConfigError, EvalConfig, UnlearnConfig, from_dict
from rayunlearn.eval import attacks as A


def _unlearn_cfg(**eval_kw):
    return from_dict(UnlearnConfig, {"method": "ga", "eval": eval_kw})


# ---------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("attack,where,says", [
    ({"kind": "relearn", "steps": 0}, "eval.attacks[0].steps", ">= 1"),
    ({"kind": "quantize", "bits": 1}, "eval.attacks[0].bits", "2..8"),
    ({"kind": "quantize", "bits": 16}, "eval.attacks[0].bits", "2..8"),
    ({"kind": "relearn", "size": 0}, "eval.attacks[0].size", ">= 1"),
    ({"kind": "relearn", "name": "re.learn"}, "eval.attacks[0].name", "column name"),
    ({"kind": "shake"}, "eval.attacks[0].kind", "'relearn'"),
])
def test_impossible_attack_settings_fail_at_load(attack, where, says):
    with pytest.raises(ConfigError) as exc:
        _unlearn_cfg(attacks=[attack])
    assert where in str(exc.value) and says in str(exc.value)


def test_attack_names_and_the_removal_attack_are_checked():
    cfg = _unlearn_cfg(attacks=[{"kind": "relearn"}, {"kind": "quantize", "bits": 4}, {"kind": "quantize"},
                                {"kind": "relearn", "data": "retain"}])
    assert [a.label for a in cfg.eval.attacks] == ["relearn", "quant4", "quant8", "relearn_retain"]
    with pytest.raises(ConfigError, match=r"eval.attacks\[1\].name: two attacks are named 'quant8'"):
        _unlearn_cfg(attacks=[{"kind": "quantize"}, {"kind": "quantize", "bits": 8}])
    with pytest.raises(ConfigError, match="eval.removal_attack: 'relearn' names none of eval.attacks"):
        _unlearn_cfg(attacks=[{"kind": "quantize"}], removal_attack="relearn")


def test_attacking_an_unmerged_lora_adapter_is_refused():
    with pytest.raises(ConfigError, match=r"eval.attacks\[0\].merge_lora: model.lora_r=4"):
        from_dict(UnlearnConfig, {"method": "ga", "model": {"lora_r": 4},
                                  "eval": {"attacks": [{"kind": "quantize", "merge_lora": False}]}})
    # merged (the default) is fine, and so is merge_lora=false without LoRA
    from_dict(UnlearnConfig, {"method": "ga", "model": {"lora_r": 4}, "eval": {"attacks": [{"kind": "quantize"}]}})
    _unlearn_cfg(attacks=[{"kind": "quantize", "merge_lora": False}])


def test_relearning_subset_larger_than_the_forget_set_is_refused():
    bench = _multi_author_benchmark(3)              # 6 forget items of 3 authors
    ev = EvalConfig(attacks=[AttackConfig(size=6)])
    ev = EvalConfig(attacks=[AttackConfig(size=7)], selection_fraction=1.0)      # every author selectable
    with pytest.raises(A.AttackSettingError, match=r"eval.attacks\[0\] \(relearn\).*size=7 is not smaller than "
                                                   r"the 6 forget items"):
        A.check_attacks_fit(ev.attacks, bench, data_config(), ev)
    # 5 of 6 items touch all three authors: nothing left to evaluate
    with pytest.raises(A.AttackSettingError, match="touches every one of the 3 forget authors"):
        A.check_attacks_fit([AttackConfig(size=5)], bench, data_config(), ev)
    with pytest.raises(A.AttackSettingError, match="size=99 exceeds the"):
        A.check_attacks_fit([AttackConfig(data="world", size=99)], bench, data_config(), ev)
    A.check_attacks_fit([AttackConfig(size=4)], bench, data_config(), ev)
    # by default half the authors (2 of 3) form the selection part, the only ones relearned
    half = EvalConfig()
    with pytest.raises(A.AttackSettingError, match="touches every one of the 2 forget authors"):
        A.check_attacks_fit([AttackConfig(size=3)], bench, data_config(), half)
    A.check_attacks_fit([AttackConfig(size=2)], bench, data_config(), half)


# ---------------------------------------------------------------------------------------------
# which items


def test_relearning_subset_and_evaluated_items_are_disjoint_by_author():
    authors = ["a"] * 3 + ["b"] * 2 + ["c"] * 4 + ["d"] * 3
    for seed in range(6):
        for size in (1, 3, 4, 6):
            relearned, evaluated = A.relearn_split(authors, size, seed)
            assert len(relearned) == size
            assert not set(relearned) & set(evaluated)
            assert not {authors[i] for i in relearned} & {authors[i] for i in evaluated}
            # every author without a relearned item is evaluated, whole
            assert set(evaluated) == {i for i, a in enumerate(authors) if a not in {authors[j] for j in relearned}}
            assert A.relearn_split(authors, size, seed) == (relearned, evaluated)     # seeded, repeatable
    # the seed decides the authors: some seed relearns another author first
    assert len({A.relearn_split(authors, 1, s)[0] for s in range(6)}) > 1
    # drawn from a pool (the selection part): the other authors are all evaluated
    for seed in range(6):
        relearned, evaluated = A.relearn_split(authors, 2, seed, pool=("a", "c"))
        assert {authors[i] for i in relearned} in ({"a"}, {"c"}) and {"b", "d"} <= {authors[i] for i in evaluated}


def test_benign_and_quantization_attacks_evaluate_every_forget_item():
    bench = _multi_author_benchmark(3)
    forget, ev = bench.splits["forget01_perturbed"], EvalConfig()
    rows, items = A.attack_rows(AttackConfig(data="retain", size=3, seed=1), bench, data_config(), ev, forget)
    assert items == tuple(range(6)) and len(rows) == 3 and all(r in bench.splits["retain99"] for r in rows)
    assert A.attack_rows(AttackConfig(kind="quantize"), bench, data_config(), ev, forget) == ([], tuple(range(6)))
    rows, items = A.attack_rows(AttackConfig(size=2), bench, data_config(), ev, forget)
    assert {r["author"] for r in rows}.isdisjoint({forget[i]["author"] for i in items}) and len(items) == 4


# ---------------------------------------------------------------------------------------------
# recovered fraction


def test_recovered_fraction_on_hand_made_numbers():
    # unlearned 0.1, target 0.9 (gap 0.8); the attack takes the unlearned model to 0.5 and the
    # target to 0.8: half of what unlearning removed came back, the target lost 1/8 of the gap
    r = A.recovery(0.5, 0.1, 0.9, 0.8, retain=0.05, retain_attacked=0.03)
    assert r["recovered"] == pytest.approx(0.5) and r["target_change"] == pytest.approx(-0.125)
    assert r["retain_change"] == pytest.approx(-0.025) and r["why"] == ""
    assert r["recovered_beyond_retain"] == pytest.approx(0.5)     # the retain model's fall is not credited
    # the retain model (never saw these authors) rises by 0.2 under the attack = 1/4 of the gap
    r = A.recovery(0.5, 0.1, 0.9, 0.8, retain=0.05, retain_attacked=0.25)
    assert r["retain_change"] == pytest.approx(0.25) and r["recovered_beyond_retain"] == pytest.approx(0.25)
    assert A.recovery(0.1, 0.1, 0.9, 0.9, 0.0, 0.0)["recovered"] == 0.0
    assert A.recovery(0.9, 0.1, 0.9, 0.9, 0.0, 0.0)["recovered"] == pytest.approx(1.0)
    assert A.recovery(0.05, 0.1, 0.9, 0.9, 0.0, 0.0)["recovered"] == pytest.approx(-0.0625)   # the attack removed more
    # against the unattacked target, not the attacked one: (0.5 - 0.1) / (0.9 - 0.1), not / (0.6 - 0.1)
    r = A.recovery(0.5, 0.1, 0.9, 0.6, 0.0, 0.0)
    assert r["recovered"] == pytest.approx(0.5) and r["target_change"] == pytest.approx(-0.375)


@pytest.mark.parametrize("args,why", [
    # the gap (0.9 - 0.87 = 0.03) is below MIN_GAP: nothing measurable was forgotten
    ((0.88, 0.87, 0.9, 0.9, 0.0, 0.0), "gap 0.03 < MIN_GAP=0.05"),
    # the attack took the target from 0.9 to 0.4: 0.3 of its 0.8 gap left, under GUARD = 0.5 of it
    ((0.5, 0.1, 0.9, 0.4, 0.0, 0.0), "target 0.9 → 0.4, under 0.5 of its gap"),
    ((0.5, 0.1, 0.9, None, 0.0, 0.0), "no attacked target"),
    ((0.5, 0.1, None, 0.8, 0.0, 0.0), "no target model"),
    ((math.nan, 0.1, 0.9, 0.8, 0.0, 0.0), "no forget probability of the unlearned model"),
])
def test_recovered_fraction_is_nan_with_its_reason_when_it_cannot_be_read(args, why):
    r = A.recovery(*args)
    assert math.isnan(r["recovered"]) and math.isnan(r["recovered_beyond_retain"]) and why in r["why"]


def test_recovered_fraction_guard_sits_at_half_the_gap():
    assert A.GUARD == 0.5 and A.MIN_GAP == 0.05
    # gap 0.8: the attacked target at 0.1 + 0.4 keeps exactly half of it (defined), just below not
    assert A.recovery(0.3, 0.1, 0.9, 0.5, 0.0, 0.0)["recovered"] == pytest.approx(0.25)
    assert math.isnan(A.recovery(0.3, 0.1, 0.9, 0.4999, 0.0, 0.0)["recovered"])
    # no attacked retain model: the plain fraction stands, the one beyond the retain model's rise is unknown
    r = A.recovery(0.3, 0.1, 0.9, 0.8)
    assert r["recovered"] == pytest.approx(0.25) and math.isnan(r["recovered_beyond_retain"])
    assert "no attacked retain model" in r["why"]


def test_attack_metrics_restrict_every_score_to_the_evaluated_items():
    plain, attacked = _raw([2.0, 3.0, 4.0, 5.0]), _raw([2.0, 1.0, 4.0, 0.5])
    target, retain = {"raw": _raw([0.1, 0.2, 0.3, 0.4])}, {"raw": _raw([3.0, 2.5, 3.0, 3.5])}
    m = A.attack_metrics({"raw": attacked, "retention": 0.4}, {"raw": plain}, (1, 3), reference=retain, target=target,
                         removal_score="prob_removal", selection_fraction=0.5, selection_seed=0,
                         target_attacked_prob=0.75, retain_attacked_prob=0.1)
    p_att = (math.exp(-1.0) + math.exp(-0.5)) / 2
    p_unl = (math.exp(-3.0) + math.exp(-5.0)) / 2
    p_tgt = (math.exp(-0.2) + math.exp(-0.4)) / 2          # the unattacked target on items 1 and 3
    p_ret = (math.exp(-2.5) + math.exp(-3.5)) / 2
    assert m["forget.prob"] == pytest.approx(p_att) and m["unattacked.forget.prob"] == pytest.approx(p_unl)
    assert m["target.unattacked.forget.prob"] == pytest.approx(p_tgt) and m["target.forget.prob"] == 0.75
    assert m["retain.unattacked.forget.prob"] == pytest.approx(p_ret) and m["retain.forget.prob"] == 0.1
    gap = p_tgt - p_unl
    assert m["recovered"] == pytest.approx((p_att - p_unl) / gap)
    assert m["target_change"] == pytest.approx((0.75 - p_tgt) / gap)
    assert m["retain_change"] == pytest.approx((0.1 - p_ret) / gap) and m["retain_change"] > 0
    assert m["recovered_beyond_retain"] == pytest.approx((p_att - p_unl - (0.1 - p_ret)) / gap)
    assert m["recovered_why"] == ""
    assert m["retention"] == 0.4 and m["n_items"] == 2
    # the KS test against the retain model on the two items (equal truth ratios: p = 1)
    assert m["forget_quality"] == pytest.approx(1.0)
    # authors x (items 0, 1) and y (2, 3): each part keeps its evaluated item only
    parts = sorted([m["removal"], m["removal_report"]])
    assert parts == pytest.approx(sorted([1 - math.exp(-1.0), 1 - math.exp(-0.5)]))


def _raw(nll):
    n = len(nll)
    return {"forget": {"avg_gt_loss": nll, "avg_paraphrased_loss": [1.0] * n,
                       "average_perturb_loss": [[2.0, 2.5]] * n, "extraction_strength": [0.5] * n,
                       "truth_ratio": [0.5] * n, "author": ["x", "x", "y", "y"][:n]}}


# ---------------------------------------------------------------------------------------------
# the attacks on a tiny model


def _multi_author_benchmark(n_authors: int):
    """The toy benchmark with its first ``n_authors`` authors (two QA each) as the forget set."""
    bench = toy_benchmark()
    per_author = [bench.splits["full"][2 * i:2 * i + 2] for i in range(n_authors)]
    forget = [{**r, "author": r["question"].split()[2]} for block in per_author for r in block]
    bench.splits["forget01"] = bench.splits["forget01_perturbed"] = forget
    bench.splits["retain99"] = bench.splits["full"][2 * n_authors:]
    bench.splits["world"] = bench.splits["real_authors_perturbed"] + bench.splits["world_facts_perturbed"]
    return bench


def _train(model, tok, records, steps, lr, sign=1.0):
    """``steps`` full-batch AdamW steps of token-mean NLL (sign=-1: gradient ascent, GA)."""
    from rayunlearn.data.examples import collate_examples, encode_records
    from rayunlearn.forward import token_view

    batch = collate_examples(encode_records(records, tok, data_config()), tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        v = token_view(model, batch)
        loss = sign * -(v.logps * v.mask).sum() / v.mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def unlearned():
    """(GA-unlearned model, its target, tokenizer, benchmark, evaluator): a tiny Llama trained on
    every author, then 8 GA steps on the 3 forget authors."""
    from rayunlearn.eval.evaluate import Evaluator

    bench = _multi_author_benchmark(3)
    tok = tiny_tokenizer(benchmark_words(bench))
    target = _train(tiny_llama(vocab=len(tok), hidden=32, seed=0, dtype=torch.float32, pad_id=1, eos_id=1),
                    tok, bench.splits["full"], 120, 1e-2)
    model = _train(copy.deepcopy(target), tok, bench.splits["forget01"], 8, 3e-3, sign=-1.0)
    ev_cfg = EvalConfig(max_new_tokens=4, rouge=False, mia=False)
    return model, target, tok, bench, Evaluator(tok, bench, data_config(), ev_cfg, fast=True)


def test_relearning_brings_back_a_ga_unlearned_models_forgetting(unlearned, tmp_path):
    from rayunlearn.eval.evaluate import Evaluator, write_eval

    model, target, tok, bench, ev = unlearned
    # the target's evaluation as the run's target reference, and the target under the same attack
    ev_cfg = EvalConfig(max_new_tokens=4, rouge=False, mia=False,
                        target_reference=str(write_eval(ev(target), tmp_path / "target.json")))
    ev = Evaluator(tok, bench, data_config(), ev_cfg, fast=True)
    plain, target_plain = ev(model), ev(target)
    assert plain["forget"]["prob"] < 0.5 * target_plain["forget"]["prob"]      # GA did forget
    attack = AttackConfig(size=2, steps=8, lr=LR_TOY, batch_size=2)
    target_attacked = A.reference_attacks(target, ev, target_plain, [attack], benchmark=bench)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    results, per_item = A.run_attacks(model, ev, plain, [attack], benchmark=bench, target_attacked=target_attacked)
    m = results["relearn"]
    assert m["error"] == "" and m["n_relearn"] == 2 and m["n_items"] == 4
    assert m["forget.prob"] > 2 * m["unattacked.forget.prob"], m
    # recovered against the unattacked target on the same items (its reference evaluation)
    items = per_item["relearn"]["items"]
    p_target = float(np.exp(-np.asarray(target_plain["raw"]["forget"]["avg_gt_loss"]))[items].mean())
    assert m["target.unattacked.forget.prob"] == pytest.approx(p_target)
    assert m["target.forget.prob"] == target_attacked["relearn"]["metrics"]["forget.prob"]
    assert m["recovered"] == pytest.approx((m["forget.prob"] - m["unattacked.forget.prob"])
                                           / (p_target - m["unattacked.forget.prob"]))
    assert m["target_change"] == pytest.approx((m["target.forget.prob"] - p_target)
                                               / (p_target - m["unattacked.forget.prob"]))
    assert "no attacked retain model" in m["recovered_why"]
    assert len(per_item["relearn"]["losses"]) == 8
    # the G-effects of relearning: the forgotten risk falls back, as the first-order prediction says
    effects = per_item["relearn"]["effects"]
    assert [r["step"] for r in effects] == list(range(8))
    assert effects[-1]["forget_risk"] < effects[0]["forget_risk"]
    assert effects[0]["forget_effect"] > 0 and effects[0]["predicted_forget_risk_change"] < 0
    assert all(r["predicted_forget_risk_change"] == pytest.approx(-LR_TOY * r["forget_effect"]) for r in effects)
    assert per_item["relearn"]["losses"][-1] < per_item["relearn"]["losses"][0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())   # a copy was attacked
    # the evaluated items' probabilities are the per-item values of the attacked model
    probs = np.asarray(per_item["relearn"]["forget_prob"])[items]
    assert m["forget.prob"] == pytest.approx(float(probs.mean()))


LR_TOY = 0.5     # plain SGD on the toy model (hidden size 32): its gradients are small


def test_relearning_is_plain_sgd_and_deterministic_given_the_seed(unlearned):
    """One SGD step is θ − lr·∇L on the seeded batch (checked against a float64 hand step), and
    the same seed gives the same weights; another seed another batch order."""
    from rayunlearn.data.examples import collate_examples, encode_records
    from rayunlearn.effects.engine import risk_nll
    from rayunlearn.forward import token_view

    model, _, tok, bench, ev = unlearned
    rows, _ = A.attack_rows(AttackConfig(size=2), bench, data_config(), ev.eval_cfg, ev.records["forget"])
    examples = encode_records(rows, tok, data_config())
    one, _ = A.relearn(model, examples, AttackConfig(size=2, steps=1, lr=0.1, batch_size=2), tok.pad_token_id)
    ref = copy.deepcopy(model).double().train()
    loss = risk_nll(token_view(ref, collate_examples(examples, tok.pad_token_id)))
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (name, p), g, q in zip(ref.named_parameters(), grads, one.parameters()):
        assert torch.allclose(q.double(), p.detach() - 0.1 * g, atol=1e-6), name
    attack = AttackConfig(size=2, steps=5, lr=0.1, batch_size=1)
    a, la = A.relearn(model, examples, attack, tok.pad_token_id)
    b, lb = A.relearn(model, examples, attack, tok.pad_token_id)
    c, lc = A.relearn(model, examples, AttackConfig(size=2, steps=5, lr=0.1, batch_size=1, seed=3), tok.pad_token_id)
    assert la == lb and all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert la != lc


def _expanded_scale(w):
    """torchao's per-block scale, one value per weight element."""
    scale = w.scale.reshape(w.shape[0], -1)
    return scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 16)])
def test_quantization_round_trip_moves_weights_by_at_most_half_a_step(unlearned, bits, group):
    model = unlearned[1]
    attack = AttackConfig(kind="quantize", bits=bits, group_size=group)
    q = A.quantized_copy(model, attack)
    # the attacked model holds exactly the dequantized weights, as ordinary float tensors
    plain_weights = dict(A.quantize(model, attack).named_modules())
    head = q.get_output_embeddings()
    originals = dict(model.named_modules())
    n_linear = 0
    for name, mod in q.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w0 = originals[name].weight.detach()
        if mod is head:
            assert torch.equal(mod.weight, w0)                    # the LM head stays in full precision
            continue
        n_linear += 1
        w = mod.weight
        deq = w.dequantize()
        assert type(plain_weights[name].weight.data) is torch.Tensor and torch.equal(plain_weights[name].weight, deq)
        step = _expanded_scale(w)
        assert step.shape == w0.shape
        assert torch.all((deq - w0).abs() <= step / 2 * (1 + 1e-4))     # half a step, float32 rounding
        assert not torch.equal(deq, w0)
        assert w.qdata.min() >= -(2 ** (bits - 1)) and w.qdata.max() <= 2 ** (bits - 1) - 1
    assert n_linear == 2 * 7                                        # q, k, v, o, gate, up, down per block
    assert isinstance(model.get_output_embeddings().weight, torch.nn.Parameter)   # the model itself untouched
    assert type(model.model.layers[0].self_attn.q_proj.weight) is torch.nn.Parameter


def test_eight_bit_quantization_keeps_the_metrics_of_a_float_model(unlearned):
    _, target, _, bench, ev = unlearned
    plain = ev(target)
    results, _ = A.run_attacks(target, ev, plain, [AttackConfig(kind="quantize", bits=8),
                                                   AttackConfig(kind="quantize", bits=2)], benchmark=bench)
    q8, q2 = results["quant8"], results["quant2"]
    assert q8["error"] == "" and q8["n_items"] == 6
    assert q8["forget.prob"] == pytest.approx(q8["unattacked.forget.prob"], rel=0.02)
    assert q8["retention"] == pytest.approx(plain["retention"], rel=0.02)
    assert abs(q2["forget.prob"] - plain["forget"]["prob"]) > abs(q8["forget.prob"] - plain["forget"]["prob"])


def test_dequantized_weights_score_like_torchaos_quantized_model(unlearned):
    _, target, _, _, ev = unlearned
    attack = AttackConfig(kind="quantize", bits=4)
    by_library, ours = ev(A.quantized_copy(target, attack)), ev(A.quantize(target, attack))
    for key in ("avg_gt_loss", "avg_paraphrased_loss"):
        assert np.allclose(by_library["raw"]["forget"][key], ours["raw"]["forget"][key], rtol=1e-6, atol=1e-7)
    assert ours["forget"]["prob"] != pytest.approx(ev(target)["forget"]["prob"], rel=1e-6)   # it did round


def test_a_failing_attack_is_recorded_and_the_others_still_run(unlearned):
    model, _, _, bench, ev = unlearned
    plain = ev(model)
    results, per_item = A.run_attacks(model, ev, plain, [AttackConfig(kind="quantize", bits=4, group_size=7),
                                                         AttackConfig(kind="quantize", bits=8)], benchmark=bench)
    bad = results["quant4"]
    assert "group_size=7 does not divide" in bad["error"] and bad["error"].startswith("AttackSettingError")
    assert all(math.isnan(bad[k]) for k in A.ATTACK_METRICS if k != "time_s")
    assert results["quant8"]["error"] == "" and "quant4" not in per_item and "quant8" in per_item


# ---------------------------------------------------------------------------------------------
# in a sweep


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_optimising_removal_after_relearning_writes_the_attack_columns(tmp_path):
    """The shipped tiny space, one trial, three attacks (one impossible on this model) and the
    relearning attack's removal as the objective: the trial completes, the failure is a column,
    and the references went through the same attacks."""
    ray = pytest.importorskip("ray")
    import pyarrow.parquet as pq
    from rich.console import Console

    from rayunlearn import runs
    from rayunlearn.io import read_json
    from rayunlearn.sweep.driver import run_sweep
    from rayunlearn.sweep.space import load_space

    attacks = ("[{kind: relearn, size: 4, steps: 3, lr: 1.0e-3}, {kind: quantize, bits: 4},"
               " {kind: quantize, bits: 4, group_size: 7, name: broken}]")
    # 40 authors: 4 forget authors of 4 QA, 2 in the selection part (one relearned, one evaluated)
    space = load_space("tiny", [f"results={tmp_path}", "num_samples=1", "prepare.base.epochs=1",
                                "data.synth.num_authors=40", "unlearn.eval.max_items=16",
                                "prepare.target.epochs=1", "prepare.retain.epochs=1",
                                f"unlearn.eval.attacks={attacks}", "unlearn.eval.removal_attack=relearn"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sweep_dir, summary = run_sweep(space, console=Console(quiet=True))
    finally:
        ray.shutdown()
    assert summary["finished"] == 1
    row = pq.read_table(sweep_dir / runs.TRIALS_TABLE_FILE).to_pylist()[0]
    assert row["status"] == runs.COMPLETED, row
    p = runs.ATTACK_PREFIX
    assert row[f"{p}relearn.error"] == "" and row[f"{p}quant4.error"] == ""
    assert "group_size=7 does not divide" in row[f"{p}broken.error"]
    assert all(row[f"{p}broken.{k}"] is None or math.isnan(row[f"{p}broken.{k}"])   # NaN, or null in JSON
               for k in A.ATTACK_METRICS if k != "time_s")
    for name in ("relearn", "quant4"):
        assert 0 < row[f"{p}{name}.forget.prob"] < 1 and 0 < row[f"{p}{name}.target.forget.prob"] < 1
    assert row[f"{p}relearn.n_items"] == 12 and row[f"{p}relearn.n_relearn"] == 4
    # the objective is the post-attack removal; the plain one is kept beside it
    assert row["removal"] == row[f"{p}relearn.removal"] and row["removal_unattacked"] != row["removal"]
    assert row["removal_kind"] == "tr_closeness after relearn"
    for which in ("retain", "target"):
        attacked = read_json(runs.attacked_reference(runs.reference_eval(sweep_dir, which)))
        assert set(attacked) == {"relearn", "quant4", "broken"}
    trial = runs.trial_dir(sweep_dir, row["trial_id"])
    per_item = read_json(trial / runs.ATTACKS_FILE)
    assert set(per_item["relearn"]["items"]).isdisjoint(
        i for i, q in enumerate(read_json(trial / runs.RAW_FILE)["forget"]["question"])
        if q in per_item["relearn"]["relearn_rows"])
    assert row[f"{runs.TIME_PREFIX}attacks"] > 0


# ---------------------------------------------------------------------------------------------
# in the report


# per-trial (unattacked, attacked) forget probabilities against a target at 0.9 unattacked and 0.6
# under the attack, and a retain model rising 0.05 -> 0.13 under it (0.08 / 0.9 of a gap from 0):
#   A: recovered 0.3, beyond the retain model's rise 0.211: survives (< 0.25)
#   B: 0.578, beyond 0.489: neither       C: 0.667, beyond 0.578: comes back (>= 0.5)
#   D: gap 0.9 - 0.88 = 0.02 < MIN_GAP: n/a
#   E: the attacked target keeps 0.6 - 0.4 = 0.2 of the 0.5 gap (< GUARD): n/a
# Read against the attacked target (0.6 - p_before) and with no retain correction, A would not
# survive (0.45), B would come back (0.867) and E would come back (0.5).
REPORT_ROWS = {"A": (0.0, 0.27), "B": (0.0, 0.52), "C": (0.0, 0.6), "D": (0.88, 0.89), "E": (0.4, 0.5)}


def test_report_robustness_section_reads_the_attack_columns(tmp_path):
    """Fake-but-schema-true results with hand-set attack columns (and a stored ``recovered``
    column of the old definition, against the attacked target, which the report must not read):
    the robustness table, the findings (which methods' forgetting survives, the runs where the
    fraction is not defined and why) and the front under the attack."""
    import json

    import pandas as pd
    from fake_results import make_fake_results

    from rayunlearn import runs
    from rayunlearn.io import write_json
    from rayunlearn.report import build_report

    root = make_fake_results(tmp_path / "demo", sweep=False)
    study = root / "study"
    trials = pd.read_parquet(study / runs.TRIALS_TABLE_FILE)
    p = runs.ATTACK_PREFIX
    n = len(trials)
    kinds = ["ABCDE"[i % 5] for i in range(n)]
    before = np.array([REPORT_ROWS[k][0] for k in kinds])
    after = np.array([REPORT_ROWS[k][1] for k in kinds])
    trials[f"{p}relearn.unattacked.forget.prob"] = before
    trials[f"{p}relearn.forget.prob"] = after
    trials[f"{p}relearn.target.unattacked.forget.prob"] = 0.9
    trials[f"{p}relearn.target.forget.prob"] = 0.6
    trials[f"{p}relearn.retain.unattacked.forget.prob"] = 0.05
    trials[f"{p}relearn.retain.forget.prob"] = 0.13
    trials[f"{p}relearn.recovered"] = (after - before) / (0.6 - before)      # the old definition: not read
    trials[f"{p}relearn.removal"] = trials["removal"] * (1 - after)
    trials[f"{p}relearn.retention"] = trials["retention"]
    trials[f"{p}relearn.error"] = ""
    # the last run's attack failed: NaN metrics and the reason (A.failed_metrics)
    trials.loc[n - 1, [f"{p}relearn.forget.prob", f"{p}relearn.unattacked.forget.prob"]] = np.nan
    trials.loc[n - 1, f"{p}relearn.error"] = "RuntimeError: boom"
    kinds[n - 1] = "failed"
    trials.to_parquet(study / runs.TRIALS_TABLE_FILE)
    write_json(runs.attacked_reference(runs.reference_eval(study, "target")),
               {"relearn": {"metrics": {"forget.prob": 0.6, "unattacked.forget.prob": 0.9, "retention": 0.6}}})
    write_json(runs.attacked_reference(runs.reference_eval(study, "retain")),
               {"relearn": {"metrics": {"forget.prob": 0.13, "unattacked.forget.prob": 0.05, "retention": 0.5}}})
    first = str(trials["trial_id"].iloc[0])
    write_json(runs.trial_dir(study, first) / runs.ATTACKS_FILE,
               {"relearn": {"items": [0, 1], "forget_prob": [0.5, 0.4], "unattacked_forget_prob": [0.1, 0.1],
                            "effects": [{"step": k, "forget_risk": 3.0 - k, "forget_effect": 1.0, "lr": 1e-3}
                                        for k in range(3)]}})
    out = build_report(root).parent
    md = (out / "report.md").read_text()
    summary = json.loads((out / runs.REPORT_SUMMARY_FILE).read_text())
    found = summary["robustness"]["study"]
    assert found["attacks"] == ["relearn"]
    line = found["findings"][0]
    labels = trials["method"].astype(str).tolist()
    count = {k: kinds.count(k) for k in "ABCDE"}
    defined = count["A"] + count["B"] + count["C"]
    assert f"the forgetting of {count['A']} of {defined} runs survives" in line, line
    assert f"in {count['C']} most of it comes back" in line, line
    assert f"{labels[0]} (0.21)" in line and f"{labels[2]} (0.58)" in line and labels[1] + " (" not in line
    assert f"Not defined for {count['D'] + count['E'] + 1} runs" in line
    assert "gap 0.02 < MIN_GAP=0.05" in line and "target 0.9 → 0.6, under 0.5" in line and "the attack failed" in line
    assert "| failed: RuntimeError: boom | n/a: the attack failed |" in md
    assert "the target model's forget prob under it 0.9 → 0.6" in line
    assert "| (target model) | 0.9 | 0.6 |" in md
    assert "(p_after − p_before) / (p_target − p_before)" in md
    assert {"study_front_relearn.png", "study_relearn_relearn.png"} <= set(summary["figures"])


def test_report_reads_reference_probabilities_from_the_attacked_references_for_older_results():
    """Results written before the ``target.*`` / ``retain.*`` columns existed: the report takes
    the reference models' probabilities from their ``.attacks.json`` (same items, same attack)."""
    import pandas as pd

    from rayunlearn.report.robustness import recoveries

    trials = pd.DataFrame({"attack.relearn.unattacked.forget.prob": [0.0, 0.0],
                           "attack.relearn.forget.prob": [0.27, 0.6],
                           "attack.relearn.target.forget.prob": [0.6, 0.6]})
    refs = {"target": {"relearn": {"forget.prob": 0.6, "unattacked.forget.prob": 0.9}},
            "retain": {"relearn": {"forget.prob": 0.13, "unattacked.forget.prob": 0.05}}}
    found = recoveries(trials, "relearn", refs)
    assert [r["recovered"] for r in found] == pytest.approx([0.3, 2 / 3])
    assert [r["recovered_beyond_retain"] for r in found] == pytest.approx([0.3 - 0.08 / 0.9, 2 / 3 - 0.08 / 0.9])
    assert all(math.isnan(r["recovered"]) for r in recoveries(trials, "relearn", {}))


def test_attacked_models_are_evaluated_without_generation_when_asked(unlearned):
    from rayunlearn.eval.evaluate import Evaluator

    model, _, tok, bench, _ = unlearned
    full = Evaluator(tok, bench, data_config(), EvalConfig(max_new_tokens=4, mia=False, attack_rouge=False))
    fast = A.attack_evaluator(full)
    assert fast is not full and fast.fast and not fast.prompts and fast.records == full.records
    assert A.attack_evaluator(Evaluator(tok, bench, data_config(), EvalConfig(mia=False))).fast is False


def test_bench_reports_each_attacks_cost_relative_to_the_unlearning_run():
    from rayunlearn.bench.attacks import attack_costs

    flat = {"time.attacks": 30.0, "time.steps": 20.0, "attack.relearn.time_s": 12.0, "attack.relearn.error": "",
            "attack.quant4.time_s": 18.0, "attack.quant4.error": "boom", "attack.relearn.forget.prob": 0.3}
    costs = attack_costs(flat, time_s=90.0)        # the run itself: 90 - 30 = 60 s
    assert costs == [{"attack": "quant4", "seconds": 18.0, "per_run": 0.3, "per_steps": 0.9, "error": "boom"},
                     {"attack": "relearn", "seconds": 12.0, "per_run": 0.2, "per_steps": 0.6, "error": ""}]
