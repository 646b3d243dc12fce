"""Benchmark data: the TOFU schema, the synthetic generator, the TOFU loader, formatting.

    b = load_benchmark(DataConfig())          # synthetic: generated on first use
    b.split("forget10"), b.refusals

``rayunlearn.data.formatting`` turns records into token batches (imported separately: it needs
torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from rayunlearn.data.schema import (FORGET_SPLITS, HOLDOUT_OF, RETAIN_OF, SPLIT_NAMES, Benchmark,
                                    DataError, validate_benchmark)

__all__ = ["Benchmark", "DataError", "load_benchmark", "describe_benchmark", "benchmark_corpus",
           "FORGET_SPLITS", "RETAIN_OF", "HOLDOUT_OF", "SPLIT_NAMES", "validate_benchmark"]

# words of the prompt templates in formatting.py, so the tiny tokenizer learns them
TEMPLATE_TEXTS = ("Question: ", "\nAnswer: ", "[INST] ", " [/INST] ")
QA_TEXT_FIELDS = ("question", "answer", "paraphrased_question", "paraphrased_answer")


def _synthetic_is_current(out: Path, synth_cfg) -> bool:
    from rayunlearn.data.synth import FORMAT_VERSION, config_fingerprint
    from rayunlearn.data.tofu import split_files

    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("format_version") != FORMAT_VERSION or meta.get("config") != config_fingerprint(synth_cfg):
        return False
    return set(meta.get("splits", {})) <= set(split_files(out))


def load_benchmark(data_cfg) -> Benchmark:
    """Load (and validate) the benchmark `data_cfg.benchmark` names.

    - ``"synthetic"``: the embedded benchmark in ``data_cfg.synth.out``, generated first when
      missing or when its meta.json records another config; then read like any directory.
    - ``"tofu"``: ``data_cfg.tofu_dir`` when set; else a local copy in ``results/data/tofu``
      when present; else the hub (``locuslab/TOFU`` through ``datasets``, one config per split).
    - anything else: a directory of TOFU-format ``<split>.json`` / ``<split>.jsonl`` files.

    ``full``, the forget split, its ``_perturbed`` set, ``retain_perturbed``,
    ``real_authors_perturbed`` and ``world_facts_perturbed`` are required; the retain split is
    derived as full minus forget when absent."""
    from rayunlearn.data import tofu

    forget = data_cfg.forget_split
    kind = data_cfg.benchmark
    if kind == "synthetic":
        from rayunlearn.data.synth import synthesize

        out = Path(data_cfg.synth.out)
        if not _synthetic_is_current(out, data_cfg.synth):
            synthesize(data_cfg.synth)
        return tofu.load_local_dir(out, forget, name="synthetic", source=str(out))
    if kind == "tofu":
        if data_cfg.tofu_dir:
            d = Path(data_cfg.tofu_dir)
            if not tofu.has_benchmark(d):
                raise DataError(f"data.tofu_dir={d} holds no TOFU files (looked for full.json or "
                                f"full.jsonl there). Put the TOFU JSON files (full, {forget}, "
                                f"{forget}_perturbed, retain_perturbed, real_authors_perturbed, "
                                f"world_facts_perturbed) in it, or unset data.tofu_dir to use the hub.")
            return tofu.load_local_dir(d, forget, name="tofu", source=str(d))
        if tofu.has_benchmark(tofu.DEFAULT_TOFU_DIR):
            return tofu.load_local_dir(tofu.DEFAULT_TOFU_DIR, forget, name="tofu")
        return tofu.load_hub(forget)
    return tofu.load_local_dir(kind, forget)


def describe_benchmark(b: Benchmark) -> str:
    """A human-readable table of the splits (record counts, fields) for ``rayunlearn data check``."""
    lines = [f"benchmark {b.name}  (source: {b.source})", ""]
    width = max(len(s) for s in b.splits) if b.splits else 5
    lines.append(f"{'split':<{width}}  {'records':>7}  fields")
    for name in [s for s in SPLIT_NAMES if s in b.splits] + sorted(set(b.splits) - set(SPLIT_NAMES)):
        recs = b.splits[name]
        fields = sorted({k for r in recs for k in r}) if recs else []
        lines.append(f"{name:<{width}}  {len(recs):>7}  {', '.join(fields)}")
    lines.append("")
    lines.append(f"refusal answers: {len(b.refusals)}")
    if b.meta.get("authors"):
        a = b.meta["authors"]
        lines.append("authors: " + ", ".join(f"{k} {v}" for k, v in a.items()))
    lines.append("valid: all splits have their TOFU fields and no empty texts; forget splits are subsets "
                 "of full; retain = full - forget; each forget split's perturbed set holds its questions once")
    return "\n".join(lines)


def benchmark_corpus(b: Benchmark) -> list[str]:
    """Every distinct text of the benchmark, in a fixed order, for training a tokenizer:
    questions, answers, paraphrases, perturbed answers of every split, the refusal answers and
    the prompt templates' words."""
    seen: set = set()
    out: list[str] = []

    def add(text):
        if isinstance(text, str) and text and text not in seen:
            seen.add(text)
            out.append(text)

    for t in TEMPLATE_TEXTS:
        add(t)
    for name in [s for s in SPLIT_NAMES if s in b.splits] + sorted(set(b.splits) - set(SPLIT_NAMES)):
        for rec in b.splits[name]:
            for key in QA_TEXT_FIELDS:
                add(rec.get(key))
            pa = rec.get("perturbed_answer")
            if isinstance(pa, list):
                for t in pa:
                    add(t)
    for r in b.refusals:
        add(r)
    return out
