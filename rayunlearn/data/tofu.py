"""Reading TOFU-format benchmarks: a local directory of JSON files, or the hub (``locuslab/TOFU``).

A local directory holds one file per split, ``<split>.json`` or ``<split>.jsonl``; each may be a
JSON array (what ``rayunlearn data synth`` writes) or JSON lines (what TOFU's own files are).
Only the known split names are read (see ``schema.SPLIT_NAMES``); other files are ignored.
Refusal answers come from ``idontknow.jsonl`` (TOFU's file: plain text, one answer per line; a
line holding a JSON string is accepted too) and fall back to the built-in list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from rayunlearn.data.schema import (RETAIN_OF, SPLIT_NAMES, Benchmark, DataError,
                                    validate_benchmark)

HUB_ID = "locuslab/TOFU"
DEFAULT_TOFU_DIR = "results/data/tofu"   # a local copy looked for when data.tofu_dir is unset
REFUSAL_FILES = ("idontknow.jsonl", "idontknow.txt", "idontknow.json")


def builtin_refusals() -> list[str]:
    """The built-in "I don't know"-style answers (the synthetic benchmark's list)."""
    from rayunlearn.data.synth import REFUSALS

    return list(REFUSALS)


def required_splits(forget_split: str) -> tuple[str, ...]:
    """Splits an unlearning run on `forget_split` cannot do without."""
    return ("full", forget_split, f"{forget_split}_perturbed", "retain_perturbed",
            "real_authors_perturbed", "world_facts_perturbed")


def read_records(path: str | Path) -> list:
    """The records of one split file: a JSON array, or JSON lines (one object per line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
        if not isinstance(data, list):  # pragma: no cover - a '[' start always parses to a list
            raise DataError(f"{path}: expected a JSON array of records")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); a split file must be "
                            f"a JSON array or JSON lines with one record per line") from None
    return records


def read_refusals(path: str | Path) -> list[str]:
    """Refusal answers from a file: plain text or JSON strings, one per line (or a JSON array)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        data = json.loads(text)
        return [str(x).strip() for x in data if str(x).strip()]
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = line
        if isinstance(value, dict):
            value = value.get("answer") or value.get("text") or line
        out.append(value.strip() if isinstance(value, str) else line)
    return out


def split_files(directory: Path) -> dict[str, Path]:
    """Known split name -> file in `directory` (``.json`` preferred over ``.jsonl``)."""
    found: dict[str, Path] = {}
    for name in SPLIT_NAMES:
        for ext in (".json", ".jsonl"):
            p = directory / f"{name}{ext}"
            if p.is_file():
                found[name] = p
                break
    return found


def has_benchmark(directory: str | Path) -> bool:
    d = Path(directory)
    return d.is_dir() and "full" in split_files(d)


def derive_retain(b: Benchmark, forget_split: str) -> None:
    """Add the retain split of `forget_split` as full minus forget when no file holds it."""
    retain = RETAIN_OF[forget_split]
    if retain in b.splits or "full" not in b.splits or forget_split not in b.splits:
        return
    from collections import Counter

    from rayunlearn.data.schema import qa_key

    drop = Counter(qa_key(r) for r in b.splits[forget_split])
    kept = []
    for rec in b.splits["full"]:
        key = qa_key(rec)
        if drop.get(key, 0) > 0:
            drop[key] -= 1
        else:
            kept.append(rec)
    b.splits[retain] = kept
    b.files[retain] = f"{b.files.get('full', 'full')} minus {b.files.get(forget_split, forget_split)}"


def load_local_dir(directory: str | Path, forget_split: str, name: str | None = None,
                   source: str | None = None) -> Benchmark:
    """Load and validate a directory of TOFU-format files (all known splits found there)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"benchmark directory {d} does not exist. Set data.benchmark to 'synthetic', "
                        f"'tofu', or a directory holding TOFU-format JSON files (full.json, "
                        f"{forget_split}.json, ...)")
    files = split_files(d)
    if not files:
        raise DataError(f"{d} holds no benchmark split files (looked for full.json / full.jsonl, "
                        f"{forget_split}.json, ... in TOFU's format)")
    splits = {}
    for split, path in files.items():
        splits[split] = read_records(path)
    refusals = builtin_refusals()
    for fname in REFUSAL_FILES:
        if (d / fname).is_file():
            refusals = read_refusals(d / fname)
            break
    meta = {}
    if (d / "meta.json").is_file():
        try:
            meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            meta = {}
    b = Benchmark(name=name or d.name, source=source or str(d), splits=splits, refusals=refusals,
                  files={k: str(v) for k, v in files.items()}, meta=meta)
    derive_retain(b, forget_split)
    validate_benchmark(b, required=required_splits(forget_split))
    return b


def _hub_split(config_name: str) -> list[dict]:
    import datasets

    ds = datasets.load_dataset(HUB_ID, config_name, split="train")
    return [dict(r) for r in ds]


def _hub_refusals() -> list[str] | None:
    """TOFU's idontknow.jsonl from the hub repository, or None when it cannot be fetched."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(HUB_ID, "idontknow.jsonl", repo_type="dataset")
        refusals = read_refusals(path)
        return refusals or None
    except Exception:  # noqa: BLE001 - the file is optional; the built-in list stands in
        return None


def load_hub(forget_split: str, extra: Iterable[str] = ()) -> Benchmark:
    """Load TOFU's splits from the hub through ``datasets`` (config name = split name).

    The required splits must load; the retain complement, the holdout split and `extra` are
    taken when available. Failure to reach the hub raises one :class:`DataError`."""
    required = required_splits(forget_split)
    optional = [RETAIN_OF[forget_split], "holdout" + forget_split[-2:], *extra]
    splits: dict[str, list[dict]] = {}
    files: dict[str, str] = {}
    for split in required:
        try:
            splits[split] = _hub_split(split)
        except Exception as exc:  # noqa: BLE001 - any failure here means "no data": say how to fix
            raise DataError(tofu_unavailable_message(forget_split, split, exc)) from None
        files[split] = f"{HUB_ID}:{split}"
    for split in optional:
        if split in splits:
            continue
        try:
            splits[split] = _hub_split(split)
            files[split] = f"{HUB_ID}:{split}"
        except Exception:  # noqa: BLE001 - optional split
            pass
    refusals = _hub_refusals() or builtin_refusals()
    b = Benchmark(name="tofu", source=f"hub:{HUB_ID}", splits=splits, refusals=refusals, files=files)
    derive_retain(b, forget_split)
    validate_benchmark(b, required=required)
    return b


def tofu_unavailable_message(forget_split: str, split: str, exc: BaseException) -> str:
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return (f"cannot load the TOFU benchmark. Tried: (1) a local copy in {DEFAULT_TOFU_DIR} (not "
            f"found); (2) the hub dataset {HUB_ID!r} (config {split!r}) through `datasets`, which "
            f"failed ({reason[:300]}). To fix: download the TOFU JSON files (full.json, "
            f"{forget_split}.json, {forget_split}_perturbed.json, retain_perturbed.json, "
            f"real_authors_perturbed.json, world_facts_perturbed.json, ...) into a directory and pass "
            f"data.tofu_dir=/path/to/dir (or put them in {DEFAULT_TOFU_DIR}); or run once with network "
            f"access (without HF_HUB_OFFLINE=1) so the datasets cache holds a copy; or use "
            f"data.benchmark=synthetic for the embedded benchmark.")
