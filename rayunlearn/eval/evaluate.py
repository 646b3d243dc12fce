"""TOFU evaluation of a model: probing -> raw per-item arrays -> metrics.json.

    result = evaluate_model(model, tokenizer, benchmark, data_cfg, eval_cfg, retain_reference=None)
    write_eval(result, "results/runs/x")         # metrics.json + raw.json

Splits evaluated (`max_items` first items of each, None = all, recorded in the fingerprint):
`<forget>_perturbed` (forget), `retain_perturbed`, `real_authors_perturbed`,
`world_facts_perturbed`, and `holdout<NN>` (same NN as the forget split) against the forget
items for membership inference.

Search scores (both maximised, in every metrics dict):
* ``removal`` = the removal score named by ``eval.removal_score`` (``rayunlearn.eval.scores``;
  default ``tr_closeness``) on the *selection* part of the forget set, ``removal_report`` the same
  score on the held-out *report* part (``rayunlearn.eval.heldout``: split by author,
  ``eval.selection_fraction``, ``eval.selection_seed``); ``removal_kind`` names the score, which is
  ``prob_removal`` (1 − forget probability) when the chosen score's reference is missing. Every
  score of each part is under ``selection`` / ``report`` (with the KS statistic, privleak and the
  number of items), the split under ``heldout``. ``forget_quality`` / ``ks_statistic`` / ``ks_n``
  stay TOFU's numbers over all forget items (compare them only on splits of the same size).
* ``retention`` = model utility (harmonic mean of the nine utility numbers; in ``fast`` mode, used
  inside training loops without generation, of the six non-ROUGE numbers — the fingerprint's
  ``mode`` says which). ``model_utility_no_rouge`` = the harmonic mean of those six non-ROUGE
  numbers in *both* modes: the trajectory's in-loop evaluations and the final one compare on it
  (the final ``model_utility`` has three more terms, so it is no point of the same curve).

Distributed: under `torch.distributed` with world size > 1 the evaluation is a collective call
split across ranks, each returning the single-process result (`rayunlearn.eval.distributed`).

Reference: the retain model's stored evaluation (a dict from `evaluate_model`, a directory written
by `write_eval`, a ``.json`` written by `write_eval` with its ``.raw.json`` sibling, or one JSON
holding ``raw`` inline).  Its fingerprint must equal ours in every field but ``mode`` and ``source`` (the splits'
content hashes are compared instead); otherwise a
`ReferenceMismatchError` lists the differing fields.  Forget quality uses its raw forget truth
ratios; privleak its Min-K% AUC.  ``eval.target_reference`` (the target model's stored
evaluation, same rules) gives ``nll_rise`` its baseline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rayunlearn import UserError
from rayunlearn.eval import metrics as M
from rayunlearn.eval import scores as S
from rayunlearn.eval.heldout import DEFAULT_FRACTION, block_authors, item_authors, split_items
from rayunlearn.runs import CONFIG_FILE, METRICS_FILE, RAW_FILE, TOFU_EVAL_DIR

FINGERPRINT_VERSION = 1
MIN_K = 0.4
MIA_SCORES = ("loss", "zlib", "mink", "minkpp")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
NO_ROUGE_UTILITY_TERMS = ("prob", "truth_ratio")   # what a fast (in-loop, no generation) evaluation has
SPLITS = ("forget", "retain", "real_authors", "world_facts")


class ReferenceMismatchError(UserError):
    """The retain reference was evaluated under other settings than this evaluation."""


def split_names(forget_split: str) -> dict[str, str]:
    """Our split keys -> benchmark split names."""
    return {"forget": f"{forget_split}_perturbed", "retain": "retain_perturbed",
            "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed",
            "holdout": f"holdout{forget_split[-2:]}"}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary, special tokens and class of a tokenizer."""
    return _hash({"vocab": sorted(tokenizer.get_vocab().items()), "eos": tokenizer.eos_token_id,
                  "pad": tokenizer.pad_token_id, "bos": getattr(tokenizer, "bos_token_id", None)})


# --------------------------------------------------------------------------------------------
# the evaluator (cached probes; cheap repeated calls)


class Evaluator:
    """Evaluate models on one benchmark under fixed settings; tokenised probes are built once.

    ``evaluator(model, step) -> dict`` returns the metrics.json dict plus ``"raw"`` (per-item
    arrays).  ``fast=True`` skips generation/ROUGE (what the training loop's in-loop evaluations
    every ``eval.every`` steps use).  The model is put in eval mode for the call and
    restored to its previous mode afterwards.  Training loop use::

        evaluator = Evaluator(tok, benchmark, cfg.data, cfg.eval, cfg.eval.retain_reference, fast=True)
        append_jsonl(run / "trajectory.jsonl", trajectory_record(evaluator(model, step)))

    Distributed: with `torch.distributed` initialised and world size > 1 (``distributed=None``,
    the default) or ``distributed=True``, the call is collective — every rank must make it — and
    the scoring/generation batches are split across ranks and gathered back
    (`rayunlearn.eval.distributed`: same batches as one process, so every rank returns the
    single-process result; FSDP2-sharded models are supported).  ``distributed=False``
    evaluates on the calling rank alone.  Progress is shown on rank 0 only."""

    def __init__(self, tokenizer, benchmark, data_cfg, eval_cfg, retain_reference=None, fast: bool = False,
                 progress: bool = False, min_k: Optional[float] = None, distributed: Optional[bool] = None):
        from rayunlearn.eval.probe import Probe, QAEncoder

        self.tokenizer, self.benchmark = tokenizer, benchmark
        self.data_cfg, self.eval_cfg = data_cfg, eval_cfg
        if min_k is None:
            min_k = getattr(eval_cfg, "mia_min_k", MIN_K)
        self.fast, self.progress, self.min_k = bool(fast), bool(progress), float(min_k)
        self.distributed = distributed
        self.generate = bool(eval_cfg.rouge) and not self.fast
        self.generate_batch_size = eval_cfg.generate_batch_size or eval_cfg.batch_size
        self.encoder = QAEncoder(tokenizer, data_cfg.template, data_cfg.max_length)
        names = split_names(data_cfg.forget_split)
        self.records = evaluation_records(benchmark, data_cfg, eval_cfg)
        # flatten every (item, variant) sequence: kinds "gt", "para", "pert"
        self.probes: list[Probe] = []
        self.slots: list[tuple[str, int, str, int]] = []
        for key, recs in self.records.items():
            for i, r in enumerate(recs):
                self._add(key, i, "gt", 0, r["question"], r["answer"], extras=key in ("forget", "holdout"))
                if key == "holdout":
                    continue
                if key in ("forget", "retain"):
                    if "paraphrased_answer" not in r:
                        raise UserError(f"split {names[key]!r} item {i} has no 'paraphrased_answer'")
                    self._add(key, i, "para", 0, r["question"], r["paraphrased_answer"])
                pert = r.get("perturbed_answer")
                if not pert:
                    raise UserError(f"split {names[key]!r} item {i} has no 'perturbed_answer' list")
                for k, a in enumerate(pert):
                    self._add(key, i, "pert", k, r["question"], a)
        self.prompt_slots = [(key, i) for key in SPLITS for i in range(len(self.records[key]))] if self.generate else []
        self.prompts = [self.encoder.prompt(self.records[k][i]["question"]) for k, i in self.prompt_slots]
        self.fingerprint = evaluation_fingerprint(tokenizer, benchmark, data_cfg, eval_cfg, fast=self.fast,
                                                  min_k=self.min_k, records=self.records)
        self.reference = None if retain_reference is None else load_reference(retain_reference)
        if self.reference is not None:
            check_fingerprint(self.fingerprint, self.reference.get("fingerprint"))
        self.target = None if eval_cfg.target_reference is None else load_reference(eval_cfg.target_reference)
        if self.target is not None:
            check_fingerprint(self.fingerprint, self.target.get("fingerprint"))

    def _add(self, key, i, kind, k, question, answer, extras=False):
        from rayunlearn.eval.probe import Probe

        ids, labels = self.encoder.qa(question, answer)
        if not any(l != -100 for l in labels[1:]):
            raise UserError(f"{key} item {i}: the answer has no tokens left after truncation to "
                            f"max_length={self.data_cfg.max_length}; raise data.max_length")
        self.probes.append(Probe(ids, labels, extras=extras))
        self.slots.append((key, i, kind, k))

    def __call__(self, model, step: int = 0) -> dict:
        from rayunlearn.eval.probe import generate_greedy, score_probes

        from rayunlearn.eval import distributed as D

        if D.use_distributed(self.distributed):
            return self._call_distributed(model, step)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            with _progress(self.progress, len(self.probes), len(self.prompts)) as (tick_score, tick_gen):
                scores = score_probes(model, self.probes, pad_id=self.encoder.pad_id,
                                      batch_size=self.eval_cfg.batch_size, on_batch=tick_score)
                gens = generate_greedy(model, self.prompts, pad_id=self.encoder.pad_id, eos_id=self.encoder.eos_id,
                                       max_new_tokens=self.eval_cfg.max_new_tokens,
                                       batch_size=self.generate_batch_size, on_batch=tick_gen) if self.prompts else []
        finally:
            if was_training:
                model.train()
        raw = self.build_raw(scores, gens)
        check_finite(raw, step)
        return self.metrics(raw, step)

    def _call_distributed(self, model, step: int) -> dict:
        from rayunlearn.eval import distributed as D
        from rayunlearn.eval.probe import MAX_TOKENS, packs_supported, plan_batches, plan_packs

        rank, world = D.rank_world()
        sharded = D.is_sharded(model)
        bs, max_tokens = self.eval_cfg.batch_size, MAX_TOKENS
        D.check_same("evaluation settings", (self.fingerprint, bs, self.generate_batch_size, self.generate), None)
        packs, plan = plan_packs(self.probes, bs, max_tokens, share_prompts=packs_supported(model))
        n_score = sum(len(packs[k].members) for batch in D.shard_batches(plan, rank, world) for k in batch)
        n_gen = D.local_items(plan_batches([len(p) for p in self.prompts], self.generate_batch_size, None), rank, world)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            with _progress(self.progress and rank == 0, n_score, n_gen) as (tick_score, tick_gen):
                scores = D.score_probes_distributed(model, self.probes, pad_id=self.encoder.pad_id, batch_size=bs,
                                                    max_tokens=max_tokens, on_batch=tick_score, sharded=sharded)
                gens = D.generate_greedy_distributed(
                    model, self.prompts, pad_id=self.encoder.pad_id, eos_id=self.encoder.eos_id,
                    max_new_tokens=self.eval_cfg.max_new_tokens, batch_size=self.generate_batch_size, on_batch=tick_gen,
                    sharded=sharded) if self.prompts else []
        finally:
            if was_training:
                model.train()
        raw = self.build_raw(scores, gens)
        check_finite(raw, step)
        return self.metrics(raw, step)

    def metrics(self, raw: dict, step: int) -> dict:
        """metrics.json of ``raw`` under this evaluator's references and score settings."""
        return metrics_from_raw(raw, self.fingerprint, self.reference, step=step, target=self.target,
                                removal_score=self.eval_cfg.removal_score,
                                selection_fraction=self.eval_cfg.selection_fraction,
                                selection_seed=self.eval_cfg.selection_seed)

    def build_raw(self, scores, gens) -> dict:
        """Per-item arrays per split (TOFU log field names) from probe scores and generations."""
        raw: dict[str, dict] = {}
        for key, recs in self.records.items():
            n = len(recs)
            d: dict[str, Any] = {"index": list(range(n)), "question": [r["question"] for r in recs],
                                 "answer": [r["answer"] for r in recs]}
            raw[key] = d
            if key == "forget":     # whole authors go to one held-out part (rayunlearn.eval.heldout)
                d["author"] = item_authors(recs)
            d["gt_loss"], d["num_token_gt"], d["avg_gt_loss"] = [0.0] * n, [0] * n, [0.0] * n
            if key != "holdout":
                d["paraphrased_loss"], d["num_token_paraphrased"], d["avg_paraphrased_loss"] = [0.0] * n, [0] * n, [0.0] * n
                d["perturb_loss"] = [[] for _ in range(n)]
                d["num_token_perturb"] = [[] for _ in range(n)]
                d["average_perturb_loss"] = [[] for _ in range(n)]
            if key in ("forget", "holdout"):
                d["extraction_strength"], d["exact_memorization"] = [0.0] * n, [0.0] * n
                if self.eval_cfg.mia:
                    d["mia"] = {s: [0.0] * n for s in MIA_SCORES}
        for (key, i, kind, k), s in zip(self.slots, scores):
            d = raw[key]
            if kind == "gt":
                d["gt_loss"][i], d["num_token_gt"][i], d["avg_gt_loss"][i] = s.nll_sum, s.num_tokens, s.avg_nll
                if key in ("real_authors", "world_facts"):   # ã = the original answer
                    d["paraphrased_loss"][i], d["num_token_paraphrased"][i] = s.nll_sum, s.num_tokens
                    d["avg_paraphrased_loss"][i] = s.avg_nll
                if key in ("forget", "holdout"):
                    d["extraction_strength"][i] = M.extraction_strength(s.correct)
                    d["exact_memorization"][i] = M.exact_memorization(s.correct)
                    if self.eval_cfg.mia:
                        d["mia"]["loss"][i] = M.mia_loss(s.avg_nll)
                        d["mia"]["zlib"][i] = M.mia_zlib(s.avg_nll, self.records[key][i]["answer"])
                        d["mia"]["mink"][i] = M.mia_min_k(s.logps, self.min_k)
                        d["mia"]["minkpp"][i] = M.mia_min_k_pp(s.logps, s.mu, s.sigma, self.min_k)
            elif kind == "para":
                d["paraphrased_loss"][i], d["num_token_paraphrased"][i] = s.nll_sum, s.num_tokens
                d["avg_paraphrased_loss"][i] = s.avg_nll
            else:
                d["perturb_loss"][i].append(s.nll_sum)
                d["num_token_perturb"][i].append(s.num_tokens)
                d["average_perturb_loss"][i].append(s.avg_nll)
        for key in SPLITS:
            raw[key]["truth_ratio"] = M.truth_ratios(raw[key]["avg_paraphrased_loss"],
                                                     raw[key]["average_perturb_loss"]).tolist()
        if gens:
            for key in SPLITS:
                n = len(self.records[key])
                raw[key]["generated"], raw[key]["rougeL_recall"], raw[key]["rouge1_recall"] = [""] * n, [0.0] * n, [0.0] * n
            for (key, i), toks in zip(self.prompt_slots, gens):
                text = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
                r1, rl = M.rouge_recall(text, self.records[key][i]["answer"])
                raw[key]["generated"][i], raw[key]["rouge1_recall"][i], raw[key]["rougeL_recall"][i] = text, r1, rl
        return raw


def evaluation_records(benchmark, data_cfg, eval_cfg) -> dict[str, list[dict]]:
    """{split key: the records evaluated} (the first ``eval.max_items`` of each split; the
    holdout split only with ``eval.mia``); UserError for a missing or empty split."""
    names = split_names(data_cfg.forget_split)
    keys = list(SPLITS) + (["holdout"] if eval_cfg.mia else [])
    records: dict[str, list[dict]] = {}
    for key in keys:
        name = names[key]
        if name not in benchmark.splits:
            if key == "holdout":
                raise UserError(f"benchmark {benchmark.name!r} has no split {name!r} for membership "
                                f"inference; set eval.mia=false or provide the holdout split")
            raise UserError(f"benchmark {benchmark.name!r} has no split {name!r} (needed for the "
                            f"{key} metrics); available: {', '.join(sorted(benchmark.splits))}")
        recs = list(benchmark.splits[name])
        if eval_cfg.max_items is not None:
            recs = recs[: eval_cfg.max_items]
        if not recs:
            raise UserError(f"split {name!r} is empty")
        records[key] = recs
    return records


def evaluation_fingerprint(tokenizer, benchmark, data_cfg, eval_cfg, fast: bool = False,
                           min_k: Optional[float] = None, records: Optional[dict] = None) -> dict:
    """The fingerprint of an evaluation under these settings (what a retain reference must
    match), computed without a model: a run checks its reference with it before training."""
    if min_k is None:
        min_k = getattr(eval_cfg, "mia_min_k", MIN_K)
    if records is None:
        records = evaluation_records(benchmark, data_cfg, eval_cfg)
    names = split_names(data_cfg.forget_split)
    return {
        "version": FINGERPRINT_VERSION,
        "benchmark": getattr(benchmark, "name", "?"), "source": str(getattr(benchmark, "source", "?")),
        "forget_split": data_cfg.forget_split,
        "splits": {k: names[k] for k in records},
        "split_hash": {k: _hash(v) for k, v in records.items()},
        "items": {k: len(v) for k, v in records.items()},
        "max_items": eval_cfg.max_items,
        "template": data_cfg.template, "max_length": data_cfg.max_length,
        "generation": {"greedy": True, "max_new_tokens": eval_cfg.max_new_tokens,
                       "rouge": bool(eval_cfg.rouge)},
        "mia": {"enabled": bool(eval_cfg.mia), "min_k": float(min_k)},
        "tokenizer": tokenizer_hash(tokenizer),
        "mode": "fast" if fast else "full",
    }


class NonFiniteEvaluationError(UserError):
    """The evaluated model gives non-finite losses or truth ratios (its weights blew up);
    ``step`` is the step the evaluation was made at."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def check_finite(raw: dict, step: int) -> None:
    """Refuse per-item values that are NaN or infinite (a model whose weights blew up: the
    metrics would be meaningless), naming the split, the value and how many items."""
    bad = []
    for key, d in raw.items():
        for field in ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "truth_ratio"):
            items = d.get(field, [])
            n_bad = sum(not np.all(np.isfinite(np.asarray(v, dtype=np.float64))) for v in items)
            if n_bad:
                bad.append(f"{key} {field} in {n_bad} of {len(items)} items")
    if bad:
        raise NonFiniteEvaluationError(
            f"the model evaluated at step {step} gives non-finite values ({'; '.join(bad[:4])}): its "
            f"weights blew up, so no metric would mean anything", step)


def evaluate_model(model, tokenizer, benchmark, data_cfg, eval_cfg, retain_reference=None, progress: bool = False,
                   step: int = 0, distributed: Optional[bool] = None) -> dict:
    """Full TOFU evaluation of `model` (see module docstring).  Returns the metrics.json dict
    plus ``"raw"``: per-split per-item arrays (losses, token counts, truth ratios, generations,
    ROUGE, ES/EM, MIA scores).  Under `torch.distributed` with world size > 1 this is a
    collective call split across ranks (see `Evaluator`; ``distributed=False`` opts out)."""
    ev = Evaluator(tokenizer, benchmark, data_cfg, eval_cfg, retain_reference=retain_reference, progress=progress,
                   distributed=distributed)
    return ev(model, step=step)


# --------------------------------------------------------------------------------------------
# raw -> metrics (pure)


def _mean(x) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64)))


def metrics_from_raw(raw: dict, fingerprint: dict, reference: Optional[dict] = None, step: int = 0, *,
                     target: Optional[dict] = None, removal_score: str = S.DEFAULT_SCORE,
                     selection_fraction: float = DEFAULT_FRACTION, selection_seed: int = 0) -> dict:
    """Every metrics.json field from the raw per-item arrays (and the retain / target
    references'): ``removal`` = score ``removal_score`` on the selection part of the held-out
    split, ``removal_report`` = the same score on the report part, every score of both parts
    under ``selection`` / ``report``, the split itself under ``heldout``."""
    out: dict[str, Any] = {"fingerprint": fingerprint, "step": int(step)}
    blocks: dict[str, dict] = {}
    for key in SPLITS:
        d = raw[key]
        blocks[key] = M.split_scores(key, d["avg_gt_loss"], d["avg_paraphrased_loss"], d["average_perturb_loss"],
                                     d.get("rougeL_recall"))
    blocks["forget"]["extraction_strength"] = _mean(raw["forget"]["extraction_strength"])
    blocks["forget"]["exact_memorization"] = _mean(raw["forget"]["exact_memorization"])
    terms = [blocks[s][m] for s in UTILITY_SPLITS for m in ("prob", "rouge", "truth_ratio") if blocks[s][m] is not None]
    mu = M.model_utility(terms)
    mu_no_rouge = M.model_utility([blocks[s][m] for s in UTILITY_SPLITS for m in NO_ROUGE_UTILITY_TERMS])

    fq = None
    if reference is not None:
        fq = M.forget_quality(raw["forget"]["truth_ratio"], reference["raw"]["forget"]["truth_ratio"])
    mia = {"loss_auc": None, "zlib_auc": None, "mink_auc": None, "minkpp_auc": None, "privleak": None}
    if "holdout" in raw and "mia" in raw["forget"]:
        for s in MIA_SCORES:
            mia[f"{s}_auc"] = M.roc_auc(raw["forget"]["mia"][s], raw["holdout"]["mia"][s])
        ref_auc = ((reference or {}).get("mia") or {}).get("mink_auc")
        if ref_auc is not None:
            mia["privleak"] = M.privleak(mia["mink_auc"], ref_auc)
    forget = raw["forget"]
    # raw.json written before the held-out split has no authors: TOFU's blocks of 20 QA then
    split = split_items(forget.get("author") or block_authors(len(forget["avg_gt_loss"])),
                        selection_fraction, selection_seed)
    ref_raw, target_raw = (reference or {}).get("raw"), (target or {}).get("raw")
    parts = {name: S.part_scores(S.score_inputs(raw, items, ref_raw, target_raw)) if items else None
             for name, items in (("selection", split.selection), ("report", split.report))}
    kind = S.removal_kind(removal_score, parts["selection"])
    out.update({
        "removal": parts["selection"][kind],
        "removal_report": parts["report"][kind] if parts["report"] else None,
        "removal_kind": kind,
        "retention": mu,
        "forget_quality": fq["pvalue"] if fq else None,
        "ks_statistic": fq["statistic"] if fq else None,
        "ks_n": fq["n"] if fq else None,
        "model_utility": mu,
        "model_utility_terms": len(terms),
        "model_utility_no_rouge": mu_no_rouge,
        "forget": blocks["forget"], "retain": blocks["retain"],
        "real_authors": blocks["real_authors"], "world_facts": blocks["world_facts"],
        "mia": mia,
        "selection": parts["selection"],
        "report": parts["report"],
        "heldout": split.as_dict(),
        "raw": raw,
    })
    return out


def trajectory_record(result: dict) -> dict:
    """Flat scalars of a metrics dict for trajectory.jsonl / the trials table: step, removal,
    retention, forget_quality, ..., ``forget.prob``, ``mia.loss_auc``, ..."""
    rec: dict[str, Any] = {}
    for k, v in result.items():
        if k in ("raw", "fingerprint", "heldout"):
            continue
        if isinstance(v, dict):
            for kk, vv in v.items():
                rec[f"{k}.{kk}"] = vv
        elif k == "ks_n":
            rec[k] = list(v) if v else None
        else:
            rec[k] = v
    return rec


# --------------------------------------------------------------------------------------------
# fingerprints and references


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def fingerprint_diff(ours: dict, theirs: dict, ignore=("mode", "source")) -> list[str]:
    """Dotted fields whose values differ, as 'field: ours X, reference Y'.  Ignored: ``mode``
    (fast/full only decides whether generation runs) and ``source`` (a path may be spelled
    differently; the splits' content hashes are compared instead)."""
    a, b = _flatten(ours), _flatten(theirs)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] in ignore:
            continue
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            diffs.append(f"{k}: this evaluation {a.get(k, '<missing>')!r}, reference {b.get(k, '<missing>')!r}")
    return diffs


def check_fingerprint(ours: dict, theirs: Optional[dict]) -> None:
    """Refuse a reference evaluated under other settings (UserError naming the fields)."""
    if not theirs:
        raise ReferenceMismatchError("the retain reference has no evaluation fingerprint; re-evaluate the "
                                     "retain model with `rayunlearn eval` under the same settings")
    diffs = fingerprint_diff(ours, theirs)
    if diffs:
        raise ReferenceMismatchError(
            "the retain reference was evaluated under other settings, so forget quality / privleak would be "
            "meaningless. Differing fields: " + "; ".join(diffs) +
            ". Re-evaluate the retain model with the same data/eval settings.")


def reference_content_hash(reference: dict) -> str:
    """What identifies a retain reference for scoring, whatever its path: its fingerprint (less
    ``mode`` and ``source``), its raw forget truth ratios and its Min-K% AUC."""
    fp = {k: v for k, v in (reference.get("fingerprint") or {}).items() if k not in ("mode", "source")}
    return _hash({"fingerprint": fp, "truth_ratio": reference["raw"]["forget"]["truth_ratio"],
                  "mink_auc": (reference.get("mia") or {}).get("mink_auc")})


def load_reference(ref) -> dict:
    """A retain model's stored evaluation: a dict, a directory (metrics.json + raw.json), a
    ``X.json`` with a ``X.raw.json`` (or ``raw.json``) sibling, or one JSON with ``raw`` inline."""
    if isinstance(ref, dict):
        out = ref
    else:
        path = Path(ref)
        if path.is_dir():
            path = path / METRICS_FILE
        if not path.exists():
            raise UserError(f"retain reference {ref}: {path} does not exist; evaluate the retain model first "
                            f"(`rayunlearn eval results/models/retain`)")
        out = _read_json(path)
        if not isinstance(out, dict):
            raise UserError(f"retain reference {ref}: {path} holds no evaluation (a JSON object written by "
                            f"`rayunlearn eval`); re-evaluate the retain model")
        if "raw" not in out:
            for cand in (path.with_name(path.stem + ".raw.json"), path.with_name(RAW_FILE)):
                if cand.exists():
                    out = dict(out, raw=_read_json(cand))
                    break
    raw = out.get("raw") if isinstance(out, dict) else None
    if not raw or "forget" not in raw or "truth_ratio" not in raw["forget"]:
        raise UserError(f"retain reference {ref if not isinstance(ref, dict) else '(dict)'} has no raw per-item "
                        f"forget truth ratios (raw.json next to metrics.json); re-evaluate the retain model")
    return out


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:    # not JSON, or not even text (JSONDecodeError, UnicodeDecodeError)
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def write_eval(result: dict, out) -> Path:
    """Write a result atomically: a directory -> ``metrics.json`` + ``raw.json``; a path ending in
    ``.json`` -> that file + ``<stem>.raw.json``.  Returns the metrics path."""
    from rayunlearn.io import write_json

    out = Path(out)
    if out.suffix == ".json":
        metrics_path, raw_path = out, out.with_name(out.stem + ".raw.json")
    else:
        metrics_path, raw_path = out / METRICS_FILE, out / RAW_FILE
    metrics = {k: v for k, v in result.items() if k != "raw"}
    if "raw" in result:
        write_json(raw_path, result["raw"], indent=None)
    write_json(metrics_path, metrics)
    return metrics_path


# --------------------------------------------------------------------------------------------
# progress


class _progress:
    def __init__(self, enabled: bool, n_score: int, n_gen: int):
        self.enabled, self.n_score, self.n_gen = enabled, n_score, n_gen
        self._p = None

    def __enter__(self):
        if not self.enabled:
            return (None, None)
        from rich.progress import Progress

        self._p = Progress(transient=True)
        self._p.__enter__()
        t1 = self._p.add_task("scoring answers", total=self.n_score)
        t2 = self._p.add_task("generating answers", total=self.n_gen)
        return (lambda n: self._p.advance(t1, n), lambda n: self._p.advance(t2, n))

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
        return False


# --------------------------------------------------------------------------------------------
# CLI: rayunlearn eval MODEL_OR_RUN


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def eval_command(model_or_run: str, preset=None, overrides=None, out=None) -> int:
    """`rayunlearn eval MODEL_OR_RUN [key=value ...]`: evaluate a model directory or a run's final
    model (its saved data/model config is the default, preset and overrides on top), print a
    summary table, write metrics.json + raw.json (+ tofu_eval/ in the original log format)."""
    import yaml

    from rayunlearn import config as C

    path = Path(model_or_run)
    if not path.exists():
        raise UserError(f"{model_or_run}: no such model or run directory")
    base: dict = {}
    if (path / CONFIG_FILE).exists():
        saved = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
        base = {k: saved[k] for k in ("data", "model", "eval") if isinstance(saved.get(k), dict)}
    if preset is not None:
        base = _merge(base, C.read_preset(preset))
    cfg = C.load_config(C.UnlearnConfig, None, overrides, data=base)
    from rayunlearn.data import load_benchmark
    from rayunlearn.models import load_model
    from rayunlearn.models.checkpoints import resolve_model_dir

    model_dir = resolve_model_dir(path)
    model, tokenizer = load_model(cfg.model, str(model_dir))
    benchmark = load_benchmark(cfg.data)
    result = evaluate_model(model, tokenizer, benchmark, cfg.data, cfg.eval,
                            retain_reference=cfg.eval.retain_reference, progress=True)
    out_dir = Path(out) if out else path
    metrics_path = write_eval(result, out_dir)
    if "rougeL_recall" in result["raw"]["forget"]:
        from rayunlearn.eval.tofu_logs import export_tofu_logs

        export_tofu_logs(result, (out_dir.parent if out_dir.suffix == ".json" else out_dir) / TOFU_EVAL_DIR)
    print_summary(result, title=f"TOFU evaluation of {model_dir}")
    print(f"wrote {metrics_path}")
    return 0


def print_summary(result: dict, title: str = "TOFU evaluation") -> None:
    """A rich table of the headline numbers."""
    from rich.console import Console
    from rich.table import Table

    def f(x):
        return "—" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))

    t = Table(title=title)
    t.add_column("split")
    for c in ("prob", "rouge", "truth_ratio", "extraction_strength", "exact_memorization"):
        t.add_column(c, justify="right")
    for key in SPLITS:
        b = result[key]
        t.add_row(key, *(f(b.get(c)) for c in ("prob", "rouge", "truth_ratio", "extraction_strength",
                                                 "exact_memorization")))
    s = Table(show_header=False)
    for k in ("model_utility", "forget_quality", "ks_statistic", "ks_n", "removal", "removal_report", "removal_kind",
              "retention"):
        s.add_row(k, f(result.get(k)))
    for k, v in result["mia"].items():
        s.add_row(f"mia.{k}", f(v))
    fp = result["fingerprint"]
    s.add_row("items", ", ".join(f"{k}={v}" for k, v in fp["items"].items()))
    console = Console()
    console.print(t)
    console.print(s)
