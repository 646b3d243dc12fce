"""The benchmark in memory (:class:`Benchmark`) and its validation.

Records use TOFU's field names: ``question``, ``answer`` everywhere; the forget/retain
evaluation sets (``forgetXX_perturbed``, ``retain_perturbed``) add ``paraphrased_answer`` and
``perturbed_answer`` (a non-empty list of wrong answers; ``paraphrased_question`` is checked
when present); ``real_authors_perturbed`` and ``world_facts_perturbed`` add
``perturbed_answer``. Extra keys (the synthetic ``author``, ``attribute``) are allowed. Every
text is non-blank: an empty answer would be "unlearned" by its end-of-sequence token alone, an
empty perturbed answer makes the truth ratio meaningless. A forget split's ``_perturbed`` set
(what the forget metrics are computed on) holds every forget question exactly once.

Validation errors are :class:`DataError` messages that name the file, the record index and the
field, so a user can open the file and fix the record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from rayunlearn import UserError

FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
AUTHOR_EVAL_SPLITS = ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed")
WORLD_EVAL_SPLITS = ("real_authors_perturbed", "world_facts_perturbed")
SPLIT_NAMES = ("full",) + FORGET_SPLITS + tuple(RETAIN_OF.values()) + AUTHOR_EVAL_SPLITS \
    + WORLD_EVAL_SPLITS + tuple(HOLDOUT_OF.values()) + ("world",)


class DataError(UserError):
    """A benchmark that cannot be found, read or validated; the message says where and why."""


@dataclass
class Benchmark:
    """A loaded benchmark: named splits of QA records plus the refusal answers.

    ``files`` maps each split to where it was read from (a path or ``hub-id:config``), used in
    error messages; ``meta`` holds the synthetic generator's meta.json when there is one."""

    name: str
    source: str
    splits: dict[str, list[dict]]
    refusals: list[str]
    files: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> list[dict]:
        """The records of split `name`; a :class:`DataError` lists the available splits."""
        if name not in self.splits:
            raise DataError(f"benchmark {self.name!r} ({self.source}) has no split {name!r}; "
                            f"available splits: {', '.join(sorted(self.splits)) or 'none'}")
        return self.splits[name]

    def has(self, name: str) -> bool:
        return name in self.splits


def required_fields(split: str) -> tuple[str, ...]:
    """The fields every record of `split` must carry (besides the always-required QA pair)."""
    if split in AUTHOR_EVAL_SPLITS or (split.endswith("_perturbed") and split.startswith(("forget", "retain"))):
        return ("question", "answer", "paraphrased_answer", "perturbed_answer")
    if split.endswith("_perturbed"):
        return ("question", "answer", "perturbed_answer")
    return ("question", "answer")


_OPTIONAL_STR = ("paraphrased_question", "paraphrased_answer")


def validate_records(split: str, records, where: str) -> None:
    """Check one split: a non-empty list of mappings with the split kind's fields and types.

    `where` names the file (or hub config) in error messages."""
    if not isinstance(records, list):
        raise DataError(f"{where}: split {split!r} must be a list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{where}: split {split!r} is empty; every split needs at least one record")
    need = required_fields(split)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: record {i} must be a JSON object with fields {', '.join(need)}, "
                            f"got {type(rec).__name__}")
        for key in need:
            if key not in rec:
                raise DataError(f"{where}: record {i} is missing field {key!r} "
                                f"(split {split!r} needs {', '.join(need)})")
        for key in ("question", "answer") + _OPTIONAL_STR:
            if key not in rec or (rec[key] is None and key not in need):   # optional fields may be null
                continue
            if not isinstance(rec[key], str):
                raise DataError(f"{where}: record {i}: field {key!r} must be a string, "
                                f"got {type(rec[key]).__name__} {str(rec[key])[:60]!r}")
            if not rec[key].strip():
                raise DataError(f"{where}: split {split!r}, record {i}: field {key!r} is empty "
                                f"({rec[key]!r}); give the text or remove the record")
        if "perturbed_answer" in need:
            pa = rec["perturbed_answer"]
            if not isinstance(pa, list) or not pa or not all(isinstance(x, str) for x in pa):
                raise DataError(f"{where}: record {i}: field 'perturbed_answer' must be a non-empty "
                                f"list of strings, got {str(pa)[:80]}")
            blank = [j for j, x in enumerate(pa) if not x.strip()]
            if blank:
                raise DataError(f"{where}: split {split!r}, record {i}: perturbed_answer[{blank[0]}] is "
                                f"empty ({pa[blank[0]]!r}); every perturbed answer needs its text")


def qa_key(rec: dict) -> tuple[str, str]:
    return (rec["question"], rec["answer"])


def validate_relations(splits: dict[str, list[dict]], files: dict[str, str]) -> None:
    """Cross-split checks: every forget split is a subset of ``full`` (by question+answer), and
    each retain split present is exactly ``full`` minus its forget split (as a multiset)."""
    if "full" not in splits:
        return
    full = Counter(qa_key(r) for r in splits["full"])
    for forget, retain in RETAIN_OF.items():
        if forget not in splits:
            continue
        where = files.get(forget, forget)
        fcount: Counter = Counter()
        for i, rec in enumerate(splits[forget]):
            key = qa_key(rec)
            fcount[key] += 1
            if fcount[key] > full.get(key, 0):
                raise DataError(f"{where}: record {i} (question {rec['question'][:80]!r}) is not in the "
                                f"full split ({files.get('full', 'full')}); a forget split must be a "
                                f"subset of full")
        if retain not in splits:
            continue
        expected = full - fcount
        rwhere = files.get(retain, retain)
        rcount: Counter = Counter()
        for i, rec in enumerate(splits[retain]):
            key = qa_key(rec)
            rcount[key] += 1
            if rcount[key] > expected.get(key, 0):
                what = "is in the forget split" if key in fcount else "is not in the full split"
                raise DataError(f"{rwhere}: record {i} (question {rec['question'][:80]!r}) {what}; "
                                f"{retain} must be exactly full minus {forget}")
        if rcount != expected:
            missing = sum((expected - rcount).values())
            raise DataError(f"{rwhere}: {retain} lacks {missing} record(s) of full that are not in "
                            f"{forget}; {retain} must be exactly full minus {forget}")
    for forget in FORGET_SPLITS:
        if forget in splits and f"{forget}_perturbed" in splits:
            validate_perturbed_cover(forget, splits, files)


def validate_perturbed_cover(forget: str, splits: dict[str, list[dict]], files: dict[str, str]) -> None:
    """``<forget>_perturbed`` must hold every question of ``forget`` exactly once (as many times
    as ``forget`` does): the forget metrics are computed on it, so a subset or duplicates would
    evaluate another set than the one unlearned."""
    perturbed = f"{forget}_perturbed"
    where = files.get(perturbed, perturbed)
    expected = Counter(r["question"] for r in splits[forget])
    seen: Counter = Counter()
    for i, rec in enumerate(splits[perturbed]):
        q = rec["question"]
        seen[q] += 1
        if seen[q] > expected.get(q, 0):
            what = (f"duplicates a record (the question appears {expected[q]} time(s) in {forget})"
                    if q in expected else f"is not a question of {forget} ({files.get(forget, forget)})")
            raise DataError(f"{where}: record {i} (question {q[:80]!r}) {what}; {perturbed} must hold "
                            f"every {forget} question exactly once")
    missing = list((expected - seen).elements())
    if missing:
        raise DataError(f"{where}: {perturbed} covers {sum(seen.values())} of the {sum(expected.values())} "
                        f"records of {forget} ({files.get(forget, forget)}); missing {len(missing)}, e.g. "
                        f"question {missing[0][:80]!r}; {perturbed} must hold every {forget} question "
                        f"exactly once")


def validate_benchmark(b: Benchmark, required: Iterable[str] = ()) -> None:
    """Validate every split of `b`, require the splits in `required`, check the relations."""
    missing = [s for s in required if s not in b.splits]
    if missing:
        raise DataError(f"benchmark {b.name!r} ({b.source}) lacks the required split(s) "
                        f"{', '.join(missing)}; found: {', '.join(sorted(b.splits)) or 'nothing'}. "
                        f"Provide {', '.join(s + '.json' for s in missing)} (TOFU format).")
    for name, records in b.splits.items():
        validate_records(name, records, b.files.get(name, name))
    validate_relations(b.splits, b.files)
    if not b.refusals or not all(isinstance(r, str) and r.strip() for r in b.refusals):
        raise DataError(f"benchmark {b.name!r}: the refusal list must hold non-empty strings")
