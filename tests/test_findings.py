"""The claim checks (rayunlearn/report/findings.py) on hand-made Parquet tables in which the
objective-only and the whole-method G-effects disagree, so a check that reads the wrong column, the
wrong runs or pools across methods gives the other verdict. Expected numbers are hand-derived."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from rayunlearn import runs
from rayunlearn.io import write_parquet
from rayunlearn.report.data import discover
from rayunlearn.report.findings import (FAILED, HELD, OBJECTIVE_ONLY, UNTESTABLE, Picker, claim1, claim4,
                                        claim5, claim6)


def test_objective_only_columns_are_in_the_results_contract():
    assert set(OBJECTIVE_ONLY.values()) <= set(runs.STEP_FIELDS)


def write_collection(root: Path, trials: list[dict], steps: dict | None = None, geffects: dict | None = None) -> Path:
    """trials.parquet (+ effects/<trial>/{steps,geffects}.parquet) of one hand-made collection."""
    rows = [{"status": runs.COMPLETED, "removal": 0.5, "retention": 0.5, "method": t["family"], **t} for t in trials]
    cols = sorted({k for r in rows for k in r})
    write_parquet(root / runs.TRIALS_TABLE_FILE, pa.table({c: [r.get(c) for r in rows] for c in cols}))
    for table, per_trial in (("steps", steps or {}), ("geffects", geffects or {})):
        for tid, df in per_trial.items():
            write_parquet(runs.effects_table(root, tid, table), pa.Table.from_pandas(df, preserve_index=False))
    return root


def steps_table(obj_u, obj_r, tot_u, tot_r, cosine=-0.5) -> pd.DataFrame:
    n = len(obj_u)
    return pd.DataFrame({"step": [4 * (k + 1) for k in range(n)], "lr": [1e-3] * n,
                         "removal": tot_u, "retention": tot_r,
                         "removal_forget_terms": obj_u, "retention_forget_terms": obj_r,
                         "cosine_removal": [cosine] * n})


def picker(root: Path) -> Picker:
    return Picker(discover(root))


# --------------------------------------------------------------------------------------- claim 1
def test_claim1_ga_removal_is_labelled_by_construction_and_retention_is_read_objective_only(tmp_path):
    # objective-only: e_r strongly negative; the total column says e_r > 0 (a wrong-column check: DID NOT HOLD)
    s = steps_table([-2.0, -4.0, -8.0], [-1.0, -3.0, -5.0], [-2.0, -4.0, -8.0], [1.0, 1.0, 1.0], cosine=-1.0)
    f = claim1(picker(write_collection(tmp_path, [{"trial_id": "t-ga", "family": "ga"}], {"t-ga": s})))
    assert f.verdict == HELD
    assert "by construction" in f.by_construction and "−‖∇R_u‖²" in f.by_construction
    assert f.numbers["min e_r"] == -5.0 and f.numbers["|min e_r| / max|e_u|"] == 0.625   # 5 / 8
    assert f.numbers["fraction of steps with e_r < 0"] == 1.0 and f.runs == ["ga (t-ga)"]


def test_claim1_flips_with_the_objective_only_retention(tmp_path):
    # now the objective-only e_r is ≥ 0 while the total is strongly negative
    s = steps_table([-2.0, -4.0, -8.0], [1.0, 1.0, 1.0], [-2.0, -4.0, -8.0], [-1.0, -3.0, -5.0], cosine=-1.0)
    f = claim1(picker(write_collection(tmp_path, [{"trial_id": "t-ga", "family": "ga"}], {"t-ga": s})))
    assert f.verdict == FAILED and f.numbers["fraction of steps with e_r < 0"] == 0.0


def test_claim1_with_a_distinct_probe_the_removal_sign_is_a_finding(tmp_path):
    # cosine ≠ −1: the probe is not GA's batch; objective-only e_u > 0 at step 8 (the total is ≤ 0 throughout)
    s = steps_table([-2.0, 1.0, -8.0], [-1.0, -3.0, -5.0], [-2.0, -4.0, -8.0], [-1.0, -3.0, -5.0], cosine=-0.7)
    f = claim1(picker(write_collection(tmp_path, [{"trial_id": "t-ga", "family": "ga"}], {"t-ga": s})))
    assert f.verdict == FAILED and f.by_construction == ""
    assert f.numbers["steps with e_u > 0"] == [8] and "is a finding" in f.note


# --------------------------------------------------------------------------------------- claim 4
CLAIM4_TRIALS = [{"trial_id": "t0", "family": "ga"}, {"trial_id": "t1", "family": "wga"},
                 {"trial_id": "t2", "family": "tnpo(beta=1)"}, {"trial_id": "t3", "family": "wtnpo"},
                 {"trial_id": "t4", "family": "wga+kl"}]


def claim4_tables(swap: bool) -> dict:
    """GA: objective-only mean |e_r| = 5 (its total column: 0.1). The weighted objectives: objective-only
    e_r ≈ 0 with e_u < 0; their total columns: e_r = −3 and e_u > 0. ``swap`` exchanges the two."""
    def pair(obj, tot):
        return (tot, obj) if swap else (obj, tot)

    ga_r = pair([-4.0, -5.0, -6.0], [-0.1, -0.1, -0.1])
    ga = steps_table([-5.0, -6.0, -7.0], ga_r[0], [-5.0, -6.0, -7.0], ga_r[1])
    out = {"t0": ga}
    for tid, er in (("t1", [0.1, -0.1, 0.2]), ("t2", [0.2, 0.2, -0.2]), ("t3", [0.0, 0.1, -0.2])):
        u = pair([-1.0, -1.0, -2.0], [1.0, 1.0, 1.0])
        r = pair(er, [-3.0, -3.0, -3.0])
        out[tid] = steps_table(u[0], r[0], u[1], r[1])
    # wga+kl: objective only fine, whole method (KL's positive removal effect) not — reported, not judged
    out["t4"] = steps_table([-1.0, -1.0, -1.0], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [-2.0, -2.0, -2.0])
    return out


def test_claim4_reads_the_objective_only_effects_of_unregularised_runs(tmp_path):
    f = claim4(picker(write_collection(tmp_path, CLAIM4_TRIALS, claim4_tables(swap=False))))
    assert f.verdict == HELD
    assert f.numbers["GA mean|e_r|"] == 5.0
    assert f.numbers["wga mean|e_r| / GA's"] == pytest.approx(0.4 / 3 / 5, rel=2e-3)   # rounded to 3 digits
    assert f.numbers["tnpo(beta=1) mean|e_r| / GA's"] == pytest.approx(0.6 / 3 / 5, rel=2e-3)   # rounded to 3 digits
    assert f.numbers["wga mean e_u"] == pytest.approx(-4 / 3, rel=1e-3)
    assert f.runs == ["ga (t0)", "wga (t1)", "tnpo(beta=1) (t2)", "wtnpo (t3)"]
    # the +KL run beside: objective only and whole method, not judged
    assert f.numbers["wga+kl [objective only] mean|e_r| / GA's"] == pytest.approx(0.02, rel=2e-3)
    assert f.numbers["wga+kl [whole method] mean|e_r| / GA's"] == pytest.approx(0.4, rel=2e-3)
    assert f.numbers["wga+kl [whole method] mean e_u"] == 0.5
    assert "not judged: wga+kl (t4)" in f.note


def test_claim4_flips_when_only_the_objective_only_columns_fail(tmp_path):
    f = claim4(picker(write_collection(tmp_path, CLAIM4_TRIALS, claim4_tables(swap=True))))
    assert f.verdict == FAILED
    assert f.numbers["GA mean|e_r|"] == 0.1 and f.numbers["wga mean|e_r| / GA's"] == 30.0   # 3 / 0.1


def test_claim4_is_not_judged_on_regularised_runs_alone(tmp_path):
    trials = [CLAIM4_TRIALS[0], CLAIM4_TRIALS[4]]
    tables = claim4_tables(swap=False)
    f = claim4(picker(write_collection(tmp_path, trials, {t: tables[t] for t in ("t0", "t4")})))
    assert f.verdict == UNTESTABLE and "no unregularised run of wga, tnpo, wtnpo" in f.note


# --------------------------------------------------------------------------------------- claim 5
def param_rows(trial: str, method: str, per_block: list[float], scale: float = 1.0, steps=(4, 8),
               tied: bool = False) -> pd.DataFrame:
    """Parameter rows: each block's value split over two tensors (block 2: +4 and −1, so summing per
    block before |·| matters), embedding 0.1, LM head 1 (none when tied); both risks; groups = thirds as the recorder
    writes them (block k in ⌊3k/n⌋)."""
    n = len(per_block)
    rows = []
    for step in steps:
        for risk in ("removal", "retention"):
            def add(name, layer, group, v):
                rows.append({"trial_id": trial, "method": method, "step": step, "risk": risk, "parameter": name,
                             "layer": layer, "group": group, "kind": "parameter", "term": "", "instance": -1,
                             "value": scale * v, "estimator": "exact"})
            add("model.embed_tokens.weight", -1, "embed", 0.1)
            if not tied:
                add("lm_head.weight", -1, "lm", 1.0)
            for k, v in enumerate(per_block):
                g = ("shallow", "middle", "deep")[3 * k // n]
                halves = (4.0, -1.0) if k == 2 else (v / 2, v / 2)
                add(f"model.layers.{k}.mlp.down_proj.weight", k, g, halves[0])
                add(f"model.layers.{k}.self_attn.q_proj.weight", k, g, halves[1])
    return pd.DataFrame(rows)


def test_claim5_reads_gas_own_per_block_effect_not_a_pool(tmp_path):
    trials = [{"trial_id": "t0", "family": "ga"}, {"trial_id": "t1", "family": "ga+kl"}]
    geff = {"t0": param_rows("t0", "ga", [6.0, 5.0, 3.0, 3.0, 1.0, 0.5]),
            # a much larger ga+kl run with the opposite profile: pooling would say deep > shallow
            "t1": param_rows("t1", "ga+kl", [0.5, 1.0, 3.0, 3.0, 5.0, 6.0], scale=100.0)}
    f = claim5(picker(write_collection(tmp_path, trials, geffects=geff)))
    assert f.verdict == HELD and f.runs == ["ga (t0)"]
    n = f.numbers
    assert n["blocks"] == 6 and n["thirds (shallow/middle/deep)"] == "0,1/2,3/4,5"
    # Σ over 2 steps of |block value|: shallow (12 + 10)/2, middle (6 + 6)/2 (block 2: |4 − 1| = 3), deep (2 + 1)/2
    assert n["removal: mean Σ|e| per shallow block"] == 11.0
    assert n["removal: mean Σ|e| per middle block"] == 6.0
    assert n["retention: mean Σ|e| per deep block"] == 1.5
    # embedding: 0.1 of |0.1| + 11 + 6 + 1.5 + 1 per step
    assert n["removal: embedding share"] == pytest.approx(0.1 / 19.6, rel=1e-3)
    assert f.note == ""   # 6 blocks: equal thirds


def test_claim5_flips_with_gas_profile(tmp_path):
    trials = [{"trial_id": "t0", "family": "ga"}, {"trial_id": "t1", "family": "ga+kl"}]
    geff = {"t0": param_rows("t0", "ga", [0.5, 1.0, 3.0, 3.0, 5.0, 6.0]),
            "t1": param_rows("t1", "ga+kl", [6.0, 5.0, 3.0, 3.0, 1.0, 0.5], scale=100.0)}
    f = claim5(picker(write_collection(tmp_path, trials, geffects=geff)))
    assert f.verdict == FAILED
    assert f.numbers["removal: mean Σ|e| per deep block"] == 11.0


def test_claim5_states_unequal_thirds(tmp_path):
    geff = {"t0": param_rows("t0", "ga", [6.0, 5.0, 3.0, 1.0])}
    f = claim5(picker(write_collection(tmp_path, [{"trial_id": "t0", "family": "ga"}], geffects=geff)))
    assert f.numbers["thirds (shallow/middle/deep)"] == "0,1/2/3"
    assert "hold 2/1/1 blocks" in f.note and "weak" in f.note
    # block 3 alone is the deep third: mean 2, shallow (12 + 10)/2
    assert f.numbers["removal: mean Σ|e| per deep block"] == 2.0 and f.verdict == HELD


# --------------------------------------------------------------------------------------- claim 6
def term_rows(trial: str, method: str, reg: str, reg_r: float, ga_r: float, total_r: float) -> pd.DataFrame:
    rows = []
    for step in (4, 8):
        for kind, term, v in (("term", reg, reg_r), ("term", "ga", ga_r), ("total", "", total_r)):
            rows.append({"trial_id": trial, "method": method, "step": step, "risk": "retention", "parameter": "",
                         "layer": -1, "group": "", "kind": kind, "term": term, "instance": -1, "value": v,
                         "estimator": "exact"})
    return pd.DataFrame(rows)


def claim6_collection(root: Path, kl_own: float) -> Path:
    # whole-method retention totals and the retention scalar favour ga+kl throughout; only the
    # regularisers' own term effects decide
    trials = [{"trial_id": "t-gd", "family": "ga+gd", "retention": 0.2},
              {"trial_id": "t-kl", "family": "ga+kl", "retention": 0.9},
              {"trial_id": "t-rr", "family": "ga+rr", "retention": 0.1}]
    geff = {"t-gd": term_rows("t-gd", "ga+gd", "gd", 2.0, -6.0, -4.0),
            "t-kl": term_rows("t-kl", "ga+kl", "kl", kl_own, -1.0, 5.0),
            "t-rr": term_rows("t-rr", "ga+rr", "rr", 0.5, -6.0, -5.5)}
    return write_collection(root, trials, geffects=geff)


def test_claim6_reads_the_regularisers_own_retention_effects(tmp_path):
    f = claim6(picker(claim6_collection(tmp_path, kl_own=1.0)))
    assert f.verdict == FAILED   # GD's own effect 2.0 > KL's 1.0, although KL's run has the best total
    assert f.numbers["gd: mean own e_r"] == 2.0 and f.numbers["kl: mean own e_r"] == 1.0
    assert f.numbers["rr: mean own e_r"] == 0.5 and f.numbers["kl: mean e_r of its run's ga term"] == -1.0
    assert "fronts over the regulariser weight: not testable" in f.note


def test_claim6_flips_with_the_kl_terms_own_effect(tmp_path):
    f = claim6(picker(claim6_collection(tmp_path, kl_own=3.0)))
    assert f.verdict == HELD and f.runs == ["ga+gd (t-gd)", "ga+kl (t-kl)", "ga+rr (t-rr)"]


@pytest.mark.parametrize("gd_better", [False, True])
def test_claim6_fronts_over_the_regulariser_weight(tmp_path, gd_better):
    kl = [(0.5, 0.2, 0.9), (1.0, 0.5, 0.7), (2.0, 0.8, 0.3)]   # (weight, removal, retention)
    gd = [(0.5, 0.3, 0.5), (1.0, 0.6, 0.4)]
    if gd_better:
        gd = [(0.5, 0.6, 0.8), (1.0, 0.9, 0.6)]
    trials = [{"trial_id": f"kl{i}", "family": "ga+kl", "hp.kl.weight": w, "removal": x, "retention": y}
              for i, (w, x, y) in enumerate(kl[:2])]
    # a grid family that fixes the weight in its string joins the same front
    trials.append({"trial_id": "kl2", "family": "ga+kl(weight=2.0)", "removal": kl[2][1], "retention": kl[2][2]})
    trials += [{"trial_id": f"gd{i}", "family": "ga+gd", "hp.gd.weight": w, "removal": x, "retention": y}
               for i, (w, x, y) in enumerate(gd)]
    f = claim6(picker(write_collection(tmp_path, trials)))
    # reference point (worst removal, worst retention) = (0.2, 0.3); KL's front: only (0.5, 0.7) adds area
    assert f.numbers["ga+kl front hypervolume"] == pytest.approx(0.3 * 0.4, rel=1e-9)
    if gd_better:   # (0.9, 0.6): 0.7·0.3; (0.6, 0.8): 0.4·0.2
        assert f.numbers["ga+gd front hypervolume"] == pytest.approx(0.21 + 0.08, rel=1e-9)
        assert f.verdict == FAILED
    else:           # (0.6, 0.4): 0.4·0.1; (0.3, 0.5): 0.1·0.1
        assert f.numbers["ga+gd front hypervolume"] == pytest.approx(0.04 + 0.01, rel=1e-9)
        assert f.verdict == HELD
    assert f.numbers["ga+kl weights run"] == 3 and "own G-effects: needs term rows" in f.note


def test_claim4_counts_only_runs_of_the_objective_alone(tmp_path):
    """``wga(alpha=2)+kl(weight=2)`` is a regularised run, though it starts and ends with brackets."""
    tables = claim4_tables(swap=False)
    trials = [CLAIM4_TRIALS[0], {"trial_id": "t4", "family": "wga(alpha=2)+kl(weight=2)"}]
    f = claim4(picker(write_collection(tmp_path, trials, {t: tables[t] for t in ("t0", "t4")})))
    assert f.verdict == UNTESTABLE and f.runs == ["ga (t0)"]


def test_claim5_says_when_the_embedding_is_tied_to_the_lm_head(tmp_path):
    geff = {"t0": param_rows("t0", "ga", [6.0, 5.0, 3.0, 3.0, 1.0, 0.5], tied=True)}
    f = claim5(picker(write_collection(tmp_path, [{"trial_id": "t0", "family": "ga"}], geffects=geff)))
    assert f.note.startswith("tied input/output embeddings") and "weak" not in f.note
    assert f.numbers["removal: embedding share"] == pytest.approx(0.1 / 18.6, rel=1e-3)
