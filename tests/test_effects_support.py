"""Shared helpers for the G-effect tests: their model and batches (built with the conftest helpers)
and the brute-force oracle (one autograd.grad per risk, per term and per instance, dotted in float64).
No tests here."""

from __future__ import annotations

import numpy as np
import torch

from conftest import make_batch, tiny_llama


def effects_llama(**kw):
    """The G-effect tests' tiny float64 Llama: padding id 0 and non-trivial norm gains, so the
    norm handlers are exercised with a real x̂ ⊙ g."""
    return tiny_llama(pad_id=0, norm_noise=0.3, **kw)


def forget_retain_batches():
    forget = make_batch([3, 2, 4, 3], [5, 4, 5, 2], T=10, seed=11,
                        idk=make_batch([3, 2, 4, 3], [4, 6, 1, 3], T=9, seed=12))
    retain = make_batch([2, 3, 2], [5, 6, 2], T=10, seed=13, row0=100)
    return forget, retain


def brute_force(model, method, forget, retain, reference=None, ctx=None):
    """Exact float64 values by brute force: full gradient of each risk, of each term and of each
    forget instance's forget-side terms, dotted per parameter tensor."""
    from rayunlearn.effects.engine import risk_nll, tracked_parameters
    from rayunlearn.forward import token_view
    from rayunlearn.objectives import ObjectiveContext, parse_method

    method = parse_method(method)
    ctx = ctx or ObjectiveContext()
    params, _ = tracked_parameters(model)
    plist = [p for _, p in params]
    views = {"forget": token_view(model, forget, method.needs("forget"), reference=reference)}
    if "idk" in method.views_needed:
        views["idk"] = token_view(model, forget["idk"], method.needs("idk"), reference=reference)
    views["retain"] = token_view(model, retain, method.needs("retain"), reference=reference)
    per = method.per_example(views, ctx)

    def grad(x):
        gs = torch.autograd.grad(x, plist, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(plist, gs)]

    gR = {"removal": grad(risk_nll(views["forget"])), "retention": grad(risk_nll(views["retain"]))}
    out = {}
    B = forget["input_ids"].shape[0]
    for k, gr in gR.items():
        by_term, by_param = {}, np.zeros(len(plist))
        for t in method.terms:
            gt = grad(t.weight * per[t.label].sum())
            d = np.array([float((a * b).sum()) for a, b in zip(gr, gt)])
            by_term[t.label] = d.sum()
            by_param += d
        inst = np.zeros(B)
        for i in range(B):
            li = sum(t.weight * per[t.label][i] for t in method.terms if t.side == "forget")
            if isinstance(li, torch.Tensor):
                gi = grad(li)
                inst[i] = sum(float((a * b).sum()) for a, b in zip(gr, gi))
        out[k] = {"by_term": by_term, "by_parameter": dict(zip([n for n, _ in params], by_param)),
                  "by_instance": inst, "total": by_param.sum(), "grad": gr}
    return out


def hooks_state(model):
    """Every hook dict of every module (all must be empty after the engine returns)."""
    state = []
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            d = getattr(m, attr, None)
            if d:
                state.append((type(m).__name__, attr, len(d)))
    return state
