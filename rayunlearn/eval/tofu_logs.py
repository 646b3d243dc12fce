"""The original TOFU evaluation-log format: read it, summarise it, write it.

A directory per evaluated model holds four JSON files (TOFU's `evaluate_util.py`):

    eval_log.json                      retain_perturbed
    eval_log_forget.json               forgetXX_perturbed
    eval_real_author_wo_options.json   real_authors_perturbed
    eval_real_world_wo_options.json    world_facts_perturbed

each mapping a field to ``{item index (string): value}``: ``avg_gt_loss`` (per-token mean NLL of
the answer), ``gt_loss`` / ``num_token_gt`` (sum and count), ``avg_paraphrased_loss``,
``paraphrased_loss``, ``num_token_paraphrased`` (the *base* answer of the truth ratio: the
paraphrase for retain/forget, the original answer for real authors/world facts),
``average_perturb_loss`` / ``perturb_loss`` / ``num_token_perturb`` (lists of K per item),
``truth_ratio``, ``rougeL_recall``, ``rouge1_recall``, ``generated_text`` ([prompt, generation,
ground truth]); real authors / world facts also ``normalized_gt_loss``.

Summary (as TOFU's `aggregate_eval_stat.py`): probability = mean exp(−avg_gt_loss) for retain and
forget, mean of p/(p + Σ p_pert) for real authors / world facts; ROUGE = mean rougeL_recall; truth
ratio from avg_paraphrased_loss (real authors / world facts: avg_gt_loss when the paraphrase field
is absent) and average_perturb_loss; forget quality = KS p-value between the forget truth ratios
of the model and of the retain model; model utility = harmonic mean of the nine non-forget
numbers.  Unlike TOFU's script, malformed or mismatched inputs are refused (UserError naming the
file and field) instead of silently giving a wrong number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rayunlearn import UserError
from rayunlearn.eval import metrics as M

FILES = {
    "retain": "eval_log.json",
    "forget": "eval_log_forget.json",
    "real_authors": "eval_real_author_wo_options.json",
    "world_facts": "eval_real_world_wo_options.json",
}
ORDER = ("retain", "real_authors", "world_facts", "forget")


class TofuLogError(UserError):
    """A malformed or mismatched TOFU evaluation-log directory."""


# --------------------------------------------------------------------------------------------
# reading


def _load(path: Path) -> dict:
    if not path.exists():
        raise TofuLogError(f"{path}: missing (a TOFU evaluation directory holds {', '.join(FILES.values())})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TofuLogError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TofuLogError(f"{path}: expected a JSON object mapping field names to {{index: value}}")
    return data


def _num(v, path: Path, field: str, idx: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise TofuLogError(f"{path}: field {field!r}, item {idx}: expected a finite number, got {v!r}")
    return float(v)


def _field(data: dict, path: Path, field: str, keys: Optional[list] = None, as_list: bool = False):
    """Values of `field` ordered by integer item index -> (keys, values)."""
    if field not in data:
        raise TofuLogError(f"{path}: missing field {field!r}")
    m = data[field]
    if not isinstance(m, dict) or not m:
        raise TofuLogError(f"{path}: field {field!r} must be a non-empty {{item index: value}} object")
    try:
        ks = sorted(m, key=lambda k: int(k))
    except ValueError:
        raise TofuLogError(f"{path}: field {field!r} has a non-integer item index") from None
    if keys is not None and ks != keys:
        extra, missing = sorted(set(ks) - set(keys), key=int), sorted(set(keys) - set(ks), key=int)
        raise TofuLogError(f"{path}: field {field!r} covers other items than 'avg_gt_loss' "
                           f"(extra {extra[:5]}, missing {missing[:5]})")
    if as_list:
        vals = []
        for k in ks:
            v = m[k]
            if not isinstance(v, list) or not v:
                raise TofuLogError(f"{path}: field {field!r}, item {k}: expected a non-empty list of numbers, got {v!r}")
            vals.append([_num(x, path, field, k) for x in v])
        return ks, vals
    return ks, [_num(m[k], path, field, k) for k in ks]


def read_split(path: Path, split: str) -> dict:
    """The summary-relevant per-item arrays of one TOFU log file (validated)."""
    data = _load(path)
    keys, gt = _field(data, path, "avg_gt_loss")
    if split in ("real_authors", "world_facts") and "avg_paraphrased_loss" not in data:
        base = gt
    else:
        _, base = _field(data, path, "avg_paraphrased_loss", keys)
    _, pert = _field(data, path, "average_perturb_loss", keys, as_list=True)
    _, rouge = _field(data, path, "rougeL_recall", keys)
    return {"index": keys, "avg_gt_loss": gt, "avg_paraphrased_loss": base, "average_perturb_loss": pert,
            "rougeL_recall": rouge}


def read_tofu_dir(eval_dir) -> dict:
    """{split: arrays} for the four files of a TOFU evaluation directory."""
    d = Path(eval_dir)
    if not d.is_dir():
        raise TofuLogError(f"{eval_dir}: not a directory (expected a TOFU evaluation directory with "
                           f"{', '.join(FILES.values())})")
    return {split: read_split(d / name, split) for split, name in FILES.items()}


# --------------------------------------------------------------------------------------------
# summary


def summarize_logs(logs: dict, retain_logs: Optional[dict] = None, names: Optional[tuple] = None) -> dict:
    """Summary dict from read logs (see `summarize_tofu_dir`)."""
    out: dict[str, Any] = {}
    blocks = {}
    for split in ORDER:
        d = logs[split]
        blocks[split] = M.split_scores(split, d["avg_gt_loss"], d["avg_paraphrased_loss"], d["average_perturb_loss"],
                                       d["rougeL_recall"])
    mu = M.model_utility([blocks[s][m] for s in ("retain", "real_authors", "world_facts")
                          for m in ("prob", "rouge", "truth_ratio")])
    fq = None
    if retain_logs is not None:
        a, b = logs["forget"], retain_logs["forget"]
        if a["index"] != b["index"]:
            where = f" ({names[0]} vs {names[1]})" if names else ""
            only_a = sorted(set(a["index"]) - set(b["index"]), key=int)
            only_b = sorted(set(b["index"]) - set(a["index"]), key=int)
            raise TofuLogError(
                f"{FILES['forget']}: the model and the retain reference cover different forget items{where}: "
                f"{len(a['index'])} vs {len(b['index'])} items, only in model {only_a[:5]}, only in retain "
                f"{only_b[:5]}. Evaluate both on the same split and item count.")
        fq = M.forget_quality(M.truth_ratios(a["avg_paraphrased_loss"], a["average_perturb_loss"]),
                              M.truth_ratios(b["avg_paraphrased_loss"], b["average_perturb_loss"]))
    out["model_utility"] = mu
    out["forget_quality"] = fq["pvalue"] if fq else None
    out["ks_statistic"] = fq["statistic"] if fq else None
    for split in ("retain", "real_authors", "world_facts", "forget"):
        out[split] = blocks[split]
    return out


def summarize_tofu_dir(eval_dir, retain_dir=None) -> dict:
    """Summarise a directory in the original TOFU log format:
    ``{"model_utility", "forget_quality" (null without retain_dir), "ks_statistic",
    "retain": {"prob","rouge","truth_ratio"}, "real_authors": {...}, "world_facts": {...},
    "forget": {...}}``."""
    logs = read_tofu_dir(eval_dir)
    retain_logs = read_tofu_dir(retain_dir) if retain_dir is not None else None
    return summarize_logs(logs, retain_logs, names=(str(eval_dir), str(retain_dir)))


def summary_command(eval_dir, retain_dir=None, as_json: bool = False) -> int:
    """`rayunlearn tofu-summary EVAL_DIR [--retain RETAIN_DIR] [--json]`."""
    s = summarize_tofu_dir(eval_dir, retain_dir)
    if as_json:
        print(json.dumps(s))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"TOFU summary of {eval_dir}")
    t.add_column("split")
    for c in ("prob", "rouge", "truth_ratio"):
        t.add_column(c, justify="right")
    for split in ("retain", "real_authors", "world_facts", "forget"):
        t.add_row(split, *(f"{s[split][c]:.4f}" for c in ("prob", "rouge", "truth_ratio")))
    c = Console()
    c.print(t)
    c.print(f"model utility  {s['model_utility']:.4f}")
    if s["forget_quality"] is None:
        c.print("forget quality —  (give --retain RETAIN_DIR)")
    else:
        c.print(f"forget quality {s['forget_quality']:.4g}  (KS statistic {s['ks_statistic']:.4f})")
    return 0


# --------------------------------------------------------------------------------------------
# writing (our evaluation -> the original format)


def export_tofu_logs(raw_eval: dict, out_dir) -> Path:
    """Write our evaluation (the dict from `evaluate_model`, or its ``raw`` part) as the four
    TOFU log files in `out_dir`.  Needs generations (not a ``fast`` evaluation)."""
    from rayunlearn.io import write_json

    raw = raw_eval.get("raw", raw_eval)
    out = Path(out_dir)
    for split, name in FILES.items():
        d = raw.get(split)
        if d is None:
            raise UserError(f"export_tofu_logs: the evaluation has no {split!r} split")
        if "rougeL_recall" not in d:
            raise UserError("export_tofu_logs: the evaluation has no generations/ROUGE (a fast evaluation); "
                            "run a full evaluation to export the TOFU format")
        idx = [str(i) for i in d["index"]]

        def col(field, _idx=idx, _d=d):
            return dict(zip(_idx, _d[field]))

        log = {
            "avg_gt_loss": col("avg_gt_loss"), "gt_loss": col("gt_loss"), "num_token_gt": col("num_token_gt"),
            "generated_text": {i: [q, g, a] for i, q, g, a in zip(idx, d["question"], d["generated"], d["answer"])},
            "rouge1_recall": col("rouge1_recall"), "rougeL_recall": col("rougeL_recall"),
            "average_perturb_loss": col("average_perturb_loss"), "avg_paraphrased_loss": col("avg_paraphrased_loss"),
            "truth_ratio": col("truth_ratio"), "paraphrased_loss": col("paraphrased_loss"),
            "perturb_loss": col("perturb_loss"), "num_token_paraphrased": col("num_token_paraphrased"),
            "num_token_perturb": col("num_token_perturb"),
        }
        if split in ("real_authors", "world_facts"):
            norm = {}
            for i, g, p in zip(idx, d["avg_gt_loss"], d["average_perturb_loss"]):
                pt = math.exp(-g)
                norm[i] = -math.log(pt / (pt + float(np.exp(-np.asarray(p)).sum())))
            log["normalized_gt_loss"] = norm
        write_json(out / name, log, indent=4)
    return out
