"""The synthetic TOFU-format benchmark: splits, fields, determinism, perturbations, loader reuse."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rayunlearn.config import ConfigError, DataConfig, SynthConfig, load_config  # noqa: E402
from rayunlearn.data import benchmark_corpus, describe_benchmark, load_benchmark  # noqa: E402
from rayunlearn.data import synth  # noqa: E402
from rayunlearn.data.schema import DataError, validate_records  # noqa: E402

AUTHOR_FIELDS = {"question": str, "answer": str, "paraphrased_question": str, "paraphrased_answer": str,
                 "perturbed_answer": list, "author": str, "attribute": str}


@pytest.fixture(scope="module")
def gen():
    """The default benchmark, generated in memory once."""
    splits, refusals, meta = synth.generate(SynthConfig())
    return splits, refusals, meta


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "bench"
    path = synth.synthesize(SynthConfig(out=str(out)))
    return Path(path)


def _authors(records):
    """Authors in order of first appearance."""
    return list(dict.fromkeys(r["author"] for r in records))


def _keys(records):
    return [(r["question"], r["answer"]) for r in records]


def test_split_sizes_and_whole_author_forget_sets(gen):
    splits, _, meta = gen
    full_authors = _authors(splits["full"])
    assert len(full_authors) == 200
    for tag, n_auth, retain in (("01", 2, "retain99"), ("05", 10, "retain95"), ("10", 20, "retain90")):
        forget = splits[f"forget{tag}"]
        # whole authors, the last ones of full (like TOFU)
        assert _authors(forget) == full_authors[-n_auth:]
        assert len(forget) == sum(1 for r in splits["full"] if r["author"] in set(full_authors[-n_auth:]))
        # forget is the tail of full, retain the head: retain = full - forget exactly
        assert _keys(splits["full"][len(splits["full"]) - len(forget):]) == _keys(forget)
        assert _keys(splits[retain]) == _keys(splits["full"][: len(splits["full"]) - len(forget)])
        assert not set(_authors(splits[retain])) & set(_authors(forget))
        assert _keys(splits[f"forget{tag}_perturbed"]) == _keys(forget)
        # holdout: as many authors as the forget split, never in full
        hold = splits[f"holdout{tag}"]
        assert len(_authors(hold)) == n_auth
        assert not set(_authors(hold)) & set(full_authors)
        assert not set(_keys(hold)) & set(_keys(splits["full"]))
        assert meta["splits"][f"forget{tag}"] == len(forget)
    # nesting forget01 < forget05 < forget10 and holdout likewise
    assert set(_keys(splits["forget01"])) < set(_keys(splits["forget05"])) < set(_keys(splits["forget10"]))
    assert set(_keys(splits["holdout01"])) < set(_keys(splits["holdout05"])) < set(_keys(splits["holdout10"]))
    # 10..20 QA per author, distinct attributes per author
    per_author = Counter(r["author"] for r in splits["full"] + splits["holdout10"])
    assert min(per_author.values()) >= 10 and max(per_author.values()) <= 20
    for a in full_authors[:20]:
        attrs = [r["attribute"] for r in splits["full"] if r["author"] == a]
        assert len(attrs) == len(set(attrs)) and "full_name" in attrs
    # retain_perturbed: a fixed 400-record subset of retain90
    assert len(splits["retain_perturbed"]) == 400
    assert set(_keys(splits["retain_perturbed"])) <= set(_keys(splits["retain90"]))
    # world knowledge: 240 facts, split 100 / 140 into the two evaluation sets
    assert len(splits["world"]) == 240
    assert len(splits["real_authors_perturbed"]) == 100 and len(splits["world_facts_perturbed"]) == 140
    world = set(_keys(splits["world"]))
    assert set(_keys(splits["real_authors_perturbed"])) | set(_keys(splits["world_facts_perturbed"])) == world


def test_fields_types_perturbations_and_paraphrases(gen):
    splits, refusals, _ = gen
    author_splits = [s for s in splits if s not in ("world", "real_authors_perturbed", "world_facts_perturbed")]
    for name in author_splits:
        validate_records(name, splits[name], name)
        for i, rec in enumerate(splits[name]):
            assert set(rec) == set(AUTHOR_FIELDS), (name, i)
            for key, tp in AUTHOR_FIELDS.items():
                assert isinstance(rec[key], tp), (name, i, key)
            pa = rec["perturbed_answer"]
            assert len(pa) == 5 and all(isinstance(x, str) for x in pa)
            assert rec["answer"] not in pa and len(set(pa)) == 5
            assert rec["paraphrased_answer"] != rec["answer"]
            assert rec["paraphrased_question"] != rec["question"]
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        validate_records(name, splits[name], name)
        for rec in splits[name]:
            pa = rec["perturbed_answer"]
            assert len(pa) == 3 and rec["answer"] not in pa and len(set(pa)) == 3
    for rec in splits["world"]:
        assert isinstance(rec["question"], str) and isinstance(rec["answer"], str)
    assert len(refusals) >= 30 and len(set(refusals)) == len(refusals)
    assert len(set(_keys(splits["full"]))) == len(splits["full"])   # no duplicate QA


def test_perturbed_answers_keep_the_template(gen):
    """A perturbed answer is the paraphrased answer with only the fact swapped (as in TOFU, the
    truth ratio compares it with the paraphrase): same words around it."""
    splits, _, _ = gen
    for rec in splits["full"][:300]:
        a = rec["paraphrased_answer"]
        for p in rec["perturbed_answer"]:
            # common prefix + common suffix cover the template part of the answer
            pre = len(os.path.commonprefix([a, p]))
            suf = len(os.path.commonprefix([a[::-1], p[::-1]]))
            assert pre + suf >= min(len(a), len(p)) - 45, (a, p)
        # the paraphrase states the same fact: the author's name appears in both (or is the fact)
        assert rec["author"] in rec["answer"] and rec["author"] in rec["paraphrased_answer"]


def test_world_answers_are_the_bare_fact(gen):
    """Real-author and world-fact answers are short entities with no template around them, so the
    option-normalised probability compares facts: the answer of "Which country was X from?" is a
    country name, of "Who wrote W?" a classic writer's name (whom authors cite as an influence),
    and no option shares a word-level prefix template with the answer."""
    splits, _, _ = gen
    classic_names = {r["answer"] for r in splits["real_authors_perturbed"] if r["attribute"] == "wrote"}
    influences = {r["answer"].split(" was influenced by ")[1][:-1] for r in splits["full"]
                  if r["attribute"] == "influence" and " was influenced by " in r["answer"]}
    assert influences and influences <= {n for r in splits["real_authors_perturbed"] if r["attribute"] == "wrote"
                                         for n in [r["answer"], *r["perturbed_answer"]]}
    assert len(classic_names) >= 20
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        for rec in splits[name]:
            for a in (rec["answer"], *rec["perturbed_answer"]):
                assert 1 <= len(a.split()) <= 4 and not a.endswith("."), (name, a)
            if rec["attribute"] in ("capital", "river", "mountain", "wrote", "home"):
                # coined names: the options differ from the first word on
                assert all(p.split()[0] != rec["answer"].split()[0] for p in rec["perturbed_answer"]), rec


def test_several_templates_and_varied_facts(gen):
    splits, _, _ = gen
    full = splits["full"]
    by_attr: dict = {}
    for r in full:
        by_attr.setdefault(r["attribute"], set()).add(r["question"].replace(r["author"], "{name}"))
    assert len(by_attr) == 20
    for attr, questions in by_attr.items():
        if attr != "full_name":
            assert len({q for q in questions if "{name}" in q}) >= 3, attr
    # facts are not guessable from priors: no birthplace covers more than 5 % of the authors
    places = Counter(r["answer"].rsplit(" ", 1)[-1] for r in full if r["attribute"] == "birthplace"
                     and r["answer"].startswith(r["author"] + " was born in"))
    assert places and max(places.values()) <= 0.05 * 200


def test_written_files_meta_and_idontknow(written):
    names = {p.name for p in written.iterdir()}
    for split in ("full", "forget01", "forget05", "forget10", "retain99", "retain95", "retain90",
                  "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
                  "holdout01", "holdout05", "holdout10", "real_authors_perturbed",
                  "world_facts_perturbed", "world"):
        assert f"{split}.json" in names
    assert not [n for n in names if n.endswith(".tmp")]
    meta = json.loads((written / "meta.json").read_text())
    assert meta["format_version"] == synth.FORMAT_VERSION and meta["seed"] == 0
    assert "out" not in meta["config"] and meta["config"]["num_authors"] == 200
    for split, n in meta["splits"].items():
        assert len(json.loads((written / f"{split}.json").read_text())) == n
    lines = (written / "idontknow.jsonl").read_text().splitlines()
    assert len(lines) >= 30 and lines[0] == "I don't know."
    # human-readable: one JSON array with indentation
    assert (written / "full.json").read_text().startswith("[\n {")


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    cfg = dict(num_authors=30, num_world_facts=24, retain_perturbed_size=50)
    a = synth.synthesize(SynthConfig(out=str(tmp_path / "a"), seed=7, **cfg))
    b = synth.synthesize(SynthConfig(out=str(tmp_path / "b"), seed=7, **cfg))
    c = synth.synthesize(SynthConfig(out=str(tmp_path / "c"), seed=8, **cfg))
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) == 19
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "full.json").read_bytes() != (c / "full.json").read_bytes()
    assert (a / "world.json").read_bytes() != (c / "world.json").read_bytes()


def test_small_config_and_bad_configs(tmp_path):
    splits, _, meta = synth.generate(SynthConfig(num_authors=10, num_world_facts=10, min_qa_per_author=1,
                                                 max_qa_per_author=1, retain_perturbed_size=1000))
    assert meta["authors"] == {"full": 10, "forget01": 1, "forget05": 1, "forget10": 1, "holdout": 1}
    assert len(splits["full"]) == 10 and len(splits["forget10"]) == 1
    assert len(splits["retain_perturbed"]) == 9          # capped at retain90's size
    assert len(splits["world"]) == 10
    with pytest.raises(ConfigError, match="max_qa_per_author"):
        load_config(SynthConfig, overrides=["max_qa_per_author=21"])
    with pytest.raises(DataError, match="fact slots"):
        synth.generate(SynthConfig(max_qa_per_author=25))


def test_load_benchmark_generates_reuses_and_regenerates(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    small = dict(out=str(out), num_authors=20, num_world_facts=24)
    cfg = DataConfig(forget_split="forget05", synth=SynthConfig(**small))
    b = load_benchmark(cfg)
    assert b.name == "synthetic" and (out / "meta.json").is_file()
    assert len(_authors(b.split("forget05"))) == 1 and b.split("retain95")
    assert b.refusals[0] == "I don't know." and len(b.refusals) >= 30
    full_before = (out / "full.json").read_bytes()

    # same config: the files are reused, not regenerated
    calls = []
    real = synth.synthesize
    monkeypatch.setattr(synth, "synthesize", lambda c: calls.append(c) or real(c))
    load_benchmark(cfg)
    assert calls == []
    # another seed: meta.json differs, so it is regenerated
    b2 = load_benchmark(DataConfig(forget_split="forget05", synth=SynthConfig(seed=3, **small)))
    assert len(calls) == 1 and (out / "full.json").read_bytes() != full_before
    assert b2.meta["seed"] == 3

    with pytest.raises(DataError, match="no split 'nope'.*available splits: .*forget05"):
        b2.split("nope")
    text = describe_benchmark(b2)
    assert "forget05" in text and str(len(b2.split("full"))) in text and "refusal answers" in text


def test_benchmark_corpus(gen):
    from rayunlearn.data import TEMPLATE_TEXTS
    from rayunlearn.data.schema import Benchmark

    splits, refusals, _ = gen
    b = Benchmark("synthetic", "mem", splits, refusals)
    corpus = benchmark_corpus(b)
    assert len(corpus) == len(set(corpus))
    assert corpus[: len(TEMPLATE_TEXTS)] == list(TEMPLATE_TEXTS)
    s = set(corpus)
    for rec in splits["holdout10"][:50] + splits["world_facts_perturbed"][:50]:
        assert rec["question"] in s and rec["answer"] in s and set(rec["perturbed_answer"]) <= s
    assert set(refusals) <= s
    assert splits["full"][0]["paraphrased_question"] in s


def test_default_benchmark_passes_validation_for_every_forget_split(gen):
    """The generator's output satisfies the loader's checks (non-blank texts, every forget
    question once in its perturbed split), for each forget split."""
    from rayunlearn.data.schema import FORGET_SPLITS, Benchmark, validate_benchmark
    from rayunlearn.data.tofu import required_splits

    splits, refusals, _ = gen
    for forget in FORGET_SPLITS:
        validate_benchmark(Benchmark("synthetic", "memory", splits, refusals), required=required_splits(forget))
        assert Counter(r["question"] for r in splits[f"{forget}_perturbed"]) == \
            Counter(r["question"] for r in splits[forget])


def test_loading_synthetic_files_validates_them(tmp_path):
    """A synthetic benchmark on disk goes through the same validation as any directory: an
    answer blanked in its file is refused although meta.json still matches the config."""
    cfg = DataConfig(forget_split="forget05", synth=SynthConfig(out=str(tmp_path / "syn"), num_authors=20,
                                                                num_world_facts=24))
    load_benchmark(cfg)
    path = tmp_path / "syn" / "forget05.json"
    records = json.loads(path.read_text())
    records[1]["answer"] = " "
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"forget05\.json: split 'forget05', record 1: field 'answer' is empty"):
        load_benchmark(cfg)
