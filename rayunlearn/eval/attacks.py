"""Does it stay forgotten? Attacks on an unlearned model, evaluated like the model itself.

Output metrics overstate forgetting: a few finetuning steps on related (or unrelated) data, or
4-bit weight quantization, bring much "forgotten" knowledge back (Zhang et al., ICLR 2025; Deeb &
Roger 2024; Łucki et al. 2024). Each entry of ``eval.attacks`` (:class:`rayunlearn.config.AttackConfig`)
attacks a *copy* of the model after its final evaluation, evaluates the copy with the same
evaluator (same items, references and settings), and reports ``attack.<name>.<metric>``
(``runs.ATTACK_PREFIX``) in metrics.json, hence in result.json and trials.parquet:

* ``relearn`` (``data: forget``): ``steps`` steps of plain SGD (``optimizer: sgd``, the default;
  or AdamW, constant ``lr``, no weight decay) on the token-mean NLL of ``batch_size`` rows each,
  cycling through a seeded shuffle of the *relearning subset* (deterministic given ``seed``):
  the first ``size`` forget items taken author by author in a seeded order of the authors of the
  held-out split's *selection* part (:func:`relearn_split`; the report part is never
  relearned). Only the items of authors with no relearned item are evaluated, so the subset and
  the evaluated items are disjoint, and no evaluated item shares an author (and so its facts and
  phrasing) with a relearned one: what comes back was hidden in the weights, not re-taught.
  ``data: retain`` / ``world``: the same finetuning on ``size`` seeded rows of the retain split or
  the world facts (benign finetuning that never shows a forget fact); every forget item is
  evaluated. Why SGD and the demo's settings: docs/spec/ATTACKS.md (AdamW moves every weight by
  about ``lr`` whatever its gradient, and destroyed the demo target's own knowledge).
* ``quantize``: weight-only round-to-nearest integer quantization by torchao
  (``IntxWeightOnlyConfig``: symmetric, ``bits`` bits, one scale per output row or per
  ``group_size`` input columns) of every ``nn.Linear`` but the LM head (kept in full precision,
  as quantized releases do). torchao is PyTorch's own quantization library, released with it and
  declaring no dependencies (so it cannot pull another torch build), and runs on CPU; the
  quantized model is evaluated with the rounded weights torchao computes from, dequantized once
  (:func:`quantize`).

Metrics of an attack (on its evaluated forget items, in metrics.json under ``attack.<name>``):
``forget.prob|truth_ratio|extraction_strength|rouge`` of the attacked model and
``unattacked.forget.*`` of the unattacked one on the same items; ``removal`` / ``removal_report``
(the run's removal score on the selection / report part of the held-out split, less the
relearned items), ``forget_quality`` (KS p-value against the retain model on those items),
``retention`` (model utility of the attacked model); ``target.forget.prob`` /
``retain.forget.prob`` (the target / retain model under the same attack, from the prepared
references' ``.attacks.json``) and ``target.unattacked.forget.prob`` /
``retain.unattacked.forget.prob`` (the same models unattacked, on the same items); ``recovered``,
``target_change``, ``retain_change``, ``recovered_beyond_retain`` and ``recovered_why``
(:func:`recovery`); ``n_items``, ``n_relearn``, ``time_s``, and ``error`` ("" or why the attack
failed: its metrics are then NaN and the run still completes).

Recovered fraction (:func:`recovery`, the one definition; docs/spec/ATTACKS.md) — how much of
what unlearning removed came back, with p the mean forget probability on the evaluated items::

    recovered = (p_attacked − p_unlearned) / (p_target − p_unlearned)

against the *unattacked* target: the gap is what unlearning removed, a property of the unlearned
model, not of the attack. 0 = nothing came back, 1 = the attacked model knows as much as the
target did; below 0 the attack removed more. Read beside it, in units of the same gap: the
target's own change under the attack (``target_change``; an attack that damages what it should
reveal scores low on every run) and the retain model's (``retain_change``; the retain model never
saw the evaluated authors, so its rise is what the attack teaches by itself). What the report's
verdicts read is ``recovered_beyond_retain`` = recovered − max(0, retain_change): a rise the
attack produces in a model that never knew the facts is not hidden knowledge coming back (a fall
is not credited). NaN, with the reason in ``recovered_why``, when the gap is below
:data:`MIN_GAP` (nothing measurable was forgotten), when the attacked target keeps less than
:data:`GUARD` of its gap (the attack itself destroyed the knowledge: recovery is not
interpretable), or when a reference is missing.

Per-item values (which forget items come back, the relearning losses, the G-effects of each
relearning step on the forget and retain probes) go to ``attacks.json`` in
the run directory (``runs.ATTACKS_FILE``); the retain and target models' attacked evaluations to
``<reference>.attacks.json`` beside their reference evaluations (``runs.attacked_reference``).
"""

from __future__ import annotations

import copy
import math
import random
import time
from typing import Callable, Optional

import numpy as np

from rayunlearn import UserError, runs
from rayunlearn.eval import metrics as M
from rayunlearn.eval import scores as S
from rayunlearn.eval.heldout import block_authors, item_authors, ranked_authors, split_items

# a target–unlearned forget-probability gap below this is not measured (docs/spec/ATTACKS.md): two
# retain replicates differ by ~0.01 on the demo's evaluated items and the default relearning moves
# the target by ~0.02-0.04
MIN_GAP = 0.05
# the attacked target must keep at least this share of its gap to the unlearned model, or the attack
# destroyed the knowledge it is supposed to reveal and recovery is not interpretable
GUARD = 0.5
NAN = float("nan")
FORGET_FIELDS = ("prob", "truth_ratio", "extraction_strength", "rouge")
# every attack's metrics (NaN when it failed), so the trials table has the same columns either way
ATTACK_METRICS = (tuple(f"forget.{f}" for f in FORGET_FIELDS) + tuple(f"unattacked.forget.{f}" for f in FORGET_FIELDS)
                  + ("removal", "removal_report", "forget_quality", "retention",
                     "target.forget.prob", "target.unattacked.forget.prob", "retain.forget.prob",
                     "retain.unattacked.forget.prob", "recovered", "target_change", "retain_change",
                     "recovered_beyond_retain", "n_items", "n_relearn", "time_s"))


class AttackSettingError(UserError):
    """An attack cannot be run on this benchmark (e.g. a relearning subset as large as the forget set)."""


# --------------------------------------------------------------------------------------------
# which rows an attack trains on and which forget items it evaluates


def relearn_split(authors: list[str], size: int, seed: int,
                  pool: Optional[tuple[str, ...]] = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(relearned forget items, evaluated forget items) for forget items whose authors are
    ``authors``: the first ``size`` items of the ``pool`` authors (default: all), taken author by
    author in the seeded order of :func:`rayunlearn.eval.heldout.ranked_authors`; evaluated = the
    items of every author with no relearned item. Disjoint by construction; an error when no
    pool author is left to evaluate."""
    pool = tuple(sorted(set(authors))) if pool is None else tuple(pool)
    n_pool = sum(a in pool for a in authors)
    if size >= n_pool:
        raise AttackSettingError(f"relearning subset size={size} is not smaller than the {n_pool} forget items it is "
                                 f"drawn from; lower eval.attacks[].size to leave forget authors to evaluate")
    by_author: dict[str, list[int]] = {}
    for i, a in enumerate(authors):
        by_author.setdefault(a, []).append(i)
    relearned: list[int] = []
    touched = set()
    for a in ranked_authors(list(pool), seed):
        if len(relearned) >= size:
            break
        relearned += by_author[a][: size - len(relearned)]
        touched.add(a)
    if touched >= set(pool):
        raise AttackSettingError(f"relearning subset size={size} touches every one of the {len(pool)} forget authors "
                                 f"it is drawn from ({n_pool} items); lower eval.attacks[].size so that one of them "
                                 f"is left to evaluate")
    evaluated = tuple(i for i, a in enumerate(authors) if a not in touched)
    return tuple(sorted(relearned)), evaluated


def attack_rows(attack, benchmark, data_cfg, eval_cfg,
                forget_records: list[dict]) -> tuple[list[dict], tuple[int, ...]]:
    """(QA records the attack finetunes on, evaluated forget item indices) of one attack;
    ``forget_records`` are the evaluated forget split's records (``Evaluator.records["forget"]``).
    The forget rows relearned come from the *selection* part of the held-out split
    (``eval.selection_fraction`` / ``selection_seed``): the report part stays untouched, so the
    post-attack ``removal_report`` is measured on authors neither the sweep nor the attack saw."""
    from rayunlearn.data.examples import WORLD_SPLIT, retain_split

    everything = tuple(range(len(forget_records)))
    if attack.kind == "quantize":
        return [], everything
    if attack.data == "forget":
        authors = item_authors(forget_records)
        pool = split_items(authors, eval_cfg.selection_fraction, eval_cfg.selection_seed).selection_authors
        relearned, evaluated = relearn_split(authors, attack.size, attack.seed, pool)
        return [forget_records[i] for i in relearned], evaluated
    split = retain_split(data_cfg.forget_split) if attack.data == "retain" else WORLD_SPLIT
    rows = list(benchmark.split(split)) if hasattr(benchmark, "split") else list(benchmark.splits[split])
    if attack.size > len(rows):
        raise AttackSettingError(f"attack {attack.label}: size={attack.size} exceeds the {len(rows)} rows of split "
                                 f"{split!r}; lower eval.attacks[].size")
    return random.Random(attack.seed).sample(rows, attack.size), everything


def check_attacks_fit(attacks, benchmark, data_cfg, eval_cfg) -> None:
    """Before training: every attack can draw its rows from this benchmark (a ConfigError-like
    :class:`AttackSettingError` naming the attack otherwise)."""
    from rayunlearn.eval.evaluate import evaluation_records

    if not attacks:
        return
    forget = evaluation_records(benchmark, data_cfg, eval_cfg)["forget"]
    for i, a in enumerate(attacks):
        try:
            attack_rows(a, benchmark, data_cfg, eval_cfg, forget)
        except AttackSettingError as exc:
            raise AttackSettingError(f"eval.attacks[{i}] ({a.label}): {exc}") from None


# --------------------------------------------------------------------------------------------
# the attacks themselves (each returns an attacked copy; the model passed in is not touched)


def releasable(model, attack):
    """A copy of ``model`` as released: a LoRA adapter merged into its base weights."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        if not attack.merge_lora:
            raise AttackSettingError(f"attack {attack.label}: the model is a LoRA adapter; set merge_lora=true")
        return copy.deepcopy(model).merge_and_unload()
    return copy.deepcopy(model)


def relearn(model, examples: list[dict], attack, pad_id: int,
            after_backward: Optional[Callable[[int, object, list], None]] = None):
    """Finetune a copy of ``model`` on encoded ``examples`` (see the module docstring); returns
    (the copy in eval mode, the loss of each step). ``after_backward(step, model, grads)`` is
    called once each step's loss gradient is computed, at the weights the step starts from
    (``grads``: the gradient of every parameter; the G-effects of relearning are recorded there)."""
    import torch

    from rayunlearn.data.examples import collate_examples, to_device
    from rayunlearn.effects.engine import risk_nll
    from rayunlearn.forward import token_view

    m = releasable(model, attack)
    m.requires_grad_(True)
    m.train()
    params = list(m.parameters())
    device = params[0].device
    opt = (torch.optim.SGD(params, lr=attack.lr) if attack.optimizer == "sgd"
           else torch.optim.AdamW(params, lr=attack.lr, weight_decay=0.0))
    rng = random.Random(attack.seed)
    order: list[int] = []
    losses = []
    for step in range(attack.steps):
        rows = []
        while len(rows) < min(attack.batch_size, len(examples)):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            rows.append(examples[order.pop()])
        loss = risk_nll(token_view(m, to_device(collate_examples(rows, pad_id), device)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(step, m, [p.grad for p in params])
        opt.step()
        losses.append(float(loss.detach()))
    m.eval()
    m.requires_grad_(False)
    return m, losses


PROBE_ROWS = 8      # rows of each probe the relearning G-effects are measured on (two backward passes a step)


def probe_rows(examples: list[dict], n: int = PROBE_ROWS) -> list[dict]:
    """``n`` rows spread evenly over ``examples`` (every author of the evaluated items, not the
    first author's rows only)."""
    if len(examples) <= n:
        return list(examples)
    return [examples[(k * len(examples)) // n] for k in range(n)]


def relearn_effect_recorder(forget_examples: list[dict], retain_examples: list[dict], attack, pad_id: int):
    """(``after_backward`` callback for :func:`relearn`, the list it fills): at the weights each
    relearning step starts from, the probe risks R (token-mean NLL, the G-effect paper's risk:
    ``rayunlearn.effects.engine.risk_nll``) of :data:`PROBE_ROWS` evaluated forget items and
    retain rows (:func:`probe_rows`), and the step's G-effects e = ∇R·∇L on them (L the
    relearning batch's NLL, whose gradient the step computed anyway). Under SGD the risk changes
    by −lr·e to first order (``predicted_<probe>_risk_change``; a positive removal effect means
    the forgotten risk falls back); AdamW's step is not −lr·∇L, so there it is NaN."""
    import torch

    from rayunlearn.data.examples import collate_examples, to_device
    from rayunlearn.effects.engine import risk_nll
    from rayunlearn.forward import token_view

    rows: list[dict] = []
    probes = {"forget": collate_examples(probe_rows(forget_examples), pad_id),
              "retain": collate_examples(probe_rows(retain_examples), pad_id)}
    sgd = attack.optimizer == "sgd"

    def after_backward(step: int, model, grads: list) -> None:
        params = list(model.parameters())
        device = params[0].device
        row = {"step": step, "lr": attack.lr}
        for name, probe in probes.items():
            risk = risk_nll(token_view(model, to_device(probe, device)))
            g_r = torch.autograd.grad(risk, params, allow_unused=True)
            effect = sum(float((a.double() * b.double()).sum()) for a, b in zip(g_r, grads)
                         if a is not None and b is not None)
            row[f"{name}_risk"], row[f"{name}_effect"] = float(risk.detach()), effect
            row[f"predicted_{name}_risk_change"] = -attack.lr * effect if sgd else NAN
        rows.append(row)

    return after_backward, rows


def quantize(model, attack):
    """A copy of ``model`` whose linear weights but the LM head hold their ``attack.bits``-bit
    rounding by torchao (:func:`quantized_copy`) as ordinary float tensors: the dequantized
    values torchao's tensor subclass computes every linear layer from (identical metrics on the
    demo's models), without dequantizing them again in every forward pass (~20 % of an
    evaluation on CPU)."""
    import torch

    m = quantized_copy(model, attack)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and type(mod.weight.data) is not torch.Tensor:   # torchao's subclass
                mod.weight = torch.nn.Parameter(mod.weight.dequantize(), requires_grad=False)
    return m


def quantized_copy(model, attack):
    """A copy of ``model`` with every linear weight but the LM head quantized by torchao to
    ``attack.bits`` bits (symmetric round-to-nearest, per output row or per ``group_size`` group),
    as the library leaves it (tensor-subclass weights holding the integers and scales)."""
    import torch

    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    m = releasable(model, attack)
    head = m.get_output_embeddings()
    granularity = PerGroup(attack.group_size) if attack.group_size else PerAxis(0)
    if attack.group_size:
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod is not head and mod.in_features % attack.group_size:
                raise AttackSettingError(f"attack {attack.label}: group_size={attack.group_size} does not divide "
                                         f"{name}'s {mod.in_features} input features")
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{attack.bits}"), granularity=granularity)
    with torch.no_grad():
        quantize_(m, config, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and mod is not head)
    return m.eval()


# --------------------------------------------------------------------------------------------
# scores of an attacked evaluation (pure: raw per-item arrays in, numbers out)


def recovery(attacked: float, unlearned: float, target: Optional[float], target_attacked: Optional[float],
             retain: Optional[float] = None, retain_attacked: Optional[float] = None) -> dict:
    """The recovered fraction of an attack and what it is read beside (module docstring;
    docs/spec/ATTACKS.md), from mean forget probabilities on the attack's evaluated items: the
    unlearned model after (``attacked``) and before (``unlearned``) the attack, the target and
    retain models before and after the same attack. Returns ``recovered`` = (attacked −
    unlearned) / (target − unlearned); ``target_change`` / ``retain_change`` = each reference
    model's own change under the attack in units of that gap; ``recovered_beyond_retain`` =
    recovered − max(0, retain_change); ``why`` = "" or, when they are NaN, the reason in words."""
    values = {"recovered": NAN, "target_change": NAN, "retain_change": NAN, "recovered_beyond_retain": NAN}
    if not _finite(attacked, unlearned):
        return {**values, "why": "no forget probability of the unlearned model"}
    if not _finite(target):
        return {**values, "why": "no target model evaluated on these items"}
    gap = target - unlearned
    if gap < MIN_GAP:
        return {**values, "why": f"target–unlearned gap {gap:.3g} < MIN_GAP={MIN_GAP}: nothing measurable forgotten"}
    if not _finite(target_attacked):
        return {**values, "why": "no attacked target model (the attack's own effect on it unknown)"}
    values["target_change"] = (target_attacked - target) / gap
    if _finite(retain, retain_attacked):
        values["retain_change"] = (retain_attacked - retain) / gap
    if target_attacked - unlearned < GUARD * gap:
        return {**values, "why": f"the attack itself took the target {target:.3g} → {target_attacked:.3g}, under "
                                 f"{GUARD:g} of its gap left: not interpretable"}
    values["recovered"] = (attacked - unlearned) / gap
    if not math.isfinite(values["retain_change"]):
        return {**values, "why": "no attacked retain model (recovered_beyond_retain unknown)"}
    values["recovered_beyond_retain"] = values["recovered"] - max(0.0, values["retain_change"])
    return {**values, "why": ""}


def _finite(*xs) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def forget_scores(raw: dict, items) -> dict:
    """``forget.<field>`` means of the model's raw forget arrays over ``items``."""
    f, idx = raw["forget"], np.asarray(list(items), dtype=np.int64)

    def take(key):
        return np.asarray(f[key], dtype=np.float64)[idx]

    ratios = M.truth_ratios(take("avg_paraphrased_loss"), [f["average_perturb_loss"][i] for i in idx])
    return {"prob": M.answer_prob(take("avg_gt_loss")), "truth_ratio": M.truth_ratio_forget(ratios),
            "extraction_strength": float(np.mean(take("extraction_strength"))),
            "rouge": float(np.mean(take("rougeL_recall"))) if "rougeL_recall" in f else NAN}


def item_probs(raw: dict) -> list[float]:
    """P̄(a) = exp(−mean NLL) of every forget item."""
    return np.exp(-np.asarray(raw["forget"]["avg_gt_loss"], dtype=np.float64)).tolist()


def attack_metrics(attacked: dict, plain: dict, items, *, reference: Optional[dict], target: Optional[dict],
                   removal_score: str, selection_fraction: float, selection_seed: int,
                   target_attacked_prob: Optional[float], retain_attacked_prob: Optional[float] = None) -> dict:
    """An attack's metrics (module docstring) from the attacked and the unattacked evaluations
    (metrics dicts with ``raw``) on forget items ``items``; ``reference`` / ``target`` are the
    retain and target references (their raw arrays: the unattacked models on these items),
    ``target_attacked_prob`` / ``retain_attacked_prob`` those models' forget probabilities on
    these items under the same attack (None when not known)."""
    raw = attacked["raw"]
    items = tuple(items)
    out = {f"forget.{k}": v for k, v in forget_scores(raw, items).items()}
    out.update({f"unattacked.forget.{k}": v for k, v in forget_scores(plain["raw"], items).items()})
    ref_raw, target_raw = (reference or {}).get("raw"), (target or {}).get("raw")
    split = split_items(raw["forget"].get("author") or block_authors(len(raw["forget"]["avg_gt_loss"])),
                        selection_fraction, selection_seed)
    kept = set(items)
    parts = {}
    for name, part in (("selection", split.selection), ("report", split.report)):
        chosen = [i for i in part if i in kept]
        parts[name] = S.part_scores(S.score_inputs(raw, chosen, ref_raw, target_raw)) if chosen else None
    scored = parts["selection"] or parts["report"]
    kind = S.removal_kind(removal_score, scored) if scored else removal_score
    fq = (M.forget_quality(np.asarray(raw["forget"]["truth_ratio"])[list(items)],
                           np.asarray(ref_raw["forget"]["truth_ratio"])[list(items)])["pvalue"]
          if ref_raw is not None else NAN)
    out.update({
        "removal": _num(parts["selection"][kind]) if parts["selection"] else NAN,
        "removal_report": _num(parts["report"][kind]) if parts["report"] else NAN,
        "forget_quality": fq,
        "retention": _num(attacked.get("retention")),
        "target.forget.prob": _num(target_attacked_prob),
        "target.unattacked.forget.prob": forget_scores(target_raw, items)["prob"] if target_raw else NAN,
        "retain.forget.prob": _num(retain_attacked_prob),
        "retain.unattacked.forget.prob": forget_scores(ref_raw, items)["prob"] if ref_raw else NAN,
        "n_items": float(len(items)),
    })
    rec = recovery(out["forget.prob"], out["unattacked.forget.prob"], out["target.unattacked.forget.prob"],
                   out["target.forget.prob"], out["retain.unattacked.forget.prob"], out["retain.forget.prob"])
    out.update({k: v for k, v in rec.items() if k != "why"})
    out["recovered_why"] = rec["why"]
    return out


def _num(x) -> float:
    return NAN if x is None else float(x)


def failed_metrics(error: str, time_s: float = NAN) -> dict:
    """An attack that failed: every metric NaN, the reason in ``error``."""
    return {**{k: NAN for k in ATTACK_METRICS}, "time_s": time_s, "recovered_why": "the attack failed", "error": error}


# --------------------------------------------------------------------------------------------
# running the configured attacks


def run_attacks(model, evaluator, plain: dict, attacks, *, benchmark, step: int = 0,
                target_attacked: Optional[dict] = None, retain_attacked: Optional[dict] = None) -> tuple[dict, dict]:
    """Run every attack on a copy of ``model`` and evaluate it with ``evaluator`` (the
    :class:`~rayunlearn.eval.evaluate.Evaluator` of ``plain``, the unattacked evaluation).
    Returns ({name: metrics (flat, with ``error``)}, {name: per-item values for attacks.json}).
    ``target_attacked`` / ``retain_attacked``: the target and retain models' attacked results
    ({name: {"config", "metrics"}}, what :func:`reference_attacks` writes) for the recovered
    fraction and its guards (:func:`recovery`). A relearning attack also records
    its steps' G-effects on the forget and retain probes (:func:`relearn_effect_recorder`, in
    attacks.json). An attack that raises is recorded (NaN metrics, its error) and the others
    still run."""
    from rayunlearn.data.examples import encode_records

    ev_cfg = evaluator.eval_cfg
    results, per_item = {}, {}
    for attack in attacks:
        label = attack.label
        t0 = time.perf_counter()
        try:
            rows, items = attack_rows(attack, benchmark, evaluator.data_cfg, ev_cfg, evaluator.records["forget"])
            losses, effects = [], []
            if attack.kind == "quantize":
                attacked_model = quantize(model, attack)
            else:
                encode = lambda recs: encode_records(recs, evaluator.tokenizer, evaluator.data_cfg)  # noqa: E731
                hook, effects = relearn_effect_recorder(encode([evaluator.records["forget"][i] for i in items]),
                                                        encode(evaluator.records["retain"]), attack,
                                                        evaluator.encoder.pad_id)
                attacked_model, losses = relearn(model, encode(rows), attack, evaluator.encoder.pad_id,
                                                 after_backward=hook)
            attacked = evaluator(attacked_model, step=step)
            del attacked_model
            metrics = attack_metrics(attacked, plain, items, reference=evaluator.reference, target=evaluator.target,
                                     removal_score=ev_cfg.removal_score, selection_fraction=ev_cfg.selection_fraction,
                                     selection_seed=ev_cfg.selection_seed,
                                     target_attacked_prob=_attacked_prob(target_attacked, label, attack),
                                     retain_attacked_prob=_attacked_prob(retain_attacked, label, attack))
            metrics.update({"n_relearn": float(len(rows)), "time_s": time.perf_counter() - t0, "error": ""})
            per_item[label] = {"config": attack_settings(attack), "items": list(items),
                               "relearn_rows": [r["question"] for r in rows], "losses": losses, "effects": effects,
                               "forget_prob": item_probs(attacked["raw"]),
                               "unattacked_forget_prob": item_probs(plain["raw"])}
        except Exception as exc:  # noqa: BLE001 - an attack's failure is a result, the run goes on
            metrics = failed_metrics(runs.short_error(exc), time.perf_counter() - t0)
        results[label] = metrics
    return results, per_item


def attack_settings(attack) -> dict:
    """What identifies an attack's result (every field of its config)."""
    import dataclasses

    return dataclasses.asdict(attack)


def _attacked_prob(reference_attacked: Optional[dict], label: str, attack) -> Optional[float]:
    """A reference model's forget probability under the same attack (the same settings), or None."""
    entry = (reference_attacked or {}).get(label)
    if not entry or entry.get("config") != attack_settings(attack):
        return None
    value = (entry.get("metrics") or {}).get("forget.prob")
    return None if value is None or not math.isfinite(value) else float(value)


def attack_evaluator(evaluator):
    """The evaluator of attacked models: ``evaluator`` itself, or its twin that is fast (no
    generation) under ``eval.attack_rouge=false`` and evaluates on this process alone (the
    attacks run on rank 0 only: a collective evaluation there would wait for the other ranks)."""
    from rayunlearn.eval import distributed as D
    from rayunlearn.eval.evaluate import Evaluator

    fast = evaluator.fast or not evaluator.eval_cfg.attack_rouge
    if fast == evaluator.fast and not D.use_distributed(evaluator.distributed):
        return evaluator
    return Evaluator(evaluator.tokenizer, evaluator.benchmark, evaluator.data_cfg, evaluator.eval_cfg,
                     retain_reference=evaluator.reference, fast=fast, distributed=False)


def reference_attacks(model, evaluator, plain: dict, attacks, *, benchmark) -> dict:
    """The attacked evaluations of a reference (retain or target) model: {name: {"config",
    "metrics", "items", "forget_prob", ...}}, what ``<reference>.attacks.json`` holds."""
    results, per_item = run_attacks(model, attack_evaluator(evaluator), plain, attacks, benchmark=benchmark)
    return {label: {**per_item.get(label, {"config": attack_settings(a)}), "metrics": results[label]}
            for a in attacks for label in [a.label]}


def load_attacked_reference(reference_path) -> Optional[dict]:
    """The attacked evaluations stored beside a reference evaluation, or None."""
    from pathlib import Path

    from rayunlearn.io import read_json

    if not reference_path or isinstance(reference_path, dict):
        return None
    path = runs.attacked_reference(Path(reference_path))
    return read_json(path) if path.exists() else None


def attack_unlearned(eval_cfg, model, benchmark, evaluator, metrics: dict, run_dir) -> dict:
    """The end of an unlearning run with ``eval.attacks``: run them on ``model`` (evaluated
    into ``metrics`` by ``evaluator``), write attacks.json into ``run_dir`` and return the
    metrics with ``attack`` = {name: metrics}; with ``eval.removal_attack``, ``removal`` /
    ``removal_report`` become that attack's (the plain ones kept as ``removal_unattacked`` /
    ``removal_report_unattacked``)."""
    from pathlib import Path

    from rayunlearn.io import write_json

    results, per_item = run_attacks(model, attack_evaluator(evaluator), metrics, eval_cfg.attacks, benchmark=benchmark,
                                    step=int(metrics.get("step", 0)),
                                    target_attacked=load_attacked_reference(eval_cfg.target_reference),
                                    retain_attacked=load_attacked_reference(eval_cfg.retain_reference))
    write_json(Path(run_dir) / runs.ATTACKS_FILE, per_item)
    out = {**metrics, "attack": results}
    if eval_cfg.removal_attack:
        chosen = results[eval_cfg.removal_attack]
        out.update({"removal_unattacked": metrics["removal"], "removal_report_unattacked": metrics["removal_report"],
                    "removal": chosen["removal"], "removal_report": chosen["removal_report"],
                    "removal_kind": f"{metrics['removal_kind']} after {eval_cfg.removal_attack}"})
    return out
