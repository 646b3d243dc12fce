"""Retain terms (regularisers on the retain set): GD, KL, representation retention.

Same notation and contract as ``forget.py``: per-example terms l_i, batch loss Σ_i l_i,
everything minimised; a retain term is minimised by keeping the model's behaviour on retain data.
"""

from __future__ import annotations

import torch

from rayunlearn.domains import LAYER, choice
from rayunlearn.forward import TokenView
from rayunlearn.objectives.base import (TermOutput, layer_states, masked_mean, objective,
                                        token_mean_terms, upcast)


@objective("gd", side="retain", needs={"retain": ()})
def gd(retain: TokenView) -> TermOutput:
    """Gradient descent on retain answers ("GD" in the paper): token mean of +ℓ_t.

    l_i = −Σ_t lp_{i,t} / N_retain. Stats: ``nll_mean``.
    """
    return TermOutput(-token_mean_terms(retain.logps, retain),
                      {"nll_mean": masked_mean(-retain.logps, retain.mask)})


@objective("kl", side="retain", needs={"retain": ("logits", "ref_logits")},
           domains={"mask": choice("answer", "all")})
def kl(retain: TokenView, *, mask: str = "answer") -> TermOutput:
    """KL(p_ref(·|ctx) ‖ p_θ(·|ctx)) summed over the vocabulary, per position
    k_t = Σ_v p_ref,v (log p_ref,v − log p_θ,v) ≥ 0 (0 at the reference).

    ``mask="answer"`` (default): token mean over retain answer tokens,
    l_i = Σ_t mask_{i,t}·k_{i,t} / N_retain.
    ``mask="all"``: the reference code's ``F.kl_div(..., reduction="batchmean")`` on logits
    flattened to (B·T, V): a mean over **every** position, question and padding included,
    l_i = Σ_t k_{i,t} / (S·(T−1)) with S = ``view.seq_count`` (so that split micro-batches of the
    same padded length sum exactly; ``view.extras["position_count"]`` overrides the denominator).
    The view is already shifted, so the final position (which predicts past the end of the
    sequence) is not included: (T−1) positions per row rather than the reference code's T.
    Minimising keeps p_θ close to the frozen reference on retain data. Stats: ``kl_mean``
    (mean k_t over retain answer tokens).
    """
    lp = torch.log_softmax(upcast(retain.logits), dim=-1)                 # (B, T-1, V)
    lr = torch.log_softmax(upcast(retain.ref_logits).detach(), dim=-1)
    k = (lr.exp() * (lr - lp)).sum(-1)                                   # (B, T-1)
    if mask == "answer":
        per_example = token_mean_terms(k, retain)
    else:
        count = retain.extras.get("position_count", retain.seq_count * k.shape[1])
        per_example = k.sum(-1) / count
    return TermOutput(per_example, {"kl_mean": masked_mean(k.detach(), retain.mask)})


@objective("rr", side="retain", needs={"retain": ("hidden", "ref_hidden")}, domains={"layer": LAYER})
def rr(retain: TokenView, *, layer: int | str = "middle") -> TermOutput:
    """Representation retention (the paper's third regulariser, absent from its code): token
    mean of ‖h_k(θ) − h_k(θ_o)‖² / d over the positions that predict retain answer tokens.

    l_i = Σ_t mask_{i,t}·‖h_{i,t} − h^ref_{i,t}‖²/d / N_retain, h = output of block ``layer``
    (as in ``rmu``: HF ``hidden_states[layer + 1]``, negative from the end, ``"middle"`` default),
    positions ``h[:, :-1]`` as RMU's. Minimising keeps the retain representations at θ_o's.
    Stats: ``dist_mean``.
    """
    h = upcast(layer_states(retain.hidden, layer, "rr"))[:, :-1]         # (B, T-1, d)
    h_ref = upcast(layer_states(retain.ref_hidden, layer, "rr"))[:, :-1].detach()
    dist = (h - h_ref).pow(2).mean(-1)                                   # (B, T-1)
    return TermOutput(token_mean_terms(dist, retain), {"dist_mean": masked_mean(dist.detach(), retain.mask)})
