"""Forget terms: the objectives the paper studies (GA, WGA, NPO, TNPO, WTNPO, PO, RMU) and the
ones open-unlearning adds (SimNPO, IdK-DPO, SatImp, UNDIAL).

Notation (``docs/spec/OBJECTIVES.md``): on answer tokens, ``lp_t = log p_θ(y_t | x, y_<t)`` (the
view's ``logps``), token NLL ``ℓ_t = −lp_t``, ``p_t = exp(lp_t)``; sequence NLL ``L = Σ_t ℓ_t``
and ``log π(y|x) = −L``. ``N`` = ``view.token_count``, ``S`` = ``view.seq_count``; ``sg`` is
stop-gradient (``.detach()``). Every term is **minimised**; a forget term is minimised by making
the forget answer less likely. Each returns per-example terms ``l_i`` with batch loss ``Σ_i l_i``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rayunlearn.domains import BOOL, LAYER, NONNEGATIVE, POSITIVE
from rayunlearn.forward import TokenView
from rayunlearn.objectives.base import (MissingViewError, ObjectiveContext, TermOutput,
                                        layer_states, masked_mean, objective, row_mean,
                                        seq_logp, token_mean_terms, upcast)


@torch.no_grad()
def _inverse_confidence(view: TokenView) -> float:
    """Mean 1/p_t over answer tokens: GA's per-token gradient scale (the paper's Eq. 1)."""
    return masked_mean(torch.exp(-view.logps.double()), view.mask)


def _tnpo_log_weight(lp: torch.Tensor, lp_ref: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """log w_t, w_t = 2 p^β / (p^β + p_ref^β + eps), in log space (no under/overflow)."""
    parts = [beta * lp, beta * lp_ref]
    if eps > 0:
        parts.append(torch.full_like(lp, math.log(eps)))
    return math.log(2.0) + beta * lp - torch.logsumexp(torch.stack(parts), dim=0)


@objective("ga", side="forget", needs={"forget": ()})
def ga(forget: TokenView) -> TermOutput:
    """Gradient ascent: token mean of −ℓ_t on forget answers.

    l_i = Σ_t lp_{i,t} / N = −Σ_t ℓ_{i,t} / N. Minimising raises the forget NLL; its gradient
    is Σ_t (1/p_t) ∇p_t / N, unbounded as p_t → 0 (the "inverse confidence" term).
    Stats: ``inv_p_mean`` (mean 1/p over forget tokens), ``nll_mean``.
    """
    lp = forget.logps
    stats = {"inv_p_mean": _inverse_confidence(forget),
             "nll_mean": masked_mean(-lp.detach(), forget.mask)}
    return TermOutput(token_mean_terms(lp, forget), stats)


@objective("wga", side="forget", needs={"forget": ()}, domains={"alpha": NONNEGATIVE})
def wga(forget: TokenView, *, alpha: float = 1.0) -> TermOutput:
    """Weighted gradient ascent (paper Eq. 2): token mean of −sg(p_t^α)·ℓ_t.

    l_i = Σ_t sg(p_t^α)·lp_t / N. Gradient Σ_t p_t^(α−1) ∇p_t / N: α ≥ 1 removes GA's 1/p
    blow-up; α = 0 is GA. Default α = 1.0 (open-unlearning; its README says this is the paper's
    value); the G-effect reference code defaults to α = 5 (its ``beta``).
    Stats: ``weight_mean`` (mean p^α over forget tokens), ``inv_p_mean``.
    """
    lp = upcast(forget.logps)
    w = torch.exp(alpha * lp.detach())                                   # (B, T-1) = p^α
    stats = {"weight_mean": masked_mean(w, forget.mask), "inv_p_mean": _inverse_confidence(forget)}
    return TermOutput(token_mean_terms(w * lp, forget), stats, row_mean(w, forget.mask))


@objective("npo", side="forget", needs={"forget": ("ref_logps",)}, domains={"beta": POSITIVE})
def npo(forget: TokenView, *, beta: float = 0.5) -> TermOutput:
    """Negative preference optimisation (paper Eq. 3), sequence mean.

    l_i = (2/β)·log(1 + (π_θ/π_ref)^β) / S = −(2/β)·log σ(β·(L_i − L_i^ref)) / S with L the
    **summed** answer NLL. Minimising lowers π_θ below π_ref. Its gradient is GA's (sequence
    level) weighted by w_i = 2σ(β(log π_θ − log π_ref)) = 2π^β/(π^β + π_ref^β), which is 1 at the
    reference (loss (2/β)·log 2 there) and → 0 as the answer is forgotten. Default β = 0.5 (the
    G-effect reference code); open-unlearning uses 0.1.
    Stats: ``weight_mean`` (mean w_i), ``log_ratio_mean`` (mean log π_θ − log π_ref).
    """
    log_ratio = (seq_logp(upcast(forget.logps), forget.mask)
                 - seq_logp(upcast(forget.ref_logps), forget.mask))              # (B,) log π/π_ref
    # β(L − L_ref) = −β·log_ratio
    per_example = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio) / forget.seq_count
    with torch.no_grad():
        weight = 2 * torch.sigmoid(beta * log_ratio)
        stats = {"weight_mean": float(weight.double().mean()),
                 "log_ratio_mean": float(log_ratio.double().mean())}
    return TermOutput(per_example, stats, weight)


@objective("tnpo", side="forget", needs={"forget": ("ref_logps",)},
           domains={"beta": POSITIVE, "eps": NONNEGATIVE})
def tnpo(forget: TokenView, *, beta: float = 4.0, eps: float = 0.0) -> TermOutput:
    """Token-wise NPO (paper Eq. 6): token mean of −sg(w_t)·ℓ_t,
    w_t = 2 p_t^β / (p_t^β + (p_t^ref)^β + eps).

    l_i = Σ_t sg(w_t)·lp_t / N. At the reference every w_t = 1 (eps = 0), so the gradient is
    GA's. The reference code uses eps = 1e-5, which visibly shrinks the weight of tokens with
    p^β ≲ 1e-5 (p ≲ 0.06 for β = 4); default here eps = 0 (off). Weights are computed in log
    space. Stats: ``weight_mean`` (mean w_t over forget tokens).
    """
    lp = upcast(forget.logps)
    w = torch.exp(_tnpo_log_weight(lp.detach(), upcast(forget.ref_logps), beta, eps))
    return TermOutput(token_mean_terms(w * lp, forget), {"weight_mean": masked_mean(w, forget.mask)},
                      row_mean(w, forget.mask))


@objective("wtnpo", side="forget", needs={"forget": ("ref_logps",)},
           domains={"beta": POSITIVE, "alpha": NONNEGATIVE, "eps": NONNEGATIVE})
def wtnpo(forget: TokenView, *, beta: float = 4.0, alpha: float = 1.5, eps: float = 0.0) -> TermOutput:
    """Weighted token-wise NPO: token mean of −sg(p_t^α·w_t)·ℓ_t with w_t TNPO's weight, i.e.
    sg(2 p_t^(β+α) / (p_t^β + (p_t^ref)^β + eps)).

    l_i = Σ_t sg(p_t^α w_t)·lp_t / N; α = 0 is TNPO. Defaults β = 4, α = 1.5 (reference code
    HEAD; older versions used β = 0.1 or β = α). eps as in ``tnpo`` (reference code 1e-5, here off).
    Stats: ``weight_mean``.
    """
    lp = upcast(forget.logps)
    lpd = lp.detach()
    w = torch.exp(alpha * lpd + _tnpo_log_weight(lpd, upcast(forget.ref_logps), beta, eps))
    return TermOutput(token_mean_terms(w * lp, forget), {"weight_mean": masked_mean(w, forget.mask)},
                      row_mean(w, forget.mask))


@objective("po", side="forget", needs={"idk": ()}, uses_refusal=True)
def po(idk: TokenView) -> TermOutput:
    """Preference optimisation / IdK (paper Eq. 7): token mean of +ℓ_t of a refusal answer
    ("I don't know"-style) to the forget question.

    l_i = −Σ_t lp^idk_{i,t} / N_idk (N_idk = the idk view's ``token_count``). Minimising teaches
    the refusal; it does not touch the original answer directly. Stats: ``nll_mean``.
    """
    return TermOutput(-token_mean_terms(idk.logps, idk),
                      {"nll_mean": masked_mean(-idk.logps, idk.mask)})


# c = 0 would steer every representation to the origin, not to a random direction
@objective("rmu", side="forget", needs={"forget": ("hidden",)},
           domains={"c": POSITIVE, "layer": LAYER, "normalize": BOOL})
def rmu(forget: TokenView, *, ctx: ObjectiveContext, c: float = 2.0, layer: int | str = "middle",
        normalize: bool = False) -> TermOutput:
    """Representation misdirection (paper Eq. 8, reference-code reduction): token mean of
    ‖h_k(x, y_<t) − c·u‖² / d over the positions that predict answer tokens.

    l_i = Σ_t mask_{i,t}·‖h_{i,t} − c·u‖²/d / N, h = output of block ``layer`` (= HF
    ``hidden_states[layer + 1]``; negative counts from the last block, whose HF output is after
    the final norm; ``"middle"`` = block n_blocks // 2); position t of the input predicts label
    t+1 (reference code: ``h[:, :-1]`` where ``labels[:, 1:] != -100``). u ~ U[0,1)^d is drawn
    once from the run seed (``ctx.steering_vector``). ``normalize=False`` keeps the reference
    code's raw u (‖u‖ ≈ √(d/3)); ``True`` uses u/‖u‖ as original RMU and open-unlearning do.
    Minimising pushes the representations of forget answers towards the random target.
    Stats: ``dist_mean`` (mean ‖h − c·u‖²/d), ``h_norm_mean``.
    """
    h = upcast(layer_states(forget.hidden, layer, "rmu"))[:, :-1]          # (B, T-1, d)
    u = ctx.steering_vector(h.shape[-1], normalize, device=h.device, dtype=h.dtype)
    dist = (h - c * u).pow(2).mean(-1)                                   # (B, T-1)
    with torch.no_grad():
        stats = {"dist_mean": masked_mean(dist, forget.mask),
                 "h_norm_mean": masked_mean(h.norm(dim=-1), forget.mask)}
    return TermOutput(token_mean_terms(dist, forget), stats)


# δ is SimNPO's reward margin (γ ≥ 0 in its paper)
@objective("simnpo", side="forget", needs={"forget": ()},
           domains={"beta": POSITIVE, "delta": NONNEGATIVE})
def simnpo(forget: TokenView, *, beta: float = 4.5, delta: float = 0.0) -> TermOutput:
    """SimNPO (reference-free, length-normalised NPO), sequence mean:
    l_i = −(2/β)·log σ(β·(L_i/|y_i| − δ)) / S with L_i the summed answer NLL and |y_i| the
    number of answer tokens.

    Minimising raises the per-token NLL (the table of ``docs/spec/OBJECTIVES.md`` writes
    σ(−β(·)) with L read as a log-likelihood; this is the same loss as open-unlearning's).
    Gradient = GA's per-token mean of sequence i weighted by 2σ(−β(L_i/|y_i| − δ)). Defaults
    β = 4.5, δ = 0 (open-unlearning).
    Stats: ``weight_mean``.
    """
    lengths = forget.mask.sum(-1).clamp(min=1)
    x = -seq_logp(upcast(forget.logps), forget.mask) / lengths - delta       # (B,)
    per_example = -(2.0 / beta) * F.logsigmoid(beta * x) / forget.seq_count
    with torch.no_grad():
        stats = {"weight_mean": float((2 * torch.sigmoid(-beta * x)).double().mean())}
    return TermOutput(per_example, stats)


@objective("idk_dpo", side="forget", needs={"forget": ("ref_logps",), "idk": ("ref_logps",)},
           uses_refusal=True, domains={"beta": POSITIVE})
def idk_dpo(forget: TokenView, idk: TokenView, *, beta: float = 0.1) -> TermOutput:
    """IdK-DPO: DPO with the refusal answer preferred over the true answer, scaled 2/β,
    sequence mean:
    l_i = −(2/β)·log σ(β·m_i) / S with the margin
    m_i = (log π_θ(idk_i) − log π_ref(idk_i)) − (log π_θ(y_i) − log π_ref(y_i)).

    Minimising raises the refusal's likelihood and lowers the true answer's, relative to the
    reference. Default β = 0.1 (open-unlearning). Stats: ``margin_mean`` (the bracket).
    """
    if idk.batch_size != forget.batch_size:
        raise MissingViewError(f"idk_dpo: the idk view has {idk.batch_size} rows, the forget view "
                               f"{forget.batch_size}; they must be the same questions")
    win = seq_logp(upcast(idk.logps), idk.mask) - seq_logp(upcast(idk.ref_logps), idk.mask)
    lose = seq_logp(upcast(forget.logps), forget.mask) - seq_logp(upcast(forget.ref_logps), forget.mask)
    margin = win - lose                                                  # (B,)
    per_example = -(2.0 / beta) * F.logsigmoid(beta * margin) / forget.seq_count
    return TermOutput(per_example, {"margin_mean": float(margin.detach().double().mean())})


@objective("satimp", side="forget", needs={"forget": ()},
           domains={"beta1": NONNEGATIVE, "beta2": NONNEGATIVE})
def satimp(forget: TokenView, *, beta1: float = 5.0, beta2: float = 1.0) -> TermOutput:
    """SatImp: token mean of −sg(p_t^β1·(1−p_t)^β2)·ℓ_t.

    l_i = Σ_t sg(p_t^β1 (1−p_t)^β2)·lp_t / N. β2 = 0 is WGA with α = β1. Defaults β1 = 5,
    β2 = 1 (open-unlearning). Stats: ``weight_mean``.
    """
    lp = upcast(forget.logps)
    lpd = lp.detach()
    w = torch.exp(beta1 * lpd) * (-torch.expm1(lpd)).pow(beta2)          # p^β1 (1-p)^β2
    return TermOutput(token_mean_terms(w * lp, forget), {"weight_mean": masked_mean(w, forget.mask)})


@objective("undial", side="forget", needs={"forget": ("logits", "ref_logits")},
           domains={"beta": NONNEGATIVE})
def undial(forget: TokenView, *, beta: float = 10.0) -> TermOutput:
    """UNDIAL: token mean of the cross-entropy from the adjusted teacher distribution
    q_t = softmax(z^ref_t − β·onehot(y_t)) to p_θ(·|x, y_<t):
    l_i = Σ_t [−Σ_v q_{t,v} log p_θ(v | x, y_<t)] / N.

    Minimising distils the reference with the true token's logit lowered by β (self-distillation
    with adjusted logits). Default β = 10 (open-unlearning). Stats: ``target_p_mean`` (mean
    q_t(y_t), the target probability left on the true token).
    """
    labels = forget.labels.masked_fill(~forget.mask, 0)                  # (B, T-1)
    z_ref = upcast(forget.ref_logits).detach()                           # (B, T-1, V)
    onehot = F.one_hot(labels, z_ref.shape[-1]).to(z_ref.dtype)
    q = torch.softmax(z_ref - beta * onehot, dim=-1)
    ce = -(q * torch.log_softmax(upcast(forget.logits), dim=-1)).sum(-1)   # (B, T-1)
    with torch.no_grad():
        target_p = q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        stats = {"target_p_mean": masked_mean(target_p, forget.mask)}
    return TermOutput(token_mean_terms(ce, forget), stats)
