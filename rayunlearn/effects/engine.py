"""The G-effect engine: ``gradient_effects(model, method, forget_batch, retain_batch, ...)``.

Sign convention (stated once, used everywhere): the G-effect of an objective L (minimised by
θ ← θ − η∇L) on a risk R is the raw inner product

    e = ∇θ R · ∇θ L,      R(θ − η∇L) − R(θ) ≈ −η·e.

The risk R is the token-mean NLL over answer tokens: on the forget batch (the **removal**
effect e_u) and on the retain batch (the **retention** effect e_r). **Removal wants e_u < 0**
(forget NLL goes up); **retention wants e_r ≥ 0** (retain NLL does not go up); a negative
retention effect is collateral damage. Values are not normalised; the cosine is an extra.

How it is computed (docs/spec/GEFFECT.md, "Computing it fast"):

- one forward of the forget batch (with grad) gives the removal risk and every forget-side
  term; one forward of the retain batch gives the retention risk and every retain-side term;
  all gradients are vector–Jacobian products of these graphs (``retain_graph``), never a
  re-run of the model;
- the risk gradients ∇R stay on the device (one weight-shaped buffer per tensor and risk);
  every dot product accumulates in float32 (float64 for float64 models);
- per-instance values come from module hooks during the one backward of the forget-side terms
  (``effects/hooks.py``), not from per-example gradients;
- parameters that are DTensors (FSDP2) are dotted shard by shard and the vector of scalars is
  all-reduced once (never a gather). FSDP2 modules must keep their unsharded parameters across
  the several backward passes (``reshard_after_forward=False`` and
  ``set_reshard_after_backward(False)``, then ``reshard()``); gradients are read from ``.grad``
  there (FSDP2 reduce-scatters into it) and cleared. Per-instance values are not computed
  for sharded parameters (known gap: they would need the full rows of ∇R per layer).
- gradient checkpointing must be non-reentrant (HF:
  ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``);
  reentrant checkpointing cannot serve ``torch.autograd.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch

from rayunlearn import UserError
from rayunlearn.forward import token_view
from rayunlearn.objectives.base import seq_logp


class EffectsError(UserError):
    """A G-effect request that cannot be served as asked (missing reference model or batch)."""


@dataclass
class RiskEffect:
    """The G-effect on one risk ("removal" or "retention").

    ``total`` = Σ by_parameter = Σ by_term. ``by_instance`` (forget instances in batch order,
    ``instance_ids`` their row ids) sums to the forget-side terms' share of ``total``
    (Σ_label∈forget side by_term[label]); retain-side terms have no per-forget-instance value.
    """

    risk: str
    total: float
    by_parameter: dict[str, float]
    by_term: dict[str, float]
    by_instance: Optional[np.ndarray] = None
    by_instance_term: dict[str, np.ndarray] = field(default_factory=dict)
    instance_ids: Optional[list[int]] = None
    cosine: float = float("nan")
    risk_value: float = float("nan")    # R itself (token-mean NLL) at these weights
    risk_grad_norm: float = float("nan")


@dataclass
class GEffectResult:
    """``removal`` and ``retention`` (None without a retain batch) :class:`RiskEffect`. ``tied``
    maps a reported parameter name to its aliases (tied input and output embeddings are one
    tensor: reported once, under the first name, and its value holds both the embedding-row and
    the LM-head contributions)."""

    removal: RiskEffect
    retention: Optional[RiskEffect]
    method: str
    term_sides: dict[str, str]
    term_losses: dict[str, float]
    objective_grad_norm: float
    tied: dict[str, list[str]] = field(default_factory=dict)
    # {risk: {parameter name: ∇R}} when asked for (``keep_risk_grads``): what the realised-update
    # effect (:func:`realised_effects`) dots with the parameter change of the optimiser step
    risk_grads: Optional[dict[str, dict[str, torch.Tensor]]] = None
    # per forget instance (``per_instance``): {term label: (B,) the term's own weight of each
    # instance} for weighted forget terms (NPO, TNPO, WTNPO, WGA) and {risk: (B,) ∇R·∇ log π(y_i|x_i)},
    # the unweighted GA PG-effect of the instance (GA's loss of it, summed, without the 1/N)
    instance_weights: dict[str, np.ndarray] = field(default_factory=dict)
    instance_ga: dict[str, np.ndarray] = field(default_factory=dict)

    def risks(self) -> dict[str, RiskEffect]:
        out = {"removal": self.removal}
        if self.retention is not None:
            out["retention"] = self.retention
        return out


def _resolve_method(method):
    from rayunlearn.objectives import Method, parse_method

    return method if isinstance(method, Method) else parse_method(method)


def tracked_parameters(model) -> tuple[list[tuple[str, torch.nn.Parameter]], dict[str, list[str]]]:
    """Trainable parameters, each tensor once (named_parameters' first name), and the aliases of
    shared tensors (tied embeddings)."""
    first: dict[int, str] = {}
    tied: dict[str, list[str]] = {}
    params = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if id(p) in first:
            tied.setdefault(first[id(p)], []).append(name)
            continue
        first[id(p)] = name
        params.append((name, p))
    return params, tied


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "to_local") and hasattr(t, "placements")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _acc_dtype(params) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for _, p in params) else torch.float32


def _dot(a, b, acc) -> Optional[torch.Tensor]:
    if a is None or b is None:
        return None
    a, b = _local(a), _local(b)
    return torch.dot(a.reshape(-1).to(acc), b.reshape(-1).to(acc))


class _Grads:
    """Gradients of scalar losses w.r.t. the tracked parameters, from graphs kept alive.

    Plain tensors: ``torch.autograd.grad`` (never touches ``.grad``). DTensor parameters
    (FSDP2): ``backward`` into ``.grad`` (FSDP2 reduce-scatters there), read and clear; the caller
    must keep unsharded parameters alive across the backward passes (see ``fsdp_keep_unsharded``)."""

    def __init__(self, params):
        self.params = [p for _, p in params]
        self.sharded = any(_is_dtensor(p) for p in self.params)

    def __call__(self, loss: torch.Tensor) -> list[Optional[torch.Tensor]]:
        if not loss.requires_grad:
            return [None] * len(self.params)
        if not self.sharded:
            return list(torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True))
        for p in self.params:
            p.grad = None
        loss.backward(retain_graph=True)
        out = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return out


def risk_nll(view) -> torch.Tensor:
    """Token-mean NLL over the answer tokens of this batch (the paper's risk R)."""
    n = view.mask.sum().clamp_min(1)
    return -(view.logps * view.mask).sum() / n


def gradient_effects(model, method, forget_batch: dict, retain_batch: Optional[dict] = None,
                     reference=None, per_instance: bool = True, ctx=None, *, ref_cache=None,
                     all_reduce: bool = True, token_counts: Optional[dict] = None,
                     accumulate_grad: bool = False, keep_risk_grads: bool = False) -> GEffectResult:
    """G-effects of `method` at the model's current weights (see the module docstring for the
    sign convention: e = ∇R·∇L, removal wants e_u < 0, retention wants e_r ≥ 0).

    Args:
        model: any HF causal LM (or a module with the same call signature).
        method: a method string ("npo+kl") or a ``rayunlearn.objectives.Method``.
        forget_batch / retain_batch: batches as in ARCHITECTURE.md ("Batches"); forget batches
            of refusal methods carry ``idk``. Without a retain batch there is no retention
            effect (and methods with retain terms are refused).
        reference: the frozen pre-unlearning model; required when the method needs it (unless
            ``ref_cache`` — one ``RefLogpCache`` for the forget view or {view: cache} — holds
            the reference log-probs of every row and no other ref field is needed).
        per_instance: also compute the per-forget-instance values (PG-effects) through hooks.
        ctx: ``ObjectiveContext`` (RMU's random direction comes from its seed).
        all_reduce: for DTensor (FSDP2) parameters, all-reduce the per-shard partial dot
            products (every rank gets the totals); False leaves per-rank partial sums.
        token_counts: optional {"forget"|"retain"|"idk": (token_count, seq_count)} for the
            objective's normalisation (the training loop's effective-batch counts).
        accumulate_grad: add the objective's gradient ∇L to ``.grad`` (a training step that also
            records: the step then needs no forward/backward of its own). Default False: every
            ``.grad`` is left exactly as it was.
        keep_risk_grads: return the risk gradients ∇R in ``result.risk_grads`` (on the device;
            the recorder dots them with the optimiser's parameter change: :func:`realised_effects`).

    Returns a :class:`GEffectResult`. Never changes weights; leaves every ``.grad`` as it was;
    removes every hook it adds, also on error.
    """
    method = _resolve_method(method)
    views_needed = set(method.views_needed)
    if "retain" in views_needed and retain_batch is None:
        raise EffectsError(f"method {method} has retain-side terms but no retain batch was given: "
                           f"pass retain_batch=...")
    if "idk" in views_needed and "idk" not in forget_batch:
        raise EffectsError(f"method {method} reads refusal answers but the forget batch has no 'idk' "
                           f"entry: build it with the refusal-style collate (ARCHITECTURE.md, Batches)")
    if method.needs_reference and reference is None and not _cache_suffices(method, forget_batch, ref_cache):
        raise EffectsError(f"method {method} needs the frozen reference model (the model before "
                           f"unlearning) but reference=None: pass reference=<the target model>")
    if ctx is None:
        from rayunlearn.objectives import ObjectiveContext

        ctx = ObjectiveContext()

    params, tied = tracked_parameters(model)
    if not params:
        raise EffectsError("the model has no trainable parameters (requires_grad=False everywhere)")
    names = [n for n, _ in params]
    acc = _acc_dtype(params)
    sharded = any(_is_dtensor(p) for _, p in params)
    if sharded and per_instance:
        per_instance = False   # documented gap: per-instance values under FSDP2 need full V rows
    saved_grads = [p.grad for _, p in params]
    tracker = None
    if per_instance:
        from rayunlearn.effects.hooks import InstanceTracker

        tracker = InstanceTracker(model, {id(p): n for n, p in params}, acc)
    grad_out: list = []
    try:
        if tracker is not None:
            tracker.install()
        return _compute(model, method, forget_batch, retain_batch, reference, ctx, ref_cache, params,
                        names, tied, acc, tracker, sharded and all_reduce,
                        token_counts or {}, grad_out if accumulate_grad else None, keep_risk_grads)
    finally:
        if tracker is not None:
            tracker.remove()
        for (_, p), g in zip(params, saved_grads):
            p.grad = g
        if grad_out:
            with torch.no_grad():
                for (_, p), g in zip(params, grad_out[0]):
                    if g is not None:
                        p.grad = g.detach() if p.grad is None else p.grad + g


def _caches(ref_cache) -> dict:
    """ref_cache may be one RefLogpCache (the forget view's) or {view: RefLogpCache}."""
    if ref_cache is None:
        return {}
    return dict(ref_cache) if isinstance(ref_cache, dict) else {"forget": ref_cache}


def _cache_suffices(method, forget_batch, ref_cache) -> bool:
    """True when the only reference quantities needed are log-probs of views whose caches hold
    every row of this batch."""
    caches = _caches(ref_cache)
    for v in ("forget", "retain", "idk"):
        ref = {n for n in method.needs(v) if n.startswith("ref_")}
        if not ref:
            continue
        batch = forget_batch if v == "forget" else forget_batch.get("idk") if v == "idk" else None
        if ref != {"ref_logps"} or v not in caches or batch is None or batch.get("row_ids") is None \
                or not caches[v].has(batch["row_ids"]):
            return False
    return True


def _view(model, batch, needs, reference, ref_cache, counts):
    tc, sc = counts if counts else (None, None)
    return token_view(model, batch, needs=needs, reference=reference, ref_cache=ref_cache,
                      token_count=tc, seq_count=sc)


def _compute(model, method, forget_batch, retain_batch, reference, ctx, ref_cache, params, names,
             tied, acc, tracker, reduce, token_counts, grad_out=None, keep_risk_grads=False) -> GEffectResult:
    grads = _Grads(params)
    plist = [p for _, p in params]
    with torch.enable_grad():
        # forget-side forwards (hooks capture activations here)
        if tracker is not None:
            tracker.capturing = True
        caches = _caches(ref_cache)
        views = {"forget": _view(model, forget_batch, method.needs("forget"), reference, caches.get("forget"),
                                 token_counts.get("forget"))}
        if "idk" in method.views_needed:
            views["idk"] = _view(model, forget_batch["idk"], method.needs("idk"), reference, caches.get("idk"),
                                 token_counts.get("idk"))
        if tracker is not None:
            tracker.capturing = False
        if retain_batch is not None:
            views["retain"] = _view(model, retain_batch, method.needs("retain"), reference, None,
                                    token_counts.get("retain"))
        per = method.per_example(views, ctx)
        risks = {"removal": risk_nll(views["forget"])}
        if retain_batch is not None:
            risks["retention"] = risk_nll(views["retain"])

        # risk gradients: kept on the device, one buffer per tensor and risk
        gR = {k: grads(r) for k, r in risks.items()}
        V = {k: {id(p): g for p, g in zip(plist, gR[k])} for k in risks}
        keys = list(V)
        B = int(forget_batch["input_ids"].shape[0])

        # per-term objective gradients; hooks armed during the forget-side backward
        term_dots: dict[str, dict[str, list]] = {k: {} for k in keys}
        gL_sum: Optional[list] = None
        term_losses = {}
        uncovered = set(tracker.uncovered()) if tracker is not None else set()
        fallback: dict[tuple[str, str], torch.Tensor] = {}
        for t in method.terms:
            loss_t = t.weight * per[t.label].sum()
            term_losses[t.label] = float(loss_t.detach())
            if tracker is not None and t.side == "forget":
                tracker.V = V
                tracker.label = t.label
                tracker.armed = True
            try:
                g_t = grads(loss_t)
            finally:
                if tracker is not None:
                    tracker.armed = False
            for k in keys:
                term_dots[k][t.label] = [_dot(V[k][id(p)], g, acc) for p, g in zip(plist, g_t)]
            if tracker is not None and t.side == "forget" and uncovered:
                _fallback_instances(fallback, t, per[t.label], plist, uncovered, V, acc, B)
            if gL_sum is None:
                gL_sum = list(g_t)
            else:
                gL_sum = [a if b is None else (b if a is None else a + b) for a, b in zip(gL_sum, g_t)]
            del g_t

        # the unweighted GA PG-effect per instance: ∇R·∇ log π(y_i|x_i) (summed answer
        # log-likelihood, GA's per-instance loss without its 1/N), for the paper's Fig. 5(b)
        if tracker is not None:
            ga = _GA_TERM
            ga_per = seq_logp(views["forget"].logps, views["forget"].mask)
            tracker.V, tracker.label, tracker.armed = V, ga.label, True
            try:
                grads(ga_per.sum())
            finally:
                tracker.armed = False
            if uncovered:
                _fallback_instances(fallback, ga, ga_per, plist, uncovered, V, acc, B)
        weights = {lab: w.detach().double().cpu().numpy() for lab, w in method.instance_weights.items()}

        # norms for the cosine
        normR = {k: [_dot(g, g, acc) for g in gR[k]] for k in risks}
        normL = [_dot(g, g, acc) for g in gL_sum]
        if grad_out is not None:
            grad_out.append(gL_sum)

    # one device->host transfer (and one all-reduce under FSDP2) for every scalar
    labels = [t.label for t in method.terms]
    vecs, layout = [], []
    zero = torch.zeros((), dtype=acc, device=plist[0].device if not _is_dtensor(plist[0])
                       else _local(plist[0]).device)

    def add(tag, lst):
        layout.append((tag, len(lst)))
        vecs.extend(x if x is not None else zero for x in lst)

    for k in keys:
        for lab in labels:
            add(("dot", k, lab), term_dots[k][lab])
    for k in risks:
        add(("normR", k), normR[k])
    add(("normL",), normL)
    flat = torch.stack([v.to(acc) for v in vecs])
    if reduce:
        import torch.distributed as dist

        dist.all_reduce(flat)
    host = flat.detach().cpu().double().numpy()
    table, i = {}, 0
    for tag, n in layout:
        table[tag] = host[i:i + n]
        i += n

    inst = {}
    if tracker is not None:
        for (k, lab), v in tracker.results.items():
            inst[(k, lab)] = v.detach().double().cpu().numpy()
        for (k, lab), v in fallback.items():
            inst[(k, lab)] = inst.get((k, lab), 0) + v.detach().double().cpu().numpy()

    row_ids = forget_batch.get("row_ids")
    ids = [int(r) for r in row_ids.tolist()] if row_ids is not None else list(range(B))
    normL_total = float(table[("normL",)].sum())
    sides = {t.label: t.side for t in method.terms}

    def build(k):
        per_param = sum(table[("dot", k, lab)] for lab in labels)
        by_term = {lab: float(table[("dot", k, lab)].sum()) for lab in labels}
        total = float(per_param.sum())
        nr = float(table[("normR", k)].sum())
        cos = total / np.sqrt(nr * normL_total) if nr > 0 and normL_total > 0 else float("nan")
        eff = RiskEffect(risk=k, total=total, by_parameter=dict(zip(names, per_param.tolist())),
                         by_term=by_term, cosine=float(cos), risk_value=float(risks[k].detach()),
                         risk_grad_norm=float(np.sqrt(nr)), instance_ids=ids)
        if tracker is not None:
            forget_labels = [lab for lab in labels if sides[lab] == "forget"]
            eff.by_instance_term = {lab: inst.get((k, lab), np.zeros(B)) for lab in forget_labels}
            eff.by_instance = sum(eff.by_instance_term.values(), np.zeros(B))
        return eff

    res = GEffectResult(
        removal=build("removal"),
        retention=build("retention") if "retention" in risks else None,
        method=str(method), term_sides=sides, term_losses=term_losses,
        objective_grad_norm=float(np.sqrt(normL_total)), tied=tied)
    if tracker is not None:
        res.instance_ga = {k: inst.get((k, _GA_TERM.label), np.zeros(B)) for k in risks}
        res.instance_weights = weights
    if keep_risk_grads:
        res.risk_grads = {k: {n: g for n, g in zip(names, gR[k]) if g is not None} for k in risks}
    return res


# the pseudo-term of the unweighted GA PG-effect (weight 1, never part of any total)
_GA_TERM = SimpleNamespace(label="ga_unweighted", weight=1.0)


def _fallback_instances(out, term, per_ex, plist, uncovered, V, acc, B) -> None:
    """Per-example autograd for parameters no hook handler covers (one pass per example,
    restricted to those tensors)."""
    sel = [p for p in plist if id(p) in uncovered]
    for i in range(B):
        gi = torch.autograd.grad(term.weight * per_ex[i], sel, retain_graph=True, allow_unused=True)
        for k, Vk in V.items():
            s = sum((_dot(Vk[id(p)], g, acc) for p, g in zip(sel, gi)
                     if g is not None and Vk[id(p)] is not None), torch.zeros((), dtype=acc))
            key = (k, term.label)
            if key not in out:
                out[key] = torch.zeros(B, dtype=acc)
            out[key][i] += s.cpu()


def parameter_snapshot(model) -> dict[str, torch.Tensor]:
    """θ_t of the tracked tensors (detached copies on their device): what
    :func:`realised_effects` subtracts θ_{t+1} from."""
    with torch.no_grad():
        return {n: p.detach().clone() for n, p in tracked_parameters(model)[0]}


def realised_effects(model, risk_grads: dict[str, dict[str, torch.Tensor]], before: dict[str, torch.Tensor],
                     all_reduce: bool = True) -> dict[str, dict[str, float]]:
    """{risk: {parameter name: ∇R(θ_t)·(θ_t − θ_{t+1})}} for the optimiser step that moved the
    model from `before` (:func:`parameter_snapshot`) to its current weights, with `risk_grads`
    taken at θ_t (``gradient_effects(..., keep_risk_grads=True)``).

    Divided by the step's lr this is the realised-update G-effect e_real: R(θ_{t+1}) − R(θ_t) =
    −∇R·(θ_t − θ_{t+1}) + O(‖Δθ‖²) whatever the optimiser did (momentum, Adam's
    preconditioning, weight decay, clipping), where −η·∇R·∇L holds for plain SGD only.
    DTensor (FSDP2) tensors are dotted shard by shard and the scalars all-reduced once."""
    params, _ = tracked_parameters(model)
    acc = _acc_dtype(params)
    keys = [(k, n) for k in risk_grads for n, _ in params if n in risk_grads[k] and n in before]
    cur = dict(params)
    with torch.no_grad():
        dots = [_dot(risk_grads[k][n], before[n] - cur[n].detach(), acc) for k, n in keys]
        if not dots:
            return {k: {} for k in risk_grads}
        flat = torch.stack(dots)
        if all_reduce and any(_is_dtensor(p) for _, p in params):
            import torch.distributed as dist

            dist.all_reduce(flat)
    host = flat.cpu().double().tolist()
    out: dict[str, dict[str, float]] = {k: {} for k in risk_grads}
    for (k, n), v in zip(keys, host):
        out[k][n] = v
    return out
