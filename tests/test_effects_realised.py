"""The realised-update G-effect e_real = ∇R·(θ_t − θ_{t+1})/lr and the per-instance quantities of
the paper (objective weights, unweighted GA PG-effect), checked in float64 against independent
computations: the risk and the objectives' weights are recomputed here from the logits."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch, perturbed_copy, tiny_llama

from rayunlearn.config import EffectsConfig
from rayunlearn.effects import gradient_effects
from rayunlearn.effects.actor import LocalSink
from rayunlearn.effects.recorder import make_recorder
from rayunlearn.effects.rows import result_rows
from rayunlearn.forward import token_view
from rayunlearn.objectives import parse_method
from rayunlearn.runs import INSTANCE_GA_KIND, INSTANCE_WEIGHT_KIND, REALISED, effects_table


def _batches():
    forget = make_batch([3, 2, 4], [5, 4, 3], T=10, seed=21)
    retain = make_batch([2, 3], [4, 5], T=9, seed=22, row0=50)
    train_f = make_batch([2, 4, 3], [4, 3, 5], T=10, seed=23)    # the step trains on other rows
    train_r = make_batch([3, 2], [5, 3], T=9, seed=24)
    return forget, retain, train_f, train_r


def _token_logps(model, batch):
    """(B, T-1) log p of each next token and the answer mask, straight from the logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.gather(F.log_softmax(logits[:, :-1], -1), 2, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def _nll(model, batch):
    lp, mask = _token_logps(model, batch)
    return -lp.sum() / mask.sum()


def _train_grad(model, method, fb, rb):
    model.zero_grad()
    views = {"forget": token_view(model, fb, method.needs("forget")),
             "retain": token_view(model, rb, method.needs("retain"))}
    method.loss(views)[0].backward()


def _one_step(model, make_opt, lr, warm_lr, out):
    """Copy `model`, optionally take a warm-up step (optimiser state: momentum, Adam moments),
    then record one step at `lr` (tables under `out`): the recorder's steps row and the model."""
    forget, retain, tf, tr = _batches()
    method = parse_method("ga+gd")
    m = copy.deepcopy(model)
    opt = make_opt(m.parameters())
    if warm_lr is not None:
        for g in opt.param_groups:
            g["lr"] = warm_lr
        _train_grad(m, method, retain, tf)      # a different batch: the state is not the step's gradient
        opt.step()
    for g in opt.param_groups:
        g["lr"] = lr
    rec = make_recorder(EffectsConfig(every=1, probe="fixed", per_instance=False), m, method, forget, retain,
                        sink=LocalSink(out), trial_id="t")
    _train_grad(m, method, tf, tr)
    rec.before_step(0, lr)
    opt.step()
    row = rec.after_step(0)
    rec.close()
    return row, m


OPTIMISERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), None, 0.02),
    # AdamW with weight decay and state from a previous step (momentum and second moments)
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), 1e-3, 1e-3),
}


@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_realised_prediction_error_is_second_order(name, tmp_path):
    make_opt, warm, lr0 = OPTIMISERS[name]
    model = tiny_llama(seed=5)
    errs = {"removal": [], "retention": []}
    for k in range(4):
        row, _ = _one_step(model, make_opt, lr0 / 2 ** k, warm, tmp_path / str(k))
        for risk in errs:
            meas, pred = row[f"measured_{risk}_change"], row[f"predicted_{risk}_change_realised"]
            assert abs(meas - pred) < 0.2 * abs(meas)       # first order: the prediction tracks it
            errs[risk].append(abs(meas - pred))
    for risk, e in errs.items():
        ratios = np.array(e[:-1]) / np.array(e[1:])
        assert ((ratios > 3) & (ratios < 5)).all(), (name, risk, ratios)


@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_stored_realised_effect_matches_an_independent_computation(name, tmp_path):
    make_opt, warm, lr0 = OPTIMISERS[name]
    model = tiny_llama(seed=6, hidden=24, layers=3, heads=6, kv_heads=3, tied=True)
    forget, retain, _, _ = _batches()
    # the weights the recorded step starts from: replay the warm-up step on a copy
    _, m_after = _one_step(model, make_opt, lr0, warm, tmp_path)
    if warm is not None:
        m0 = copy.deepcopy(model)
        opt = make_opt(m0.parameters())
        for g in opt.param_groups:
            g["lr"] = warm
        _train_grad(m0, parse_method("ga+gd"), retain, _batches()[2])
        opt.step()
    else:
        m0 = copy.deepcopy(model)
    params0 = dict(m0.named_parameters())          # tied: the embedding once
    after = dict(m_after.named_parameters())
    steps = pq.read_table(effects_table(tmp_path, "t", "steps")).to_pydict()
    g = pq.read_table(effects_table(tmp_path, "t", "geffects")).to_pandas()
    real = g[g.estimator == REALISED]
    for risk, batch in (("removal", forget), ("retention", retain)):
        names = list(params0)
        grads = torch.autograd.grad(_nll(m0, batch), [params0[n] for n in names])
        with torch.no_grad():
            by_param = {n: float((gr * (params0[n] - after[n])).sum()) / lr0 for n, gr in zip(names, grads)}
        e_real = sum(by_param.values())
        assert steps[f"{risk}_realised"][0] == pytest.approx(e_real, rel=1e-10)
        assert steps[f"predicted_{risk}_change_realised"][0] == pytest.approx(-lr0 * e_real, rel=1e-10)
        stored = real[(real.risk == risk) & (real.kind == "parameter")].set_index("parameter")["value"]
        assert set(stored.index) == set(by_param)
        for n, v in by_param.items():
            assert stored[n] == pytest.approx(v, rel=1e-10, abs=1e-12 * abs(e_real))
        assert float(real[(real.risk == risk) & (real.kind == "total")]["value"].iloc[0]) == \
            pytest.approx(e_real, rel=1e-10)


# ----------------------------------------------------------------------------- per instance

def _expected_weights(name, lp, lp_ref, mask, hp):
    """The objectives' weights from their formulas (docs/spec/OBJECTIVES.md), per instance."""
    p, p_ref = lp.exp(), lp_ref.exp()
    rows = mask.sum(-1)
    if name == "npo":
        return 2 * torch.sigmoid(hp["beta"] * (lp.sum(-1) - lp_ref.sum(-1)))
    if name == "wga":
        w = p ** hp["alpha"]
    else:
        b = hp["beta"]
        w = 2 * p ** b / (p ** b + p_ref ** b)
        if name == "wtnpo":
            w = w * p ** hp["alpha"]
    return (w * mask).sum(-1) / rows


@pytest.mark.parametrize("name,hp", [("npo", {"beta": 0.7}), ("tnpo", {"beta": 1.0}),
                                     ("wtnpo", {"beta": 2.0, "alpha": 0.5}), ("wga", {"alpha": 0.5})])
def test_instance_weights_and_unweighted_ga_effects(name, hp):
    model = tiny_llama(seed=7)
    ref = perturbed_copy(model, scale=0.2)
    forget, retain, _, _ = _batches()
    spec = f"{name}({', '.join(f'{k}={v}' for k, v in hp.items())})+kl"
    res = gradient_effects(model, spec, forget, retain, reference=ref)
    with torch.no_grad():
        lp, mask = _token_logps(model, forget)
        lp_ref, _ = _token_logps(ref, forget)
    expected = _expected_weights(name, lp, lp_ref, mask, hp)
    assert set(res.instance_weights) == {name}                    # kl has no instance weight
    np.testing.assert_allclose(res.instance_weights[name], expected.numpy(), rtol=1e-12)
    assert not np.allclose(expected.numpy(), expected.numpy()[0])     # the weights differ per instance

    # the unweighted GA PG-effect ∇R·∇ log π(y_i|x_i), by brute force
    plist = list(model.parameters())
    lp_g, _ = _token_logps(model, forget)
    for risk, batch in (("removal", forget), ("retention", retain)):
        gR = torch.autograd.grad(_nll(model, batch), plist)
        want = []
        for i in range(lp_g.shape[0]):
            gi = torch.autograd.grad(lp_g[i].sum(), plist, retain_graph=True)
            want.append(sum(float((a * b).sum()) for a, b in zip(gR, gi)))
        np.testing.assert_allclose(res.instance_ga[risk], want, rtol=1e-10)
    assert (res.instance_ga["removal"] < 0).all()      # raising log π lowers the forget NLL

    rows = result_rows(res, "t", spec, 3)
    w_rows = [(i, v) for k, t, i, v in zip(rows["kind"], rows["term"], rows["instance"], rows["value"])
              if k == INSTANCE_WEIGHT_KIND and t == name]
    assert w_rows == list(zip(forget["row_ids"].tolist(), res.instance_weights[name].tolist()))
    ga_rows = [v for k, r, v in zip(rows["kind"], rows["risk"], rows["value"])
               if k == INSTANCE_GA_KIND and r == "removal"]
    assert ga_rows == res.instance_ga["removal"].tolist()
