"""Live G-effect recording inside the unlearning loop.

For the training loop (``rayunlearn/train/callbacks.py`` is the real caller)::

    from rayunlearn.effects.recorder import build_probe, default_sink, make_recorder
    forget_probe, retain_probe = build_probe(cfg, benchmark, tokenizer, method, device)
    sink = default_sink(cfg.effects, results_dir)          # on the rank that sends
    rec = make_recorder(cfg.effects, model, method, forget_probe, retain_probe, reference, ctx,
                        sink, trial_id, rank=rank)
    for step in ...:                       # step = optimiser steps already taken (0, 1, ...)
        ... forward / backward of the training step (gradients in .grad) ...
        rec.before_step(step, lr, forget_batch=fb, retain_batch=rb)   # no-op unless due
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        rec.after_step(step)                                                     # no-op unless due
    rec.close()

- Due every ``cfg.every`` optimiser steps (``step % every == 0``); ``every == 0`` disables it.
- ``cfg.probe == "fixed"``: the fixed ``forget_probe`` / ``retain_probe`` batches (the loop
  builds them once with :func:`build_probe`: ``effects/probes.py`` says which rows); ``"step"``:
  the batches passed to ``before_step`` (the step's own micro-batch).
- ``before_step`` computes the exact (SGD) G-effects e = ∇R·∇L (``gradient_effects``; ``.grad``
  of the training step is left untouched) and keeps the risk gradients ∇R(θ_t) and a copy of
  θ_t until ``after_step``.
- ``after_step`` (just after ``optimizer.step()``) dots ∇R(θ_t) with the parameter change of that
  step: the **realised-update** G-effect e_real = ∇R·(θ_t − θ_{t+1})/lr (estimator "realised",
  per parameter tensor and total), exact to first order whatever the optimiser did (momentum,
  Adam, weight decay, clipping) — then re-measures both probe risks (no grad) and writes the
  steps row: predicted changes −lr·e (SGD) and −lr·e_real beside the measured change. The SGD
  prediction refers to the probe's objective gradient (it matches plain SGD on the probe only);
  the realised one to the update the optimiser really made, on whatever batch.
- ``cumulative_*`` = Σ over recorded steps of lr·e·every (each recorded step stands for
  ``every`` optimiser steps; with every = 1 this is exactly Σ_t η_t·e_t, the first-order
  prediction of −(R_T − R_0)); ``cumulative_*_realised`` the same with e_real.
- ``cfg.estimator == "ema"``: the reference code's estimator instead (``effects/ema.py``) on the
  probe split into micro-batches of 4; rows with estimator "ema", kind "group" (the 5 buckets)
  and "total"; the steps row carries the EMA totals.
- Data parallelism: with replicated weights (DDP) only rank 0 records; with sharded (FSDP2)
  parameters every rank computes (the engine all-reduces its vector of scalars, so every rank
  holds the complete values) and rank 0 alone sends them (the others get ``rank > 0``). No
  rank ever sends a partial sum, so the aggregator's rank-combining path is not needed here
  (it stays available to callers of ``gradient_effects(..., all_reduce=False)``).
- Where rows go (:func:`default_sink`): the sweep's aggregator actor when ``effects.aggregator``
  names one — a :class:`~rayunlearn.effects.actor.RaySink`, asynchronous and batched; else a
  :class:`~rayunlearn.effects.actor.LocalSink` under the results directory the caller passes.
  Both write ``<results>/effects/<trial_id>/{geffects,steps}.parquet`` with the same rows.
- Resume: :meth:`Recorder.resume` ``(start)`` (the loop calls it once, before the first step,
  with the step it starts from, 0 for a fresh start) has the sink keep only the rows of steps
  ``< start`` — a retried or resumed attempt re-sends the later steps and they replace the
  earlier attempt's rows, never duplicate them — and continues the cumulative sums from the
  last kept steps row.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from rayunlearn import UserError
from rayunlearn.data.examples import (collate_examples, encode_records, refusal_records, retain_split,
                                      to_device)
from rayunlearn.effects import rows as R
from rayunlearn.effects.engine import (_is_dtensor, _resolve_method, gradient_effects,
                                       parameter_snapshot, realised_effects, risk_nll, tracked_parameters)
from rayunlearn.effects.probes import probe_rows
from rayunlearn.forward import token_view


class Recorder:
    """See the module docstring. Build with :func:`make_recorder`."""

    def __init__(self, cfg, model, method, forget_probe, retain_probe, reference, ctx, sink,
                 trial_id: str, method_str: Optional[str] = None, rank: int = 0, ref_cache=None):
        self.cfg = cfg
        self.model = model
        self.method = _resolve_method(method)
        self.method_str = method_str or str(self.method)
        self.forget_probe, self.retain_probe = forget_probe, retain_probe
        self.reference, self.ctx, self.sink = reference, ctx, sink
        self.trial_id = str(trial_id)
        self.rank = int(rank)
        self.ref_cache = ref_cache
        sharded = any(_is_dtensor(p) for _, p in tracked_parameters(model)[0])
        self.computes = cfg.every > 0 and (sharded or self.rank == 0)
        self.sends = self.computes and self.rank == 0
        self._pending: Optional[dict] = None
        self.cum = {"removal": 0.0, "retention": 0.0, "removal_realised": 0.0, "retention_realised": 0.0}

    def resume(self, start: int) -> Optional[dict]:
        """Before the first step of a run that starts at optimiser step `start` (0: from
        scratch): drop this trial's rows of steps >= `start` from the sink (see module
        docstring) and continue the cumulative sums from the last kept steps row. Returns that
        row (None when there is none, or on ranks that do not send)."""
        if not self.sends or self.sink is None or not hasattr(self.sink, "resume"):
            return None
        last = self.sink.resume(self.trial_id, int(start))
        self.cum = {k: 0.0 for k in self.cum}
        if last:
            for k in self.cum:
                v = last.get(f"cumulative_{k}")
                if v is not None and not math.isnan(v):
                    self.cum[k] = float(v)
        return last

    def due(self, step: int) -> bool:
        return self.computes and step % self.cfg.every == 0

    def _batches(self, forget_batch, retain_batch):
        if self.cfg.probe == "step":
            if forget_batch is None:
                raise ValueError("effects.probe='step' needs forget_batch= (and retain_batch=) in before_step")
            return forget_batch, retain_batch
        return self.forget_probe, self.retain_probe

    def before_step(self, step: int, lr: float, forget_batch=None,
                    retain_batch=None, token_counts=None):
        """Compute and send the G-effect rows of this step (call before ``optimizer.step()``)."""
        if not self.due(step):
            return None
        fb, rb = self._batches(forget_batch, retain_batch)
        if self.cfg.estimator == "ema":
            return self._before_ema(step, lr, fb, rb)
        # θ_t before any forward: under FSDP2 the parameters are still the sharded DTensors here,
        # as ∇R (read from .grad) and θ_{t+1} after the step are
        before = parameter_snapshot(self.model)
        res = gradient_effects(self.model, self.method, fb, rb, reference=self.reference,
                               per_instance=self.cfg.per_instance, ctx=self.ctx, ref_cache=self.ref_cache,
                               token_counts=token_counts, keep_risk_grads=True)
        if self.sends:
            self.sink.add("geffects", R.result_rows(res, self.trial_id, self.method_str, step),
                          trial_id=self.trial_id, step=step, part="exact")
        tot = {"removal": res.removal.total,
               "retention": res.retention.total if res.retention else math.nan}
        fshare = {k: sum(v for lab, v in eff.by_term.items() if res.term_sides[lab] == "forget")
                  for k, eff in res.risks().items()}
        # ∇R(θ_t) and θ_t, for the realised update's dot product after the optimiser step
        self._pending = dict(
            step=step, lr=float(lr), batches=(fb, rb), tot=tot,
            risk_grads=res.risk_grads, before=before,
            values=dict(cosine_removal=res.removal.cosine,
                        cosine_retention=res.retention.cosine if res.retention else math.nan,
                        risk_removal=res.removal.risk_value,
                        risk_retention=res.retention.risk_value if res.retention else math.nan,
                        removal_forget_terms=fshare["removal"],
                        retention_forget_terms=fshare.get("retention", math.nan),
                        objective_grad_norm=res.objective_grad_norm))
        res.risk_grads = None      # the recorder holds them until after_step
        return res

    def _before_ema(self, step, lr, fb, rb):
        from rayunlearn.effects.ema import ema_effects

        eff = ema_effects(self.model, self.method, fb, rb, reference=self.reference, ctx=self.ctx)
        if self.sends:
            rbld = R.RowBuilder(self.trial_id, self.method_str, step)
            for risk, e in eff.items():
                rbld.add(risk, "total", e["total"], "ema")
                for bucket, v in e["buckets"].items():
                    rbld.add(risk, "group", v, "ema", group=bucket)
            self.sink.add("geffects", rbld.cols, trial_id=self.trial_id, step=step, part="ema")
        with torch.no_grad():
            rr = float(risk_nll(token_view(self.model, rb))) if rb is not None else math.nan
            rf = float(risk_nll(token_view(self.model, fb)))
        self._pending = dict(step=step, lr=float(lr), batches=(fb, rb),
                             tot={"removal": eff["removal"]["total"], "retention": eff["retention"]["total"]},
                             risk_grads=None, before=None, values=dict(risk_removal=rf, risk_retention=rr))
        return eff

    def after_step(self, step: int) -> Optional[dict]:
        """After the optimiser step: the realised-update effect of that step (rows with
        estimator "realised"), the probe risks re-measured, and the steps row."""
        pend = self._pending
        if pend is None or pend["step"] != step:
            return None
        self._pending = None
        fb, rb = pend["batches"]
        lr, tot, every = pend["lr"], dict(pend["tot"]), self.cfg.every
        # predicted change of the realised update: −∇R·(θ_t − θ_{t+1}) (= −lr·e_real)
        real_change = {"removal": math.nan, "retention": math.nan}
        if pend["risk_grads"] is not None:
            dots = realised_effects(self.model, pend["risk_grads"], pend["before"])
            pend["risk_grads"] = pend["before"] = None
            for k, by_param in dots.items():
                real_change[k] = -sum(by_param.values())
            if self.sends:
                self.sink.add("geffects", R.realised_rows(dots, lr, self.trial_id, self.method_str, step),
                              trial_id=self.trial_id, step=step, part=R.REALISED)
        for k in ("removal", "retention"):
            tot[f"{k}_realised"] = -real_change[k] / lr if lr else math.nan
        with torch.no_grad():
            after_f = float(risk_nll(token_view(self.model, fb)))
            after_r = float(risk_nll(token_view(self.model, rb))) if rb is not None else math.nan
        for k in ("removal", "retention"):
            if not math.isnan(tot[k]):
                self.cum[k] += lr * tot[k] * every
            if not math.isnan(real_change[k]):
                self.cum[f"{k}_realised"] -= real_change[k] * every
        v = pend["values"]
        row = dict(
            lr=lr, **tot,
            predicted_removal_change=-lr * tot["removal"],
            measured_removal_change=after_f - v["risk_removal"],
            predicted_retention_change=-lr * tot["retention"],
            measured_retention_change=after_r - v["risk_retention"],
            predicted_removal_change_realised=real_change["removal"],
            predicted_retention_change_realised=real_change["retention"],
            every=float(every), **{f"cumulative_{k}": c for k, c in self.cum.items()}, **v)
        if self.sends:
            self.sink.add("steps", R.step_row(self.trial_id, self.method_str, step, **row),
                          trial_id=self.trial_id, step=step, part=self.cfg.estimator)
        return row

    def _flush_pending(self) -> None:
        """Send the pending steps row without a measured change (no next step to measure)."""
        pend = self._pending
        if pend is None:
            return
        self._pending = None
        if self.sends:
            tot, v = pend["tot"], pend["values"]
            self.sink.add("steps", R.step_row(
                self.trial_id, self.method_str, pend["step"], lr=pend["lr"], removal=tot["removal"],
                retention=tot["retention"], every=float(self.cfg.every), **v),
                trial_id=self.trial_id, step=pend["step"], part=self.cfg.estimator)

    def close(self) -> None:
        self._flush_pending()
        if self.sends and self.sink is not None:
            self.sink.close()


def make_recorder(effects_cfg, model, method, forget_probe, retain_probe, reference=None, ctx=None,
                  sink=None, trial_id: str = "run", method_str: Optional[str] = None, rank: int = 0,
                  ref_cache=None) -> Recorder:
    """A :class:`Recorder` for the unlearning loop (usage in the module docstring): `effects_cfg`
    an ``EffectsConfig``, the fixed probe batches (:func:`build_probe`), the frozen `reference`
    (or `ref_cache`: {view: RefLogpCache}) when the method needs one, a `sink` (on the rank that
    sends: :func:`default_sink`) and the `trial_id` its rows carry."""
    return Recorder(effects_cfg, model, method, forget_probe, retain_probe, reference, ctx, sink,
                    trial_id, method_str, rank, ref_cache)


def default_sink(effects_cfg, out_dir):
    """The sink of a training-loop recorder: a RaySink to the aggregator actor named by
    ``effects.aggregator`` (a sweep sets it), else a LocalSink writing under `out_dir` (the
    results directory: rows go to ``<out_dir>/effects/<trial_id>/``). A named actor that cannot
    be reached is an error."""
    from rayunlearn.effects.actor import LocalSink, RaySink, get_aggregator

    name = effects_cfg.aggregator
    if not name:
        return LocalSink(str(out_dir))
    import ray      # only here: a run without a sweep's aggregator runs where Ray is not installed

    if not ray.is_initialized():
        problem = "Ray is not running in this process"
    else:
        try:
            return RaySink(get_aggregator(name))
        except ValueError:
            problem = "no actor of that name is alive in the Ray cluster"
    raise UserError(f"effects.aggregator={name!r}: {problem}; it must name the G-effect aggregator actor "
                    f"of a running sweep (rayunlearn.effects.actor.make_aggregator). Leave "
                    f"effects.aggregator unset to write the tables locally.")


def build_probe(cfg, benchmark, tokenizer, method, device=None) -> tuple[dict, Optional[dict]]:
    """The fixed probes of an ``UnlearnConfig`` as collated batches (``effects/probes.py``: the
    removal probe stratified over every forget author, with its refusal batch for refusal
    methods; the retention probe over retain authors and world facts). Forget row ids are the
    rows' positions in the forget split (what the reference log-prob caches are keyed by)."""
    method = _resolve_method(method)
    eff = cfg.effects
    rows = probe_rows(benchmark, cfg.data.forget_split, eff.probe_size, eff.retain_probe_size)
    forget_all = benchmark.split(cfg.data.forget_split)
    pad = tokenizer.pad_token_id

    def encoded(records, ids):
        examples = encode_records(records, tokenizer, cfg.data)
        for ex, i in zip(examples, ids):
            ex["row_id"] = i
        return examples

    fb = collate_examples(encoded([forget_all[i] for i in rows.forget], rows.forget), pad)
    if "idk" in method.views_needed:
        idk = refusal_records(forget_all, benchmark.refusals, cfg.train.seed)
        fb["idk"] = collate_examples(encoded([idk[i] for i in rows.forget], rows.forget), pad)
    retain_all = benchmark.split(retain_split(cfg.data.forget_split))
    non_targeted = [retain_all[i] for i in rows.retain] + \
        [{"question": benchmark.split(s)[i]["question"], "answer": benchmark.split(s)[i]["answer"]}
         for s, i in rows.world]
    rb = collate_examples(encode_records(non_targeted, tokenizer, cfg.data), pad)
    return to_device(fb, device or "cpu"), to_device(rb, device or "cpu")
