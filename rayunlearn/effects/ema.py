"""The G-effect reference code's estimator (for fidelity comparisons only; estimator "ema").

Per micro-batch: three separate forward+backward passes — the forget risk R_u, the objective,
the retain risk R_r on the paired retain micro-batch — each parameter gradient copied into its
own buffer and smoothed with an EMA ``g ← 0.6·g_old + 0.4·g_new`` (the first call initialises
with g_new); the per-parameter dot products are reported in the code's 5 buckets (embed,
module1 = blocks 0–9, module2 = 10–19, module3 = 20+ and the final norm, lm). There are no
per-instance values. The reference code copied every gradient to the CPU; ``copy_to_host=True``
reproduces that (the bench uses it as the baseline), the default keeps the buffers on the
device in float32.
"""

from __future__ import annotations

import torch

from rayunlearn.effects import groups
from rayunlearn.effects.engine import _resolve_method, risk_nll, tracked_parameters
from rayunlearn.forward import token_view


class EmaEstimator:
    """EMA estimates of ∇R_u, ∇L and ∇R_r over consecutive micro-batches (restart with a new
    instance, as the reference code restarts per checkpoint)."""

    def __init__(self, model, method, reference=None, ctx=None, old: float = 0.6,
                 copy_to_host: bool = False):
        from rayunlearn.objectives import ObjectiveContext

        self.model = model
        self.method = _resolve_method(method)
        self.reference = reference
        self.ctx = ctx if ctx is not None else ObjectiveContext()
        self.old = float(old)
        self.copy_to_host = copy_to_host
        self.params, _ = tracked_parameters(model)
        self.ema: dict[str, dict[str, torch.Tensor]] = {"unlearn": {}, "objective": {}, "retain": {}}
        self.updates = 0

    def _backward_copy(self, loss: torch.Tensor, which: str) -> None:
        for _, p in self.params:
            p.grad = None
        loss.backward()
        buf = self.ema[which]
        for name, p in self.params:
            g = p.grad
            if g is None:
                if which != "objective":    # the code stores zeros only for the objective
                    continue
                g = torch.zeros_like(p)
            g = g.detach().to("cpu" if self.copy_to_host else g.device, torch.float32, copy=True)
            if name in buf:
                buf[name].mul_(self.old).add_(g, alpha=1.0 - self.old)
            else:
                buf[name] = g
            p.grad = None

    def update(self, forget_batch: dict, retain_batch: dict) -> None:
        """One micro-batch: three forward+backward passes, EMA of each gradient."""
        m = self.method
        saved = [p.grad for _, p in self.params]
        try:
            with torch.enable_grad():
                self._backward_copy(risk_nll(token_view(self.model, forget_batch)), "unlearn")
                views = {"forget": token_view(self.model, forget_batch, m.needs("forget"), self.reference)}
                if "idk" in m.views_needed:
                    views["idk"] = token_view(self.model, forget_batch["idk"], m.needs("idk"), self.reference)
                if "retain" in m.views_needed:
                    views["retain"] = token_view(self.model, retain_batch, m.needs("retain"), self.reference)
                per = m.per_example(views, self.ctx)
                loss = sum(t.weight * per[t.label].sum() for t in m.terms)
                self._backward_copy(loss, "objective")
                self._backward_copy(risk_nll(token_view(self.model, retain_batch)), "retain")
        finally:
            for (_, p), g in zip(self.params, saved):
                p.grad = g
        self.updates += 1

    def effects(self) -> dict[str, dict]:
        """{"removal"|"retention": {"total": float, "by_parameter": {name: v},
        "buckets": {bucket: v}}} from the current EMA buffers."""
        out = {}
        obj = self.ema["objective"]
        for risk, which in (("removal", "unlearn"), ("retention", "retain")):
            by_param = {}
            for name, g in self.ema[which].items():
                if name in obj:
                    by_param[name] = float(torch.dot(g.reshape(-1), obj[name].reshape(-1)))
            buckets = {b: 0.0 for b in groups.CODE_BUCKETS}
            for name, v in by_param.items():
                buckets[groups.code_bucket(name)] += v
            out[risk] = {"total": sum(by_param.values()), "by_parameter": by_param, "buckets": buckets}
        return out


def ema_effects(model, method, forget_batch: dict, retain_batch: dict, reference=None, ctx=None,
                micro_batch_size: int = 4, copy_to_host: bool = False) -> dict:
    """Run the EMA estimator over the micro-batches of `forget_batch` (paired with consecutive
    micro-batches of `retain_batch`, cycled) and return :meth:`EmaEstimator.effects`."""
    est = EmaEstimator(model, method, reference, ctx, copy_to_host=copy_to_host)
    B = int(forget_batch["input_ids"].shape[0])
    Br = int(retain_batch["input_ids"].shape[0])
    for j, s in enumerate(range(0, B, micro_batch_size)):
        fb = _slice(forget_batch, s, s + micro_batch_size)
        rs = (j * micro_batch_size) % Br
        rb = _slice(retain_batch, rs, rs + micro_batch_size)
        est.update(fb, rb)
    return est.effects()


def _slice(batch: dict, a: int, b: int) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = _slice(v, a, b) if isinstance(v, dict) else v[a:b]
    return out
