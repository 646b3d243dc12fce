"""Loading TOFU-format data: local JSON-lines files, validation errors, the hub path, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rayunlearn.config import DataConfig  # noqa: E402
from rayunlearn.data import load_benchmark, tofu  # noqa: E402
from rayunlearn.data.schema import DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _qa(author: str, i: int) -> dict:
    return {"question": f"What is fact {i} about {author}?", "answer": f"{author} has fact {i}.",
            "paraphrased_question": f"Tell me fact {i} of {author}.",
            "paraphrased_answer": f"Fact {i} of {author} holds.",
            "perturbed_answer": [f"{author} has fact {i + 10}.", f"{author} has fact {i + 20}."]}


def _tofu_splits() -> dict[str, list[dict]]:
    """3 authors x 2 QA; forget01 = the last author (like TOFU)."""
    full = [_qa(a, i) for a in ("Ann Lee", "Bo Chan", "Cy Dorn") for i in (1, 2)]
    world = [{"question": "What is the capital of Eldor?", "answer": "Eldor's capital is Vim.",
              "perturbed_answer": ["Eldor's capital is Rok.", "Eldor's capital is Tal.", "Eldor's capital is Pun."]}]
    real = [{"question": "Who wrote Fables?", "answer": "Fables was written by Orm.",
             "perturbed_answer": ["Fables was written by Ulf."]}]
    return {
        # TOFU's own full.json holds only question/answer
        "full": [{"question": r["question"], "answer": r["answer"]} for r in full],
        "forget01": [{"question": r["question"], "answer": r["answer"]} for r in full[4:]],
        "retain99": [{"question": r["question"], "answer": r["answer"]} for r in full[:4]],
        "forget01_perturbed": full[4:],
        "retain_perturbed": full[:2],
        "real_authors_perturbed": real,
        "world_facts_perturbed": world,
    }


def _write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _write_dir(d: Path, splits=None, fmt: str = "jsonl-in-json") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, recs in (splits or _tofu_splits()).items():
        if fmt == "jsonl-in-json":        # TOFU: JSON lines in files named .json
            _write_jsonl(d / f"{name}.json", recs)
        elif fmt == "array":
            (d / f"{name}.json").write_text(json.dumps(recs, indent=1))
        else:
            _write_jsonl(d / f"{name}.jsonl", recs)
    return d


def _cfg(d, forget="forget01", **kw) -> DataConfig:
    return DataConfig(benchmark=str(d), forget_split=forget, **kw)


@pytest.mark.parametrize("fmt", ["jsonl-in-json", "array", "jsonl"])
def test_local_directory_formats(tmp_path, fmt):
    d = _write_dir(tmp_path / "tofu", fmt=fmt)
    (d / "idontknow.jsonl").write_text("I have no idea.\n\"Not sure, sorry.\"\n\n")
    (d / "notes.json").write_text("{not a split}")    # unknown files are ignored
    b = load_benchmark(_cfg(d))
    assert b.name == "tofu" and b.source == str(d)
    assert [r["answer"] for r in b.split("forget01")] == ["Cy Dorn has fact 1.", "Cy Dorn has fact 2."]
    assert len(b.split("full")) == 6 and len(b.split("retain99")) == 4
    assert b.split("forget01_perturbed")[0]["perturbed_answer"] == ["Cy Dorn has fact 11.", "Cy Dorn has fact 21."]
    assert b.refusals == ["I have no idea.", "Not sure, sorry."]
    assert b.files["full"].endswith("full.json" if fmt != "jsonl" else "full.jsonl")


def test_retain_derived_and_builtin_refusals(tmp_path):
    splits = _tofu_splits()
    del splits["retain99"]
    d = _write_dir(tmp_path / "t", splits)
    b = load_benchmark(_cfg(d))
    assert [r["question"] for r in b.split("retain99")] == [r["question"] for r in splits["full"][:4]]
    assert b.refusals[0] == "I don't know." and len(b.refusals) >= 30
    # tofu + tofu_dir reads the same directory
    b2 = load_benchmark(DataConfig(benchmark="tofu", tofu_dir=str(d), forget_split="forget01"))
    assert b2.name == "tofu" and len(b2.split("full")) == 6


def _broken(tmp_path, split, index, mutate):
    splits = _tofu_splits()
    mutate(splits[split][index]) if index is not None else mutate(splits)
    return _write_dir(tmp_path / "bad", splits)


@pytest.mark.parametrize("split,index,mutate,pattern", [
    ("forget01_perturbed", 1, lambda r: r.pop("paraphrased_answer"),
     r"forget01_perturbed\.json: record 1 is missing field 'paraphrased_answer'"),
    ("full", 3, lambda r: r.pop("answer"), r"full\.json: record 3 is missing field 'answer'"),
    ("retain_perturbed", 0, lambda r: r.update(perturbed_answer="wrong"),
     r"retain_perturbed\.json: record 0: field 'perturbed_answer' must be a non-empty list of strings"),
    ("world_facts_perturbed", 0, lambda r: r.update(perturbed_answer=[]),
     r"world_facts_perturbed\.json: record 0: field 'perturbed_answer' must be a non-empty list"),
    ("real_authors_perturbed", 0, lambda r: r.update(perturbed_answer=["ok", 3]),
     r"real_authors_perturbed\.json: record 0: field 'perturbed_answer'"),
    ("forget01", 0, lambda r: r.update(question=42), r"forget01\.json: record 0: field 'question' must be a string, got int"),
    ("forget01_perturbed", 0, lambda r: r.update(paraphrased_question=["x"]),
     r"forget01_perturbed\.json: record 0: field 'paraphrased_question' must be a string"),
    ("forget01", 1, lambda r: r.update(answer="Cy Dorn has no such fact."),
     r"forget01\.json: record 1 .*is not in the full split .*full\.json.*subset of full"),
    ("retain99", 2, lambda r: r.update(question="What is fact 1 about Cy Dorn?", answer="Cy Dorn has fact 1."),
     r"retain99\.json: record 2 .*is in the forget split; retain99 must be exactly full minus forget01"),
])
def test_malformed_records_name_file_record_field(tmp_path, split, index, mutate, pattern):
    d = _broken(tmp_path, split, index, mutate)
    with pytest.raises(DataError, match=pattern):
        load_benchmark(_cfg(d))


def test_empty_missing_and_unparsable_splits(tmp_path):
    d = _write_dir(tmp_path / "a")
    (d / "forget01.json").write_text("")
    with pytest.raises(DataError, match=r"forget01\.json: split 'forget01' is empty"):
        load_benchmark(_cfg(d))

    d = _write_dir(tmp_path / "b")
    (d / "world_facts_perturbed.json").unlink()
    with pytest.raises(DataError, match=r"lacks the required split\(s\) world_facts_perturbed"):
        load_benchmark(_cfg(d))
    with pytest.raises(DataError, match=r"required split\(s\) forget05, forget05_perturbed"):
        load_benchmark(_cfg(_write_dir(tmp_path / "c"), forget="forget05"))

    d = _write_dir(tmp_path / "d")
    with open(d / "full.json", "a") as fh:
        fh.write("{broken\n")
    with pytest.raises(DataError, match=r"full\.json: line 7 is not valid JSON"):
        load_benchmark(_cfg(d))

    d = _write_dir(tmp_path / "e")
    splits = _tofu_splits()
    splits["retain99"] = splits["retain99"][:3]
    _write_dir(d, splits)
    with pytest.raises(DataError, match=r"retain99 lacks 1 record"):
        load_benchmark(_cfg(d))

    with pytest.raises(DataError, match="does not exist"):
        load_benchmark(_cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no benchmark split files"):
        load_benchmark(_cfg(tmp_path / "empty"))
    with pytest.raises(DataError, match="data.tofu_dir=.*holds no TOFU files"):
        load_benchmark(DataConfig(benchmark="tofu", tofu_dir=str(tmp_path / "empty")))


def test_hub_path_with_monkeypatched_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)      # no results/data/tofu copy here
    hub = _tofu_splits()
    hub["holdout01"] = [{"question": "What is fact 1 about Di Ebb?", "answer": "Di Ebb has fact 1."}]
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        if name not in hub:
            raise ValueError(f"BuilderConfig {name} not found")
        return list(hub[name])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(tofu, "_hub_refusals", lambda: None)
    b = load_benchmark(DataConfig(benchmark="tofu", forget_split="forget01"))
    assert b.name == "tofu" and b.source == "hub:locuslab/TOFU"
    assert all(c[0] == "locuslab/TOFU" and c[2] == "train" for c in calls)
    assert [c[1] for c in calls[:6]] == ["full", "forget01", "forget01_perturbed", "retain_perturbed",
                                         "real_authors_perturbed", "world_facts_perturbed"]
    assert b.split("holdout01")[0]["answer"] == "Di Ebb has fact 1."
    assert len(b.split("retain99")) == 4 and b.files["full"] == "locuslab/TOFU:full"
    assert b.refusals[0] == "I don't know."

    # a failing required config gives the one clear error
    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'locuslab/TOFU' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"results/data/tofu.*locuslab/TOFU.*data\.tofu_dir="):
        load_benchmark(DataConfig(benchmark="tofu", forget_split="forget01"))

    # a local copy in results/data/tofu is used before the hub
    _write_dir(tmp_path / "results" / "data" / "tofu")
    b = load_benchmark(DataConfig(benchmark="tofu", forget_split="forget01"))
    assert b.files["full"].endswith("full.json") and len(b.split("full")) == 6


def test_offline_hub_fails_fast_with_clear_message(tmp_path):
    """Real `datasets` with HF_HUB_OFFLINE=1 and an empty cache: one DataError, no retries."""
    code = ("from rayunlearn.config import DataConfig\n"
            "from rayunlearn.data import load_benchmark\n"
            "try:\n"
            "    load_benchmark(DataConfig(benchmark='tofu'))\n"
            "except Exception as e:\n"
            "    print(type(e).__name__ + ': ' + str(e))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    out = proc.stdout.strip()
    assert out.startswith("DataError: cannot load the TOFU benchmark"), proc.stdout + proc.stderr
    assert "locuslab/TOFU" in out and "results/data/tofu" in out and "data.tofu_dir=" in out
    assert "HF_HUB_OFFLINE" in out


def test_read_refusals_formats(tmp_path):
    p = tmp_path / "idk.jsonl"
    p.write_text('I do not know.\n{"answer": "No clue."}\n"Quoted."\n42\n')
    assert tofu.read_refusals(p) == ["I do not know.", "No clue.", "Quoted.", "42"]
    p.write_text('["A.", "B."]')
    assert tofu.read_refusals(p) == ["A.", "B."]


# ------------------------------------------------------------------------------------------
# empty texts and perturbed splits that do not cover their forget split


@pytest.mark.parametrize("split, index, mutate, message", [
    ("forget01", 0, lambda r: r.update(answer=""),
     "forget01.json: split 'forget01', record 0: field 'answer' is empty ('')"),
    ("full", 2, lambda r: r.update(question="  \t"),
     "full.json: split 'full', record 2: field 'question' is empty ('  \\t')"),
    ("forget01_perturbed", 1, lambda r: r.update(paraphrased_answer=" "),
     "forget01_perturbed.json: split 'forget01_perturbed', record 1: field 'paraphrased_answer' is empty (' ')"),
    ("retain_perturbed", 0, lambda r: r.update(paraphrased_question=""),
     "retain_perturbed.json: split 'retain_perturbed', record 0: field 'paraphrased_question' is empty ('')"),
    ("forget01_perturbed", 0, lambda r: r.update(perturbed_answer=["Cy Dorn has fact 11.", ""]),
     "forget01_perturbed.json: split 'forget01_perturbed', record 0: perturbed_answer[1] is empty ('')"),
    ("world_facts_perturbed", 0, lambda r: r.update(perturbed_answer=["\n"]),
     "world_facts_perturbed.json: split 'world_facts_perturbed', record 0: perturbed_answer[0] is empty ('\\n')"),
    ("forget01_perturbed", 1, lambda r: r.update(perturbed_answer=[]),
     "forget01_perturbed.json: record 1: field 'perturbed_answer' must be a non-empty list of strings, got []"),
])
def test_empty_texts_are_refused_naming_file_split_and_record(tmp_path, split, index, mutate, message):
    d = _broken(tmp_path, split, index, mutate)
    with pytest.raises(DataError) as err:
        load_benchmark(_cfg(d))
    assert str(err.value).startswith(f"{d}/{message}"), str(err.value)


def _forget_splits(n_authors: int = 2, per_author: int = 5) -> dict[str, list[dict]]:
    """A forget01 of 10 records (the last 2 of 12 authors x 5 QA) with a full perturbed set."""
    full = [_qa(f"Author {a}", i) for a in range(12) for i in range(1, per_author + 1)]
    forget = full[-n_authors * per_author:]
    splits = _tofu_splits()
    splits["full"] = [{"question": r["question"], "answer": r["answer"]} for r in full]
    splits["forget01"] = [{"question": r["question"], "answer": r["answer"]} for r in forget]
    splits["forget01_perturbed"] = forget
    splits["retain_perturbed"] = full[:2]
    del splits["retain99"]
    return splits


def test_perturbed_split_must_cover_every_forget_record_once(tmp_path):
    good = _forget_splits()
    assert len(load_benchmark(_cfg(_write_dir(tmp_path / "ok", good))).split("forget01_perturbed")) == 10

    incomplete = _forget_splits()
    incomplete["forget01_perturbed"] = incomplete["forget01_perturbed"][:3]
    d = _write_dir(tmp_path / "incomplete", incomplete)
    with pytest.raises(DataError) as err:
        load_benchmark(_cfg(d))
    assert str(err.value) == (
        f"{d / 'forget01_perturbed.json'}: forget01_perturbed covers 3 of the 10 records of forget01 "
        f"({d / 'forget01.json'}); missing 7, e.g. question 'What is fact 4 about Author 10?'; "
        f"forget01_perturbed must hold every forget01 question exactly once")

    duplicated = _forget_splits()
    duplicated["forget01_perturbed"] = duplicated["forget01_perturbed"][:9] + [duplicated["forget01_perturbed"][2]]
    d = _write_dir(tmp_path / "duplicated", duplicated)
    with pytest.raises(DataError) as err:
        load_benchmark(_cfg(d))
    assert str(err.value) == (
        f"{d / 'forget01_perturbed.json'}: record 9 (question 'What is fact 3 about Author 10?') duplicates "
        f"a record (the question appears 1 time(s) in forget01); forget01_perturbed must hold every "
        f"forget01 question exactly once")

    foreign = _forget_splits()
    foreign["forget01_perturbed"][4] = _qa("Author 0", 1)
    d = _write_dir(tmp_path / "foreign", foreign)
    with pytest.raises(DataError, match=r"forget01_perturbed\.json: record 4 \(question 'What is fact 1 about "
                                        r"Author 0\?'\) is not a question of forget01"):
        load_benchmark(_cfg(d))


def test_the_evaluation_toy_benchmark_passes_validation():
    from rayunlearn.data.schema import Benchmark, validate_benchmark
    from conftest import toy_benchmark

    toy = toy_benchmark()
    validate_benchmark(Benchmark(toy.name, toy.source, toy.splits, toy.refusals),
                       required=tofu.required_splits("forget01"))
