"""Shared helpers for the G-effect tests: tiny float64 Llama models, hand-built batches, and the
brute-force oracle (one autograd.grad per risk, per term and per instance, dotted in float64).
No tests here."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64


def tiny_llama(layers=2, kv_heads=2, tied=False, seed=0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=32, tie_word_embeddings=tied,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    # non-trivial norm gains so the norm handlers are exercised with a real x̂ ⊙ g
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    return model


def perturbed_copy(model, scale=0.05, seed=1):
    """A frozen 'reference' differing from `model` (so NPO/TNPO weights are not all 1)."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ref.requires_grad_(False)
    return ref


def make_batch(lengths, prompt_lens, T=None, seed=0, row_offset=0):
    """Right-padded batch: prompt tokens labelled -100, answer tokens + one EOS scored,
    padding (id 0) masked."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    T = T or max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompt_lens)):
        toks = torch.randint(3, VOCAB, (n,), generator=g)
        toks[n - 1] = 2                                   # EOS after the answer
        ids[i, :n] = toks
        att[i, :n] = 1
        labels[i, p:n] = toks[p:n]
    return {"input_ids": ids, "attention_mask": att, "labels": labels,
            "row_ids": torch.arange(row_offset, row_offset + B)}


def forget_retain_batches():
    forget = make_batch([9, 7, 10, 6], [3, 2, 4, 3], T=10, seed=11)
    forget["idk"] = make_batch([8, 9, 6, 7], [3, 2, 4, 3], T=9, seed=12)
    retain = make_batch([8, 10, 5], [2, 3, 2], T=10, seed=13, row_offset=100)
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
