"""Methods: method-string parsing and its errors, canonical round trip, parameters for sweeps,
presets, needs, the weighted loss, and batch-size invariance on a tiny float64 Llama."""

import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from conftest import make_batch, perturbed_copy, tiny_llama

from rayunlearn import UserError
from rayunlearn.forward import IGNORE, TokenView, token_view
from rayunlearn.objectives import (PRESETS, Method, ObjectiveContext, ObjectiveError, build_method,
                                   describe, names, parse_method)
from rayunlearn.registry import UnknownNameError

D = torch.float64


# ------------------------------------------------------------------------------------------
# parsing

def test_parse_simple_and_weights():
    m = parse_method("npo(beta=0.1)+kl(weight=0.5)")
    assert [t.name for t in m.terms] == ["npo", "kl"]
    assert [t.label for t in m.terms] == ["npo", "kl"]
    assert [t.side for t in m.terms] == ["forget", "retain"]
    assert m.terms[0].params == {"beta": 0.1} and m.terms[0].weight == 1.0
    assert m.terms[1].params == {"mask": "answer"} and m.terms[1].weight == 0.5


def test_parse_whitespace_values_and_types():
    m = parse_method("  wtnpo( beta = 2 , alpha=.5,eps=1e-5 ) + rmu(layer=-1, c=3, normalize=true)+kl( mask = all )")
    assert m.terms[0].params == {"beta": 2.0, "alpha": 0.5, "eps": 1e-5}
    assert isinstance(m.terms[0].params["beta"], float)
    assert m.terms[1].params == {"c": 3.0, "layer": -1, "normalize": True}
    assert m.terms[2].params == {"mask": "all"}
    assert parse_method("ga+kl(mask='all')") == parse_method('ga+kl(mask="all")') == parse_method("ga+kl(mask=all)")
    assert parse_method("rmu(layer=middle)") == parse_method("rmu")
    assert parse_method("ga()") == parse_method("ga")


@pytest.mark.parametrize("text", [
    "ga", "ga+gd", "npo(beta=0.1)+kl(weight=0.5)", "wga(alpha=2.5)+kl(mask=all, weight=1e-3)",
    "tnpo(eps=1e-05)+rr(layer=-1, weight=2)", "rmu(c=20, layer=1, normalize=true)+kl(weight=0.01)",
    "po+kl+kl(mask=all, weight=0.25)", "idk_dpo(beta=0.2)+gd(weight=1.5)", "undial+kl",
    "simnpo(delta=0.5)", "satimp(beta1=1, beta2=0)",
])
def test_canonical_round_trip(text):
    m = parse_method(text)
    s = str(m)
    again = parse_method(s)
    assert again == m and str(again) == s
    assert parse_method(s.replace(",", " , ")) == m


def test_canonical_string_is_explicit():
    assert str(parse_method("npo+kl(weight=0.5)")) == "npo(beta=0.5)+kl(mask=answer, weight=0.5)"
    assert str(parse_method("ga")) == "ga"
    assert parse_method("npo") != parse_method("npo(beta=0.1)")


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError) as e:
        parse_method("npo+kll")
    msg = str(e.value)
    assert "'kll'" in msg and "Did you mean 'kl'" in msg and "Valid:" in msg
    assert isinstance(e.value, UserError)
    with pytest.raises(UnknownNameError, match="Did you mean 'wga'"):
        parse_method("wgaa(alpha=1)")


def test_unknown_keyword_lists_valid_ones():
    with pytest.raises(ObjectiveError) as e:
        parse_method("wtnpo(beta=1, gamma=2)+kl")
    msg = str(e.value)
    assert "'gamma'" in msg and "Valid keywords for 'wtnpo': weight, beta, alpha, eps" in msg
    with pytest.raises(ObjectiveError, match="Did you mean 'beta'"):
        parse_method("npo(bta=1)")
    with pytest.raises(ObjectiveError, match="Valid keywords for 'ga': weight"):
        parse_method("ga(alpha=1)")


@pytest.mark.parametrize("text, where, what", [
    ("npo(beta=0.1", 13, "expected ')'"),
    ("npo+", 5, "expected an objective name"),
    ("npo kl", 5, "expected '+', '(' or the end"),
    ("npo(beta 0.1)", 10, "expected '='"),
    ("npo(beta=)", 10, "expected a value"),
    ("npo(beta=1,beta=2)", 12, "given twice"),
    ("+npo", 1, "expected an objective name"),
    ("", 1, "empty method"),
    ("npo(beta=1)(x=2)", 12, "expected '+'"),
])
def test_syntax_errors_show_where(text, where, what):
    with pytest.raises(ObjectiveError) as e:
        parse_method(text)
    msg = str(e.value)
    assert what in msg and f"position {where}" in msg
    lines = msg.splitlines()
    assert lines[1] == f"  {text}" and lines[2] == "  " + " " * (where - 1) + "^"


@pytest.mark.parametrize("text, key, domain", [
    ("npo(beta=0)", "npo.beta=0", "must be a finite number > 0"),
    ("wga(alpha=-1)", "wga.alpha=-1", "must be a finite number >= 0"),
    ("tnpo(beta=-2)", "tnpo.beta=-2", "must be a finite number > 0"),
    ("tnpo(eps=-1e-5)", "tnpo.eps=-1e-05", "must be a finite number >= 0"),
    ("wtnpo(alpha=-0.5)", "wtnpo.alpha=-0.5", "must be a finite number >= 0"),
    ("rmu(c=0)", "rmu.c=0", "must be a finite number > 0"),
    ("rmu(layer=1.5)", "rmu.layer=1.5", "block index"),
    ("rmu(layer=top)", "rmu.layer='top'", "or 'middle'"),
    ("rmu(normalize=1)", "rmu.normalize=1", "must be true or false"),
    ("simnpo(delta=-0.1)", "simnpo.delta=-0.1", "must be a finite number >= 0"),
    ("idk_dpo(beta=0)", "idk_dpo.beta=0", "must be a finite number > 0"),
    ("satimp(beta1=-1)", "satimp.beta1=-1", "must be a finite number >= 0"),
    ("satimp(beta2=-1)", "satimp.beta2=-1", "must be a finite number >= 0"),
    ("undial(beta=-0.1)", "undial.beta=-0.1", "must be a finite number >= 0"),
    ("npo(beta=fast)", "npo.beta='fast'", "must be a finite number > 0"),
    ("ga+kl(mask=some)", "kl.mask='some'", "must be one of answer, all"),
    ("ga+rr(layer=x)", "rr.layer='x'", "or 'middle'"),
    ("ga+kl(weight=abc)", "kl.weight='abc'", "must be a finite number > 0"),
])
def test_bad_values_name_the_key_and_domain(text, key, domain):
    with pytest.raises(ObjectiveError) as e:
        parse_method(text)
    msg = str(e.value)
    assert msg.startswith(key) and domain in msg


@pytest.mark.parametrize("text, key", [
    ("ga(weight=-1)", "ga.weight=-1"), ("ga(weight=0)", "ga.weight=0"),
    ("npo+kl(weight=-0.5)", "kl.weight=-0.5"), ("ga(weight=nan)", "ga.weight='nan'"),
    ("ga(weight=1e400)", "ga.weight=inf"),
])
def test_weights_must_be_positive_and_finite(text, key):
    # a negative forget weight makes the model learn the forget set; zero silently drops the term
    with pytest.raises(ObjectiveError) as e:
        parse_method(text)
    assert str(e.value).startswith(key) and "must be a finite number > 0" in str(e.value)
    with pytest.raises(ObjectiveError, match=r"^wga\.weight=-2: must be a finite number > 0"):
        parse_method("wga+kl").with_params({"wga.weight": -2})


@pytest.mark.parametrize("text", ["kl", "gd", "gd+kl(mask=all)", "rr"])
def test_method_without_forget_term_is_refused_unless_allowed(text):
    with pytest.raises(ObjectiveError, match="has no forget term.*allow_no_forget=true"):
        parse_method(text)
    with pytest.raises(ObjectiveError, match="has no forget term"):
        build_method(text)
    m = parse_method(text, allow_no_forget=True)
    assert all(t.side == "retain" for t in m.terms)
    assert parse_method(m, allow_no_forget=True) is m
    with pytest.raises(ObjectiveError, match="has no forget term"):
        parse_method(m)


def test_every_hyper_parameter_has_a_public_domain():
    from rayunlearn.objectives import WEIGHT_DOMAIN, check_value, get, names

    for n in names():
        o = get(n)
        assert set(o.domains) == set(o.defaults)
        for key, default in o.defaults.items():
            assert check_value(n, key, default) == default
    assert check_value("npo", "beta", 2) == 2.0 and isinstance(check_value("npo", "beta", 2), float)
    assert get("wga").domain("alpha").describe() == "a finite number >= 0"
    assert get("kl").domain("mask").describe() == "one of answer, all"
    assert WEIGHT_DOMAIN.describe() == "a finite number > 0" and get("ga").domain("weight") is WEIGHT_DOMAIN
    with pytest.raises(ObjectiveError, match=r"^wga\.alpha=-1: must be a finite number >= 0"):
        check_value("wga", "alpha", -1)
    with pytest.raises(ObjectiveError, match="no hyper-parameter 'alpa'.*Did you mean 'alpha'"):
        check_value("wga", "alpa", 1.0)


def test_duplicates_get_labels_and_identical_ones_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = parse_method("kl(mask=answer)+kl(mask=all, weight=0.1)+ga")
    assert m.labels == ["kl", "kl#2", "ga"]
    with pytest.warns(UserWarning, match="repeats kl"):
        m2 = parse_method("ga+kl+kl")
    assert m2.labels == ["ga", "kl", "kl#2"]
    assert m.term("kl#2").params == {"mask": "all"}


# ------------------------------------------------------------------------------------------
# presets, sweeps, needs

def test_presets_parse_and_are_accepted_as_method_strings():
    for key in ["ga", "ga+gd", "ga+kl", "npo", "npo+kl", "wga", "wga+kl", "tnpo+kl", "wtnpo+kl",
                "rmu+kl", "po", "po+kl"]:
        assert key in PRESETS
    for key, text in PRESETS.items():
        assert parse_method(key) == parse_method(text)
    assert parse_method("npo_kl") == parse_method("npo(beta=0.5)+kl(weight=1)")   # not β·KL
    assert parse_method(" idk_kl ") == parse_method("po+kl")
    assert [t.name for t in parse_method("wtnpo+kl").terms] == ["wtnpo", "kl"]


def test_build_method_and_with_params():
    m = build_method("wga+kl", {"wga.alpha": 2.0, "kl.weight": 0.5})
    assert m == parse_method("wga(alpha=2)+kl(weight=0.5)")
    import numpy as np
    m2 = build_method("npo+kl", {"npo.beta": np.float64(0.25), "kl.mask": "all", "npo.weight": np.int64(2)})
    assert m2 == parse_method("npo(beta=0.25, weight=2)+kl(mask=all)")
    assert type(m2.terms[0].params["beta"]) is float
    assert parse_method("ga+kl+kl(mask=all)").with_params({"kl#2.weight": 3}).term("kl#2").weight == 3.0
    assert parse_method("wga").with_params(wga__alpha=4) == parse_method("wga(alpha=4)")
    with pytest.raises(ObjectiveError) as e:
        build_method("wga+kl", {"wga.beta": 1.0})
    assert "'wga.beta'" in str(e.value) and "wga.weight, wga.alpha, kl.weight, kl.mask" in str(e.value)
    with pytest.raises(ObjectiveError, match=r"^npo\.beta=-1\.0 .*must be a finite number > 0"):
        build_method("npo", {"npo.beta": -1.0})
    assert parse_method("npo") == parse_method("npo")        # with_params returns new methods
    with pytest.raises(ObjectiveError, match="at least one term"):
        Method([])


def test_needs_views_reference():
    m = parse_method("npo+kl")
    assert m.needs("forget") == {"ref_logps"} and m.needs("retain") == {"logits", "ref_logits"}
    assert m.needs("idk") == frozenset() and m.views_needed == ("forget", "retain")
    assert m.needs_reference and not m.uses_refusal
    m = parse_method("rmu(layer=1)+gd")
    assert m.needs("forget") == {"hidden"} and not m.needs_reference
    m = parse_method("po")
    assert m.views_needed == ("idk",) and m.uses_refusal and not m.needs_reference
    m = parse_method("idk_dpo+rr")
    assert m.views_needed == ("forget", "retain", "idk")
    assert m.needs("idk") == {"ref_logps"} and m.needs("retain") == {"hidden", "ref_hidden"}
    assert not parse_method("ga+gd").needs_reference and parse_method("ga+rr").needs_reference


def test_describe_lists_everything():
    text = describe()
    for n in names():
        assert f"  {n} " in text
    for k in PRESETS:
        assert k in text
    assert "beta=0.5" in text and "mask=answer" in text and "ref_logps" in text
    assert "\n  npo.beta: a finite number > 0\n" in text and "\n  wga.alpha: a finite number >= 0\n" in text
    assert "Every weight must be a finite number > 0" in text


# ------------------------------------------------------------------------------------------
# the weighted loss on hand-made views

def _view(lp, mask, ref=None, **kw):
    m = torch.tensor(mask, dtype=torch.bool)
    lp = torch.tensor(lp, dtype=D) * m
    return TokenView(logps=lp, mask=m, token_count=float(m.sum()), seq_count=float(m.shape[0]),
                     ref_logps=None if ref is None else torch.tensor(ref, dtype=D) * m, **kw)


def test_loss_is_weighted_sum_of_terms():
    forget = _view([[-1.0, -2.0], [-0.5, 0.0]], [[1, 1], [1, 0]], ref=[[-1.5, -1.0], [-0.5, 0.0]])
    retain = _view([[-0.2, -0.1], [-3.0, -1.0]], [[1, 1], [0, 1]])
    m = parse_method("npo(beta=1)+ga(weight=0.5)+gd(weight=2)")
    total, values, stats = m.loss({"forget": forget, "retain": retain})
    # hand values
    npo = [2 * math.log(1 + math.exp(-3.0 - -2.5)) / 2, 2 * math.log(1 + math.exp(-0.5 - -0.5)) / 2]
    ga = (-1.0 - 2.0 - 0.5) / 3
    gd = (0.2 + 0.1 + 1.0) / 3
    assert math.isclose(values["npo"], sum(npo), rel_tol=1e-12)
    assert math.isclose(values["ga"], ga, rel_tol=1e-12) and math.isclose(values["gd"], gd, rel_tol=1e-12)
    assert math.isclose(float(total), sum(npo) + 0.5 * ga + 2 * gd, rel_tol=1e-12)
    assert set(stats) >= {"npo.weight_mean", "ga.inv_p_mean", "gd.nll_mean"} and stats == m.stats
    per = m.per_example({"forget": forget, "retain": retain})
    assert set(per) == {"npo", "ga", "gd"} and all(v.shape == (2,) for v in per.values())


# ------------------------------------------------------------------------------------------
# batch-size invariance on a tiny float64 Llama

T = 10


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=0)
    ref = perturbed_copy(model)
    prompts = [3, 2, 4, 2, 5, 3, 2, 4]
    batches = {"forget": make_batch(prompts, [5, 3, 4, 6, 2, 5, 1, 3], seed=1, T=T),
               "idk": make_batch(prompts, [2, 4, 3, 3, 2, 4, 5, 2], seed=2, T=T),
               "retain": make_batch([2, 3, 4, 2, 3, 5, 2, 3], [6, 5, 3, 4, 2, 4, 7, 5], seed=3, T=T, row0=100)}
    return model, ref, batches


def _grads(model, method, ref, batches, ctx, sizes):
    model.zero_grad()
    counts = {v: (float((b["labels"][:, 1:] != IGNORE).sum()), float(b["labels"].shape[0]))
              for v, b in batches.items()}
    start = 0
    total = 0.0
    for size in sizes:
        views = {}
        for v in method.views_needed:
            mb = {k: t[start:start + size] for k, t in batches[v].items()}
            views[v] = token_view(model, mb, needs=method.needs(v), reference=ref,
                                  token_count=counts[v][0], seq_count=counts[v][1])
        loss, _, _ = method.loss(views, ctx)
        loss.backward()
        total += float(loss.detach())
        start += size
    return total, torch.cat([p.grad.flatten() for p in model.parameters()]).clone()


@pytest.mark.parametrize("text", [
    "ga+wga(alpha=2)+gd+kl(mask=all)", "npo+tnpo(eps=1e-5)+wtnpo+kl(weight=0.5)",
    "rmu(layer=-1)+simnpo+satimp+rr", "po+idk_dpo+rr(layer=0)+kl", "undial+gd",
])
def test_batch_size_invariance(text, setup):
    """Split a batch of 8 into 2 (unequal) and 4 micro-batches with the global counts: the summed
    loss and gradients equal the unsplit ones (float32 log-probs from forward.py: float32 tolerances)."""
    model, ref, batches = setup
    method = parse_method(text)
    ctx = ObjectiveContext(seed=5)
    full_loss, full = _grads(model, method, ref, batches, ctx, [8])
    assert float(full.abs().max()) > 0
    for sizes in ([3, 5], [2, 2, 2, 2]):
        loss, g = _grads(model, method, ref, batches, ctx, sizes)
        assert math.isclose(loss, full_loss, rel_tol=1e-5, abs_tol=1e-5), sizes
        assert torch.allclose(g, full, rtol=1e-4, atol=1e-8), (sizes, float((g - full).abs().max()))


def test_every_objective_is_in_some_invariance_case():
    cases = test_batch_size_invariance.pytestmark[0].args[1]
    used = {t.name for c in cases for t in parse_method(c).terms}
    assert used == set(names())
