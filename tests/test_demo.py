"""The demo's configuration: two spaces sharing one preparation, override routing, grid studies."""

import pytest

from rayunlearn import UserError
from rayunlearn.config import ConfigError
from rayunlearn.demo import SMOLLM2, load_demo_spaces
from rayunlearn.sweep.space import load_space

PAPER_METHODS = ["ga", "ga+gd", "ga+kl", "npo", "npo+kl", "wga+kl", "tnpo+kl", "wtnpo+kl", "po+kl", "rmu+kl"]
# the runs the claim checks read: the weighted objectives alone (defaults and the paper's plotted
# settings) and GA with RR
CLAIM_RUNS = ["wga", "wga(alpha=0.5)", "tnpo", "tnpo(beta=1)", "wtnpo", "ga+rr"]


def test_study_runs_the_papers_methods_and_sweep_the_proposed_families(tmp_path):
    spaces = load_demo_spaces(tmp_path, [])
    study, sweep = spaces["study"], spaces["sweep"]
    assert list(study.families) == PAPER_METHODS + CLAIM_RUNS and study.sampler == "grid"
    assert study.total_trials == len(PAPER_METHODS) + len(CLAIM_RUNS)
    # the plotted settings are method strings with explicit hyper-parameters
    methods = {fam: parsed.method_string({}) for fam, parsed in study.parsed_families.items()}
    assert methods["wga(alpha=0.5)"] == "wga(alpha=0.5)" and methods["tnpo(beta=1)"] == "tnpo(beta=1.0, eps=0.0)"
    assert methods["wga"] == "wga(alpha=1.0)" and methods["ga+rr"] == "ga+rr(layer=middle)"
    assert set(sweep.families) == {"wga+kl", "tnpo+kl", "wtnpo+kl"} and sweep.sampler == "tpe"
    assert sweep.total_trials == sweep.num_samples
    # every configuration with 2 seeds, 2 retain replicates for the noise band, a retention floor;
    # the sweep stays at 8 unlearning runs (what 8 one-seed trials cost)
    assert sweep.seeds == 2 and sweep.prepare.retain_replicates == 2 and sweep.retention_floor == 0.9
    assert sweep.num_samples * sweep.seeds == 8
    # one preparation (models + reference evaluation) serves both stages
    assert study.prepare_key() == sweep.prepare_key()
    assert study.sweep_dir() == tmp_path / "study" and sweep.sweep_dir() == tmp_path / "sweep"


def test_the_default_regime_has_curves_and_equal_thirds(tmp_path):
    """The demo's regime: a multiple of 3 blocks (the report's layer thirds equal, at least
    two blocks each), at least 40 unlearning steps on the demo's forget split, G-effects every 1-2
    steps in the study, and the study and the sweep unlearning with the same recipe."""
    from rayunlearn.data.synth import generate
    from rayunlearn.effects.groups import paper_group

    spaces = load_demo_spaces(tmp_path, [])
    study, sweep = spaces["study"], spaces["sweep"]
    n = study.model.num_layers
    thirds = [paper_group(f"model.layers.{k}.mlp.up_proj.weight", n) for k in range(n)]
    assert n % 3 == 0 and [thirds.count(g) for g in ("shallow", "middle", "deep")] == [n // 3] * 3 and n >= 6
    splits, _, _ = generate(study.data.synth)
    train = study.unlearn.train
    steps = int(train.epochs * len(splits[study.data.forget_split])) // train.batch_size   # Schedule's count
    assert steps >= 40
    assert 1 <= study.unlearn.effects.every <= 2
    assert sweep.unlearn.train == train and sweep.model == study.model


def test_the_early_stage_is_the_study_ga_cut_after_its_warm_up(tmp_path):
    """The early stage's GA takes the study GA's first steps exactly (same examples, same learning
    rates: max_steps cuts the schedule without reshaping it) with the study's evaluation and
    attacks, on the same preparation, and stops while the study's GA is still warming up."""
    from rayunlearn.data.synth import generate
    from rayunlearn.demo import SMOLLM2_SKIPS
    from rayunlearn.train.schedule import Schedule

    spaces = load_demo_spaces(tmp_path, [])
    study, early = spaces["study"], spaces["early"]
    assert list(early.families) == ["ga"] and early.total_trials == 1
    assert early.prepare_key() == study.prepare_key() and early.unlearn.eval == study.unlearn.eval
    assert early.unlearn.eval.attacks and early.unlearn.effects.every == 0
    n = len(generate(study.data.synth)[0][study.data.forget_split])
    full, cut = Schedule(n, study.unlearn.train), Schedule(n, early.unlearn.train)
    assert cut.total_steps == 9 and full.total_steps >= 40 and cut.total_steps <= full.warmup_steps
    for step in range(cut.total_steps):
        assert cut.indices(step) == full.indices(step)
        assert cut.lr_factor(step) == full.lr_factor(step) == (step + 1) / full.warmup_steps
    # the SmolLM2 demo (one forget author: nothing to evaluate beside a relearned one) skips it
    assert "early" in SMOLLM2_SKIPS


def test_the_study_evaluates_only_at_the_end_and_still_shares_the_preparation(tmp_path):
    """The study runs no trajectory evaluations (the sweep needs them for early stopping): how
    often a trial evaluates along the way is no part of the preparation's key, while a setting of
    the references' own evaluation (the generation length) is."""
    spaces = load_demo_spaces(tmp_path, [])
    study, sweep = spaces["study"], spaces["sweep"]
    assert study.unlearn.eval.every == 0 and sweep.unlearn.eval.every == 15
    assert study.prepare_key() == sweep.prepare_key()
    every = load_demo_spaces(tmp_path, ["study.unlearn.eval.every=5"])["study"]
    assert every.unlearn.eval.every == 5 and every.prepare_key() == study.prepare_key()
    # nor how many finetunings run at once (the models but for float rounding)
    assert load_demo_spaces(tmp_path, ["prepare.parallel=1"])["study"].prepare_key() == study.prepare_key()
    tokens = load_demo_spaces(tmp_path, ["unlearn.eval.max_new_tokens=16"])["study"]
    assert tokens.prepare_key() != study.prepare_key()
    with pytest.raises(UserError, match="share data, model, prepare"):
        load_demo_spaces(tmp_path, ["study.unlearn.eval.max_new_tokens=16"])


def test_overrides_route_by_prefix(tmp_path):
    spaces = load_demo_spaces(tmp_path, ["sweep.num_samples=3", "study.max_concurrent=1", "seed=7"])
    assert spaces["sweep"].num_samples == 3 and spaces["study"].max_concurrent == 1
    assert spaces["sweep"].max_concurrent == 2
    assert spaces["study"].seed == spaces["sweep"].seed == 7


def test_a_stage_only_override_of_shared_settings_is_refused(tmp_path):
    with pytest.raises(UserError, match="share data, model, prepare"):
        load_demo_spaces(tmp_path, ["sweep.data.forget_split=forget05"])


def test_smollm2_overrides_are_valid(tmp_path):
    spaces = load_demo_spaces(tmp_path, SMOLLM2)
    assert spaces["study"].model.name == "smollm2-135m" and spaces["study"].prepare.train_base is False
    assert spaces["study"].unlearn.eval.attacks == [] and load_demo_spaces(tmp_path, [])["study"].unlearn.eval.attacks
    assert spaces["study"].data.template == "plain" and spaces["sweep"].num_samples == 4
    # the tiny demo finetunes target and retain at once; SmolLM2's would share one GGUF conversion
    assert spaces["study"].prepare.parallel == 1 and load_demo_spaces(tmp_path, [])["study"].prepare.parallel == 2


def test_grid_sampler_needs_fixed_values(tmp_path):
    raw = {"name": "g", "results": str(tmp_path), "sampler": "grid",
           "families": {"wga+kl": {"wga.alpha": {"type": "uniform", "low": 0.5, "high": 2}}}}
    with pytest.raises(ConfigError, match="families.wga\\+kl.wga.alpha: sampler 'grid'"):
        load_space(data=raw)
    raw["families"] = {"wga+kl": {"wga.alpha": {"type": "fixed", "value": 2.0}}, "npo": {}}
    space = load_space(data=raw)
    assert space.total_trials == 2


def test_retain_reference_is_its_own_forget_quality_reference():
    """prepare() stores the retain model's evaluation with itself as the reference, so its
    `removal` (forget quality 1, KS statistic 0, privleak 0) is on the trials' scale."""
    from rayunlearn.config import EvalConfig
    from rayunlearn.eval.evaluate import evaluate_model
    from conftest import data_config, tiny_setup
    from rayunlearn.sweep.prepare import self_referenced

    model, tok, bench = tiny_setup(seed=3)
    plain = evaluate_model(model, tok, bench, data_config(), EvalConfig(max_new_tokens=4, rouge=False))
    cfg = EvalConfig(max_new_tokens=4, rouge=False)
    assert plain["removal_kind"] == "prob_removal" and plain["forget_quality"] is None
    ref = self_referenced(plain, cfg)
    assert ref["removal_kind"] == "tr_closeness" and ref["removal"] == 1.0
    assert ref["selection"]["ks_closeness"] == 1.0 and ref["selection"]["privleak_closeness"] == 1.0
    assert ref["forget_quality"] == 1.0 and ref["ks_statistic"] == 0.0
    assert ref["mia"]["privleak"] == 0.0
    # everything else is unchanged
    assert ref["model_utility"] == plain["model_utility"] and ref["forget"] == plain["forget"]
    assert ref["raw"] is plain["raw"]


def test_stages_option_parses_a_subset_in_stage_order():
    from rayunlearn.demo import STAGES, parse_stages

    assert parse_stages(None) == STAGES == ("study", "early", "sweep")
    assert parse_stages("study") == ("study",)
    assert parse_stages("sweep, study") == ("study", "sweep")
    assert parse_stages("sweep,early") == ("early", "sweep")
    for bad in ("report", "study,swep", " , "):
        with pytest.raises(UserError, match="--stages"):
            parse_stages(bad)


def test_demo_runs_only_the_stages_asked_for(tmp_path, monkeypatch):
    """`--stages study`: the study runs, the sweep neither runs nor is marked done, and a later
    `--stages sweep` runs the sweep and skips the finished study."""
    import rayunlearn.demo as demo
    import rayunlearn.report as report
    from rayunlearn import runs
    from rayunlearn.io import read_json

    ran = []
    monkeypatch.setattr(demo, "_run_stage", lambda space, console: ran.append(space.name) or {})
    (tmp_path / runs.REPORT_DIR).mkdir()
    monkeypatch.setattr(report, "build_report", lambda out_dir: tmp_path / runs.REPORT_DIR / "report.html")
    assert demo.demo_command(out=str(tmp_path), stages=("study",)) == 0
    state = read_json(tmp_path / runs.DEMO_STATE_FILE)
    assert ran == ["study"] and state["study"] == "done" and "sweep" not in state
    assert demo.demo_command(out=str(tmp_path), stages=("study", "sweep")) == 0
    assert ran == ["study", "sweep"]
    # --fresh starts over only the stages asked for
    assert demo.demo_command(out=str(tmp_path), stages=("sweep",), fresh=True) == 0
    assert ran == ["study", "sweep", "sweep"] and read_json(tmp_path / runs.DEMO_STATE_FILE)["study"] == "done"
    # every stage (the default), in order: only the early stage is left to run
    assert demo.demo_command(out=str(tmp_path)) == 0
    assert ran == ["study", "sweep", "sweep", "early"]
