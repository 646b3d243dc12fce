"""`rayunlearn report`: built from fake-but-schema-true results (tests/fake_results.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from fake_results import STUDY_METHODS, make_fake_results  # noqa: E402

from rayunlearn import UserError  # noqa: E402
from rayunlearn.io import write_json, write_parquet  # noqa: E402
from rayunlearn.report import ReportDataError, build_report, check_claims  # noqa: E402
from rayunlearn.report.analysis import cumulative_effects, results_table  # noqa: E402
from rayunlearn.report.build import SECTIONS  # noqa: E402
from rayunlearn.report.data import discover  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_fake_results(tmp_path_factory.mktemp("demo"))
    html_path = build_report(root)
    out = html_path.parent
    return root, out, json.loads((out / "summary.json").read_text())


def test_every_section_and_figure(built):
    root, out, summary = built
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for s in SECTIONS:
        anchor = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
        assert f"<h2 id='{anchor}'>{s}</h2>" in html
        assert f"\n## {s}\n" in md
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    # every figure kind for the study (all records present) and the sweep (importance too)
    expected = {f"study_{k}.png" for k in ("pareto", "geffect_curves", "groups_removal", "groups_retention",
                                           "group_shares", "instances", "ga_by_weight", "trajectories",
                                           "fidelity")}
    expected |= {"sweep_pareto.png", "sweep_importance.png", "all_pareto.png"}
    assert expected <= set(pngs)
    assert sorted(summary["figures"]) == pngs
    for name in pngs:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"](figures/{name})" in md
    # self-contained: one embedded image per PNG, no external references (plotly.js is inline)
    assert html.count("src='data:image/png;base64,") == len(pngs)
    outside_scripts = re.sub(r"<script\b.*?</script>", "", html, flags=re.S)
    assert "<script src" not in html and "src='http" not in outside_scripts and "href=" not in outside_scripts
    # the failed sweep trial is reported, not plotted
    assert "trial-012" in html and "out of memory" in html


def _brute_front(df: pd.DataFrame) -> set[str]:
    """Independent oracle: i is on the front iff no j is >= on both and > on one."""
    pts = df[["removal", "retention"]].to_numpy(float)
    ids = df["trial_id"].tolist()
    front = set()
    for i in range(len(pts)):
        dominated = any((pts[j] >= pts[i]).all() and (pts[j] > pts[i]).any() for j in range(len(pts)) if j != i)
        if not dominated:
            front.add(ids[i])
    return front


def test_pareto_labels_equal_independent_front(built):
    root, out, summary = built
    md = (out / "report.md").read_text()
    by_name = {c["name"]: c for c in summary["collections"]}
    assert set(by_name) == {"study", "sweep"}
    combined = []
    for name in ("study", "sweep"):
        t = pd.read_parquet(root / name / "trials.parquet")
        t = t[(t["status"] == "completed") & t["removal"].notna()]
        expect = _brute_front(t)
        assert 2 <= len(expect) < len(t)
        assert set(by_name[name]["pareto"]) == expect
        # the labelled front table lists exactly those trials
        section = md.split(f"### {name}\n", 1)[1].split("###", 1)[0]
        listed = set(re.findall(r"^\| ((?:\d{3}-|trial-)\S+) \|", section, flags=re.M))
        assert listed == expect
        combined.append(t.assign(trial_id=name + "/" + t["trial_id"]))
    assert set(summary["combined_pareto"]) == _brute_front(pd.concat(combined))
    # study front labels carry the method string; the known shape of the fake data
    assert set(by_name["study"]["pareto"]) >= {"000-ga", "002-ga_kl", "007-wtnpo_kl"}


def test_findings_verdicts_on_constructed_data(built):
    _, out, summary = built
    verdicts = {f["claim"]: f["verdict"] for f in summary["findings"]}
    assert verdicts == {i: "HELD" for i in range(1, 7)}
    c1 = summary["findings"][0]["numbers"]
    assert c1["trial"] == "000-ga" and c1["steps with e_u > 0"] == [] and c1["fraction of steps with e_r < 0"] == 1.0
    c2 = summary["findings"][1]["numbers"]
    assert c2["key"] == "stat.ga.inv_p_mean" and c2["first"] < c2["last"]
    c3 = summary["findings"][2]["numbers"]
    assert c3["first weight"] == 1.0 and c3["last weight"] < 1.0
    # GA's removal part is labelled, not counted
    assert "by construction" in summary["findings"][0]["by_construction"]
    c5 = summary["findings"][4]
    # GA's run only; fake shares are exact (GROUP_SHARE): shallow 0.46 over blocks 0-1, deep 0.14 over 4-5
    assert c5["runs"] == ["ga (000-ga)"]
    assert c5["numbers"]["blocks"] == 6 and c5["numbers"]["thirds (shallow/middle/deep)"] == "0,1/2,3/4,5"
    for risk in ("removal", "retention"):
        n = c5["numbers"]
        assert n[f"{risk}: mean Σ|e| per shallow block"] / n[f"{risk}: mean Σ|e| per deep block"] == \
            pytest.approx(0.23 / 0.07, rel=1e-3)
        assert n[f"{risk}: embedding share"] == pytest.approx(0.01, abs=1e-3)
    for f in summary["findings"]:
        assert f["quantity"] and f["threshold"] and f["runs"]
    html = (out / "report.html").read_text()
    assert html.count("<b>HELD</b>") == 6


def test_claim1_does_not_hold_when_ga_removal_turns_positive(tmp_path):
    root = make_fake_results(tmp_path, claim1_holds=False, ga_cosine=-0.9, sweep=False)
    findings = check_claims(discover(root))
    f1 = findings[0]
    assert f1.verdict == "DID NOT HOLD"
    assert f1.numbers["steps with e_u > 0"] == [4, 8]  # recorded steps 2,4,..,12; k = 1 and 3 flipped
    assert f1.numbers["max e_u"] > 0
    assert [f.verdict for f in findings[1:]] == ["HELD"] * 5


def test_claims_not_testable_without_effects(tmp_path):
    root = make_fake_results(tmp_path, sweep=False)
    shutil.rmtree(root / "study" / "effects")
    (root / "study" / "trials" / "000-ga" / "log.jsonl").unlink()
    v = [f.verdict for f in check_claims(discover(root))]
    # 1, 2, 4, 5, 6 need steps/geffects/log (6 reads the regulariser term rows, and no study here has
    # fronts over a regulariser weight); 3 falls back to NPO's logged weights (partly tested)
    assert v == ["NOT TESTABLE", "NOT TESTABLE", "HELD", "NOT TESTABLE", "NOT TESTABLE", "NOT TESTABLE"]
    assert "partly tested" in check_claims(discover(root))[2].note


def test_minimal_results_dir_builds_with_notes(tmp_path):
    """Only trials.parquet: every optional section is skipped with a note, nothing crashes."""
    write_parquet(tmp_path / "trials.parquet", pa.table({
        "trial_id": ["a", "b", "c"], "family": ["ga", "npo", "npo"], "method": ["ga", "npo", "npo"],
        "status": ["completed"] * 3, "removal": [0.9, 0.5, 0.4], "retention": [0.1, 0.5, 0.4]}))
    html = build_report(tmp_path, tmp_path / "out").read_text()
    assert "not recorded" in html and "NOT TESTABLE" in html
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["collections"][0]["pareto"] == ["a", "b"]
    assert len(summary["figures"]) == 1 and summary["figures"][0].endswith("_pareto.png")


def test_cumulative_effects_hand_computed():
    steps = pd.DataFrame({"step": [5, 10, 15], "lr": [1e-3, 2e-3, 1e-3],
                          "removal": [-2.0, -4.0, -1.0], "retention": [0.5, -1.0, 3.0]})
    c = cumulative_effects(steps)
    assert c["cum_lr_removal"] == pytest.approx(-2e-3 - 8e-3 - 1e-3, rel=1e-12)
    assert c["cum_lr_retention"] == pytest.approx(0.5e-3 - 2e-3 + 3e-3, rel=1e-12)
    assert c["sum_removal"] == -7.0 and c["sum_retention"] == 2.5
    assert np.isnan(cumulative_effects(None)["sum_removal"])


def test_results_table_values(built):
    root, _, _ = built
    study = [c for c in discover(root) if c.name == "study"][0]
    tbl = results_table(study).set_index("trial_id")
    assert list(tbl.index[:2]) == ["(target model)", "(retain model)"]
    assert set(STUDY_METHODS) == set(tbl["family"][2:])
    m = json.loads((root / "study" / "trials" / "000-ga" / "metrics.json").read_text())
    row = tbl.loc["000-ga"]
    assert row["model_utility"] == m["model_utility"] == 0.20
    assert row["world_facts.truth_ratio"] == m["world_facts"]["truth_ratio"]
    assert list(row["ks_n"]) == [40, 40]
    s = pd.read_parquet(root / "study" / "effects" / "000-ga" / "steps.parquet")
    assert row["cum_lr_removal"] == pytest.approx(float((s["lr"] * s["removal"]).sum()), rel=1e-12)
    # the exact estimator only: the fake also writes 'adam' rows scaled by 0.7
    ge = study.geffects("000-ga")
    assert set(ge["estimator"]) == {"exact"}


def test_importance_per_sweep_family(built):
    _, out, summary = built
    imp = summary["importance"]
    assert "study" not in imp or imp["study"] == {}
    assert set(imp["sweep"]) == {"wga+kl", "npo+kl"}
    for fam, params in (("wga+kl", {"alpha", "kl_weight"}), ("npo+kl", {"beta", "kl_weight"})):
        for obj in ("removal", "retention"):
            assert set(imp["sweep"][fam][obj]) == params
            assert sum(imp["sweep"][fam][obj].values()) == pytest.approx(1.0, abs=1e-6)
        # by construction (fake_results): removal depends only on alpha/beta, retention mostly on kl_weight
        forget_hp = (params - {"kl_weight"}).pop()
        assert imp["sweep"][fam]["removal"][forget_hp] > imp["sweep"][fam]["removal"]["kl_weight"]
        assert imp["sweep"][fam]["retention"]["kl_weight"] > imp["sweep"][fam]["retention"][forget_hp]


def test_malformed_inputs_raise_user_errors(tmp_path):
    root = make_fake_results(tmp_path / "r", sweep=False)
    study = root / "study"
    t = pd.read_parquet(study / "trials.parquet")
    write_parquet(study / "trials.parquet", pa.Table.from_pandas(t.drop(columns=["removal"]), preserve_index=False))
    with pytest.raises(ReportDataError, match=r"trials\.parquet: missing column\(s\) \['removal'\]"):
        build_report(root)
    assert issubclass(ReportDataError, UserError)
    from rayunlearn.cli import main

    assert main(["report", str(root)]) == 2
    # restore, then break a metrics.json and a steps.parquet
    write_parquet(study / "trials.parquet", pa.Table.from_pandas(t, preserve_index=False))
    (study / "trials" / "003-npo" / "metrics.json").write_text("{not json")
    with pytest.raises(ReportDataError, match="003-npo/metrics.json: not valid JSON"):
        results_table(discover(root)[0])
    write_json(study / "trials" / "003-npo" / "metrics.json", {"removal": 0.5})
    with pytest.raises(ReportDataError, match="missing 'retention'"):
        results_table(discover(root)[0])
    write_parquet(study / "effects" / "000-ga" / "steps.parquet", pa.table({"step": [1], "removal": [0.0]}))
    with pytest.raises(ReportDataError, match=r"steps\.parquet: missing column\(s\) \['retention'\]"):
        check_claims(discover(root))
    with pytest.raises(ReportDataError, match="no trials.parquet"):
        build_report(tmp_path / "r" / "study" / "trials")
    with pytest.raises(ReportDataError, match="no such results directory"):
        build_report(tmp_path / "nope")


def test_fidelity_stats_read_the_realised_prediction():
    """Median measured/predicted ratio and sign agreement, by hand, on a steps table where the
    realised-update and the plain-gradient predictions disagree: reading the wrong column fails."""
    import pandas as pd

    from rayunlearn.report.analysis import fidelity_stats

    steps = pd.DataFrame({
        "predicted_removal_change_realised": [0.10, 0.20, -0.40, 0.0],     # last: zero prediction, skipped
        "measured_removal_change": [0.11, 0.18, 0.40, 0.3],
        "predicted_retention_change_realised": [-0.05, -0.10, float("nan"), -0.2],
        "measured_retention_change": [-0.05, -0.12, 0.01, -0.1],
        "predicted_removal_change": [0.01, 0.02, 0.04, 0.01],              # SGD: 10x too small
        "predicted_retention_change": [0.5, 0.5, 0.5, 0.5],
    })
    real = fidelity_stats(steps, "realised")
    assert real["removal"]["n"] == 3
    assert real["removal"]["median_ratio"] == pytest.approx(0.9)          # ratios 1.1, 0.9, -1.0
    assert real["removal"]["sign_agreement"] == pytest.approx(2 / 3)
    assert real["retention"]["n"] == 3                                    # the NaN step is skipped
    assert real["retention"]["median_ratio"] == pytest.approx(1.0)        # ratios 1.0, 1.2, 0.5
    assert real["retention"]["sign_agreement"] == pytest.approx(1.0)
    sgd = fidelity_stats(steps, "sgd")
    assert sgd["removal"]["median_ratio"] == pytest.approx(10.5)          # ratios 11, 9, 10, 30
    assert sgd["retention"]["sign_agreement"] == pytest.approx(0.25)      # only the 0.01 rise agrees
    assert fidelity_stats(steps.drop(columns=["measured_removal_change"])) is None


def test_ga_effect_by_weight_hand_made_table(tmp_path):
    """Fig. 5(b)'s bins, by hand, from a geffects.parquet written here: the unweighted GA PG-effect
    rows joined to the weight rows of the same (step, instance), two equal-width weight bins over
    [0.2, 1.0]. The weighted per-instance rows carry other values, and a
    weight without a GA row (step 6) joins nothing: reading the wrong kind fails."""
    from rayunlearn.report import figures as F
    from rayunlearn.report.analysis import ga_effect_by_weight
    from rayunlearn.report.data import read_parquet
    from rayunlearn.runs import GEFFECT_SCHEMA

    rows = []

    def add(step, risk, kind, term, instance, value):
        rows.append({"trial_id": "t", "method": "npo", "step": step, "risk": risk, "parameter": "", "layer": -1,
                     "group": "", "kind": kind, "term": term, "instance": instance, "value": value,
                     "estimator": "exact"})

    weights = {(2, 1): 0.2, (2, 2): 0.5, (2, 3): 1.0, (4, 1): 0.65, (4, 2): 0.9, (4, 3): 0.3}
    ga_removal = {(2, 1): -4.0, (2, 2): -2.0, (2, 3): -1.0, (4, 1): -3.0, (4, 2): -1.5, (4, 3): -5.0}
    for (step, i), w in weights.items():
        add(step, "", "instance_weight", "npo", i, w)
        add(step, "removal", "instance_ga_unweighted", "", i, ga_removal[step, i])
        add(step, "retention", "instance_ga_unweighted", "", i, 0.5 * i)
        add(step, "removal", "instance", "npo", i, 100.0 * w)        # the weighted share: not Fig. 5(b)
    add(6, "", "instance_weight", "npo", 1, 0.05)                       # no GA row at step 6: outside the range
    path = tmp_path / "geffects.parquet"
    write_parquet(path, pa.Table.from_pylist(rows, schema=GEFFECT_SCHEMA))
    binned = ga_effect_by_weight(read_parquet(path, ("kind",)), bins=2)

    rem = binned[binned["risk"] == "removal"].set_index("lo")
    assert list(rem.index) == pytest.approx([0.2, 0.6]) and list(rem["hi"]) == pytest.approx([0.6, 1.0])
    assert list(rem["mid"]) == pytest.approx([0.4, 0.8]) and list(rem["n"]) == [3, 3]
    low = np.array([-4.0, -2.0, -5.0])                                  # weights 0.2, 0.5, 0.3
    high = np.array([-1.0, -3.0, -1.5])                                 # weights 1.0, 0.65, 0.9
    assert list(rem["mean"]) == pytest.approx([low.mean(), high.mean()], rel=1e-12)
    assert list(rem["sem"]) == pytest.approx([low.std(ddof=1) / np.sqrt(3), high.std(ddof=1) / np.sqrt(3)],
                                             rel=1e-12)
    ret = binned[binned["risk"] == "retention"]
    assert list(ret["mean"]) == pytest.approx([(0.5 + 1.0 + 1.5) / 3, (1.5 + 0.5 + 1.0) / 3])
    assert set(binned["term"]) == {"npo"}
    # a table without the GA rows has no Fig. 5(b); the figure is drawn from the bins
    no_ga = read_parquet(path, ("kind",))
    assert ga_effect_by_weight(no_ga[no_ga["kind"] != "instance_ga_unweighted"]) is None
    png = F.ga_effect_by_weight_figure({"npo": (binned, "npo")}, {}, "Fig. 5(b)", tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trajectory_utility_is_one_definition_per_series():
    """The utility line holds the six-term utility at every evaluation, the final nine-term one is
    its own series; a trajectory written before the six-term column keeps only its in-loop rows
    on the line (plotting model_utility across all rows would jump at the last step)."""
    from rayunlearn.report.analysis import trajectory_utility

    tr = pd.DataFrame({"step": [10, 20, 40], "model_utility": [0.50, 0.40, 0.20],
                       "model_utility_terms": [6, 6, 9], "model_utility_no_rouge": [0.50, 0.40, 0.35]})
    same, full = trajectory_utility(tr)
    assert same["step"].tolist() == [10, 20, 40] and same["value"].tolist() == [0.50, 0.40, 0.35]
    assert full["step"].tolist() == [40] and full["value"].tolist() == [0.20]
    same, full = trajectory_utility(tr.drop(columns=["model_utility_no_rouge"]))
    assert same["step"].tolist() == [10, 20] and same["value"].tolist() == [0.50, 0.40]
    assert full["value"].tolist() == [0.20]


def test_a_study_that_evaluated_only_at_the_end_draws_no_trajectory(tmp_path):
    """The demo's study runs no in-loop evaluations (unlearn.eval.every = 0): its trajectory.jsonl
    holds the final evaluation alone, which is no curve, so the study gets a note instead of a
    figure of single points, while the sweep's trajectories are still drawn."""
    from rayunlearn.report.analysis import in_loop_trajectory

    tr = pd.DataFrame({"step": [43], "forget_quality": [0.1], "model_utility": [0.4]})
    assert in_loop_trajectory(tr) is None and in_loop_trajectory(None) is None
    two = pd.concat([tr.assign(step=15), tr])
    assert in_loop_trajectory(two) is two
    root = make_fake_results(tmp_path / "demo")
    for path in (root / "study" / "trials").glob("*/trajectory.jsonl"):
        path.write_text(path.read_text().splitlines()[-1] + "\n")
    out = build_report(root).parent
    pngs = {p.name for p in (out / "figures").glob("*.png")}
    assert "study_trajectories.png" not in pngs and "sweep_trajectories.png" in pngs
    md = (out / "report.md").read_text()
    section = md.split("\n## Trajectories\n")[1].split("\n## ")[0]
    assert "trajectories of study: not recorded (no in-loop evaluations" in section
