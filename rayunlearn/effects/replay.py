"""Offline G-effects on a run's saved checkpoints (``rayunlearn effects RUN_DIR``), as the paper
does with checkpoints every 5 steps.

Loads the run's ``config.yaml`` (an ``UnlearnConfig``; ``key=value`` overrides apply, e.g.
``effects.probe_size=32 effects.estimator=ema``), the target model (step 0, and the frozen
reference when the method needs one), every ``checkpoints/step-<k>/model.safetensors``, builds
the fixed probe (``recorder.build_probe``) and writes
``<run_dir>/effects/replay/geffects.parquet`` and ``steps.parquet`` (trial id "replay"; the
steps table holds the totals, cosines and the probe risks at each checkpoint, and
``measured_*_change`` = the risk change to the next checkpoint next to the first-order
prediction −Σ lr·e over the steps in between, lr from ``log.jsonl``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from rayunlearn import UserError
from rayunlearn.effects import rows as R
from rayunlearn.effects.actor import LocalSink
from rayunlearn.effects.engine import gradient_effects, risk_nll
from rayunlearn.forward import token_view
from rayunlearn.models.checkpoints import checkpoint_weights, load_weights
from rayunlearn.runs import CONFIG_FILE, LOG_FILE, effects_table


def replay(run_dir, model, method, forget_probe, retain_probe, reference=None, ctx=None,
           effects_cfg=None, lrs: Optional[dict] = None, include_step0: bool = True,
           trial_id: str = "replay", progress: bool = True) -> Path:
    """Compute the G-effects of `method` on the probe at the current weights of `model` (step 0,
    when `include_step0`) and at each saved checkpoint of `run_dir` (weights loaded into
    `model`, which is modified), and write ``<run_dir>/effects/<trial_id>/*.parquet``."""
    run_dir = Path(run_dir)
    ckpts = checkpoint_weights(run_dir)
    if not ckpts and not include_step0:
        raise UserError(f"{run_dir} has no checkpoints/step-<k>/model.safetensors; train with "
                        f"train.checkpoint_every=5 to replay G-effects")
    per_instance = True if effects_cfg is None else effects_cfg.per_instance
    estimator = "exact" if effects_cfg is None else effects_cfg.estimator
    sink = LocalSink(str(run_dir))
    method_str = str(method)
    points = ([(0, None)] if include_step0 else []) + list(ckpts)
    records = []
    prog = _progress(progress, len(points))
    with prog as bar:
        for k, path in points:
            if path is not None:
                load_weights(path.parent, model)
            if estimator == "ema":
                from rayunlearn.effects.ema import ema_effects

                eff = ema_effects(model, method, forget_probe, retain_probe, reference, ctx)
                rb = R.RowBuilder(trial_id, method_str, k)
                for risk, e in eff.items():
                    rb.add(risk, "total", e["total"], "ema")
                    for bucket, v in e["buckets"].items():
                        rb.add(risk, "group", v, "ema", group=bucket)
                sink.add("geffects", rb.cols, trial_id=trial_id, step=k, part="ema")
                with torch.no_grad():
                    rf = float(risk_nll(token_view(model, forget_probe)))
                    rr = float(risk_nll(token_view(model, retain_probe)))
                records.append(dict(step=k, removal=eff["removal"]["total"],
                                    retention=eff["retention"]["total"], risk_removal=rf, risk_retention=rr))
            else:
                res = gradient_effects(model, method, forget_probe, retain_probe, reference=reference,
                                       per_instance=per_instance, ctx=ctx)
                sink.add("geffects", R.result_rows(res, trial_id, method_str, k), trial_id=trial_id,
                         step=k, part="exact")
                records.append(dict(step=k, removal=res.removal.total, retention=res.retention.total,
                                    cosine_removal=res.removal.cosine, cosine_retention=res.retention.cosine,
                                    risk_removal=res.removal.risk_value, risk_retention=res.retention.risk_value,
                                    objective_grad_norm=res.objective_grad_norm))
            bar.advance()
    # first-order prediction between consecutive checkpoints: -Σ_{t in [k, k')} lr_t·e(k)
    cum = {"removal": 0.0, "retention": 0.0}
    for i, rec in enumerate(records):
        row = dict(rec)
        k = row.pop("step")
        if i + 1 < len(records):
            k2 = records[i + 1]["step"]
            lr_sum = sum((lrs or {}).get(t, math.nan) for t in range(k + 1, k2 + 1)) if lrs else math.nan
            row["lr"] = lr_sum / (k2 - k) if lrs else math.nan
            for r in ("removal", "retention"):
                row[f"predicted_{r}_change"] = -lr_sum * rec[r]
                row[f"measured_{r}_change"] = records[i + 1][f"risk_{r}"] - rec[f"risk_{r}"]
                if not math.isnan(lr_sum):
                    cum[r] += lr_sum * rec[r]
                row[f"cumulative_{r}"] = cum[r]
        sink.add("steps", R.step_row(trial_id, method_str, k, **row), trial_id=trial_id, step=k,
                 part=estimator)
    sink.close()
    return effects_table(run_dir, trial_id, "steps").parent


def _progress(enabled: bool, total: int):
    import contextlib

    if not enabled:
        class _Null:
            def advance(self):
                pass

        return contextlib.nullcontext(_Null())
    from rich.progress import Progress

    class _Bar:
        def __init__(self):
            self.p = Progress(transient=True)
            self.t = None

        def __enter__(self):
            self.p.__enter__()
            self.t = self.p.add_task("G-effects on checkpoints", total=total)
            return self

        def __exit__(self, *exc):
            return self.p.__exit__(*exc)

        def advance(self):
            self.p.advance(self.t)

    return _Bar()


def replay_command(run_dir: str, preset: Optional[str] = None, overrides: Optional[list] = None) -> int:
    """``rayunlearn effects RUN_DIR [key=value ...]``: G-effects on every saved checkpoint of an
    unlearning run, written to ``RUN_DIR/effects/replay/``."""
    import yaml

    from rayunlearn.config import UnlearnConfig, load_config
    from rayunlearn.io import read_jsonl
    from rayunlearn.objectives import ObjectiveContext, parse_method

    run = Path(run_dir)
    cfg_path = run / CONFIG_FILE
    if not cfg_path.exists():
        raise UserError(f"{run} is not an unlearning run directory (no config.yaml); pass the "
                        f"directory `rayunlearn unlearn` wrote (train.out / trials/<id>)")
    saved = yaml.safe_load(cfg_path.read_text()) or {}
    cfg = load_config(UnlearnConfig, preset, overrides, data=saved)
    if not checkpoint_weights(run):
        raise UserError(f"{run} has no checkpoints/step-<k>/model.safetensors; rerun the unlearning "
                        f"with train.checkpoint_every=5 (the paper's spacing) to replay G-effects")
    from rayunlearn.data import load_benchmark
    from rayunlearn.models import load_model

    method = parse_method(cfg.method, allow_no_forget=cfg.allow_no_forget)
    model, tokenizer = load_model(cfg.model, path=cfg.target)
    reference = None
    if method.needs_reference:
        reference, _ = load_model(cfg.model, path=cfg.target)
        reference.requires_grad_(False)
    from rayunlearn.effects.recorder import build_probe

    benchmark = load_benchmark(cfg.data)
    fb, rb = build_probe(cfg, benchmark, tokenizer, method)
    lrs = {int(r["step"]): float(r["lr"]) for r in read_jsonl(run / LOG_FILE) if "lr" in r and "step" in r}
    out = replay(run, model, method, fb, rb, reference=reference, ctx=ObjectiveContext(seed=cfg.train.seed),
                 effects_cfg=cfg.effects, lrs=lrs)
    print(f"wrote G-effects of {len(checkpoint_weights(run)) + 1} checkpoints to {out}")
    return 0
