"""G-effects (docs/spec/GEFFECT.md): the engine, grouping, live recording, sinks/actors, replay.

Sign convention: e = ∇R·∇L; removal wants e_u < 0, retention wants e_r ≥ 0.

- ``gradient_effects(model, method, forget_batch, retain_batch, reference=None,
  per_instance=True, ctx=None) -> GEffectResult`` (``engine.py``)
- ``groups``: blocks, attention/MLP, the paper's buckets, the reference code's 5 buckets
- ``make_recorder(...) -> Recorder`` for the unlearning loop (``recorder.py``): the exact
  effect before each recorded step, the realised-update effect ∇R·(θ_t − θ_{t+1})/lr after it
- ``probes.probe_rows``: the fixed probes (stratified over forget authors; retain authors and
  world facts; held out of the regulariser's rows)
- ``LocalSink`` / ``RaySink`` + ``make_aggregator`` (the ``GEffectAggregator`` Ray actor)
- ``replay.replay_command(run_dir, preset, overrides)``: offline on saved checkpoints
"""

from rayunlearn.effects.engine import (EffectsError, GEffectResult, RiskEffect, gradient_effects,
                                       risk_nll, tracked_parameters)


def make_recorder(*args, **kwargs):
    """See :func:`rayunlearn.effects.recorder.make_recorder`."""
    from rayunlearn.effects.recorder import make_recorder as _make

    return _make(*args, **kwargs)


def __getattr__(name):
    if name in ("LocalSink", "RaySink", "make_aggregator", "GEffectAggregator"):
        from rayunlearn.effects import actor

        return getattr(actor, name)
    raise AttributeError(name)


__all__ = ["EffectsError", "GEffectResult", "RiskEffect", "gradient_effects", "make_recorder",
           "risk_nll", "tracked_parameters"]
