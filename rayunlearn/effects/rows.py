"""The long-format G-effect rows (ARCHITECTURE.md, "Results layout"), built as column dicts;
their Arrow schemas are part of the results contract (``rayunlearn.runs``).

``geffects.parquet``: one row per value — trial_id, method, step, risk, parameter, layer, group,
kind ("parameter"|"instance"|"term"|"total"|"group"|"instance_weight"|"instance_ga_unweighted"), term, instance, value, estimator
("exact"|"ema"|"realised"). ``steps.parquet``: one row per recorded step (STEP_FIELDS).

Rows travel as column dicts ``{column: list}`` (compact to send to an actor).
"""

from __future__ import annotations

import math

from rayunlearn.effects import groups
from rayunlearn.runs import (EFFECT_SCHEMAS, GEFFECT_SCHEMA, INSTANCE_GA_KIND,  # noqa: F401  (re-exported)
                             INSTANCE_WEIGHT_KIND, REALISED, STEP_FIELDS, STEPS_SCHEMA)


def empty_columns(table: str) -> dict[str, list]:
    return {f.name: [] for f in EFFECT_SCHEMAS[table]}


class RowBuilder:
    """Accumulates geffects rows as columns."""

    def __init__(self, trial_id: str, method: str, step: int):
        self.trial_id, self.method, self.step = trial_id, method, int(step)
        self.cols = empty_columns("geffects")

    def add(self, risk, kind, value, estimator="exact", parameter="", term="", instance=-1,
            layer=None, group=None, n_blocks=0):
        if layer is None:
            layer = groups.block_index(parameter) if parameter else -1
        if group is None:
            group = groups.paper_group(parameter, n_blocks) if parameter else ""
        c = self.cols
        c["trial_id"].append(self.trial_id)
        c["method"].append(self.method)
        c["step"].append(self.step)
        c["risk"].append(risk)
        c["parameter"].append(parameter)
        c["layer"].append(int(layer))
        c["group"].append(group)
        c["kind"].append(kind)
        c["term"].append(term)
        c["instance"].append(int(instance))
        c["value"].append(float(value))
        c["estimator"].append(estimator)

    def __len__(self) -> int:
        return len(self.cols["value"])


def result_rows(result, trial_id: str, method: str, step: int, per_parameter: bool = True) -> dict:
    """A :class:`GEffectResult` -> geffects columns, estimator "exact": per-parameter, per-term,
    per-instance and total rows, and per forget instance its objective weights and unweighted GA
    PG-effect (kinds ``INSTANCE_WEIGHT_KIND`` / ``INSTANCE_GA_KIND``, see ``rayunlearn.runs``)."""
    rb = RowBuilder(trial_id, method, step)
    for eff in (result.removal, result.retention):
        if eff is None:
            continue
        n = groups.num_blocks(eff.by_parameter)
        rb.add(eff.risk, "total", eff.total)
        for lab, v in eff.by_term.items():
            rb.add(eff.risk, "term", v, term=lab)
        if per_parameter:
            for name, v in eff.by_parameter.items():
                rb.add(eff.risk, "parameter", v, parameter=name, n_blocks=n)
        if eff.by_instance is not None and eff.instance_ids is not None:
            for rid, v in zip(eff.instance_ids, eff.by_instance):
                rb.add(eff.risk, "instance", v, instance=rid)
    ids = result.removal.instance_ids
    for label, w in result.instance_weights.items():
        for rid, v in zip(ids, w):
            rb.add("", INSTANCE_WEIGHT_KIND, v, term=label, instance=rid)
    for risk, values in result.instance_ga.items():
        for rid, v in zip(ids, values):
            rb.add(risk, INSTANCE_GA_KIND, v, instance=rid)
    return rb.cols


def realised_rows(dots: dict[str, dict[str, float]], lr: float, trial_id: str, method: str,
                  step: int) -> dict:
    """The realised-update G-effect e_real = ∇R·(θ_t − θ_{t+1})/lr as geffects columns
    (estimator "realised"): per parameter tensor and total per risk (`dots`:
    ``engine.realised_effects``); NaN when lr = 0 (the change itself is in steps.parquet)."""
    rb = RowBuilder(trial_id, method, step)
    for risk, by_param in dots.items():
        n = groups.num_blocks(by_param)
        scale = 1.0 / lr if lr else math.nan
        rb.add(risk, "total", sum(by_param.values()) * scale, REALISED)
        for name, v in by_param.items():
            rb.add(risk, "parameter", v * scale, REALISED, parameter=name, n_blocks=n)
    return rb.cols


def step_row(trial_id: str, method: str, step: int, **values) -> dict:
    """One steps.parquet row as columns; missing fields are NaN."""
    unknown = set(values) - set(STEP_FIELDS)
    if unknown:
        raise KeyError(f"unknown steps.parquet fields {sorted(unknown)}")
    cols = {"trial_id": [trial_id], "method": [method], "step": [int(step)]}
    for f in STEP_FIELDS:
        v = values.get(f)
        cols[f] = [float("nan") if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)]
    return cols
