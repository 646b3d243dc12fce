"""The fixed G-effect probes (rayunlearn/effects/probes.py): stratified over every forget author,
retention over retain authors and world facts, deterministic in the data."""

from __future__ import annotations

import pytest

from rayunlearn import UserError
from rayunlearn.data.schema import Benchmark
from rayunlearn.effects.probes import author_groups, probe_rows, stratified


def _qa(author, k):
    return {"question": f"q {author} {k}", "answer": f"a {author} {k}", "author": author}


def _bench(forget_sizes=(5, 3, 4, 6, 2), retain_authors=8, world=(6, 9), tofu=False):
    forget = [_qa(f"F{a}", k) for a, n in enumerate(forget_sizes) for k in range(n)]
    retain = [_qa(f"R{a}", k) for a in range(retain_authors) for k in range(4)]
    if tofu:                                        # no author key: consecutive blocks of 20
        forget = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    splits = {"forget05": forget, "retain95": retain,
              "real_authors_perturbed": [{"question": f"ra{i}", "answer": "x", "perturbed_answer": ["y"]}
                                         for i in range(world[0])],
              "world_facts_perturbed": [{"question": f"wf{i}", "answer": "x", "perturbed_answer": ["y"]}
                                        for i in range(world[1])]}
    return Benchmark("b", "memory", splits, ["I don't know."])


def test_removal_probe_covers_every_forget_author_evenly():
    b = _bench()
    rows = probe_rows(b, "forget05", 12, 10)
    forget = b.split("forget05")
    per_author = {}
    for i in rows.forget:
        per_author[forget[i]["author"]] = per_author.get(forget[i]["author"], 0) + 1
    assert per_author == {"F0": 2, "F1": 3, "F2": 2, "F3": 3, "F4": 2}    # 12 over 5: 2 or 3 each
    assert len(set(rows.forget)) == 12
    assert probe_rows(b, "forget05", 12, 10) == rows                     # a function of the data alone
    with pytest.raises(UserError, match="effects.probe_size=4 .* 5 authors"):
        probe_rows(b, "forget05", 4, 10)


def test_tofu_authors_are_blocks_of_twenty():
    b = _bench(tofu=True)
    assert author_groups(b.split("forget05")) == [list(range(20)), list(range(20, 40))]
    rows = probe_rows(b, "forget05", 6, 4)
    assert rows.forget == (3, 10, 16, 23, 30, 36)


def test_retention_probe_mixes_retain_authors_and_world_facts():
    b = _bench()
    rows = probe_rows(b, "forget05", 5, 10)
    retain = b.split("retain95")
    assert len(rows.retain) == 5 and len({retain[i]["author"] for i in rows.retain}) == 5
    assert sorted(rows.world) == [("real_authors_perturbed", 1), ("real_authors_perturbed", 4),
                                  ("world_facts_perturbed", 1), ("world_facts_perturbed", 4),
                                  ("world_facts_perturbed", 7)]
    # without world sets every non-targeted row comes from the retain split
    b.splits.pop("real_authors_perturbed"), b.splits.pop("world_facts_perturbed")
    rows = probe_rows(b, "forget05", 5, 10)
    assert len(rows.retain) == 10 and rows.world == ()


def test_stratified_with_fewer_rows_than_groups_takes_evenly_spaced_groups():
    groups = [[10 * g + k for k in range(3)] for g in range(6)]
    assert stratified(groups, 3) == [11, 31, 51]            # groups 1, 3, 5: centred in their thirds
    # 7 over 6 groups: one each (the middle row), the extra one to the middle group (its ends)
    assert stratified(groups, 7) == [1, 11, 21, 30, 32, 41, 51]
