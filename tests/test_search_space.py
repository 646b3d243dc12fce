"""Search spaces as data: every shipped file loads; bad files fail with the key in the message;
the define-by-run space samples what the file says; method strings come from the objectives."""

import math
from pathlib import Path

import optuna
import pytest
import yaml

from rayunlearn.config import ConfigError
from rayunlearn.sweep.space import SPACE_DIR, decode, define_by_run, load_space

SHIPPED = sorted(SPACE_DIR.glob("*.yaml"))
GOOD = {"families": {"wga+kl": {"wga.alpha": {"type": "loguniform", "low": 0.1, "high": 10},
                                "kl.weight": {"type": "uniform", "low": 0.1, "high": 5}}},
        "name": "t"}


def test_paper_spaces_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"wga_kl", "npo_kl", "tnpo_kl", "wtnpo_kl", "rmu_kl", "ga_gd", "families", "tiny"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_space_loads(path):
    space = load_space(path)
    raw = yaml.safe_load(path.read_text())
    assert space.name == raw.get("name", path.stem)   # the demo's spaces name their directories
    assert space.objectives == {"removal": "max", "retention": "max"}
    assert set(space.distributions) == set(raw["families"])
    for family, dists in space.distributions.items():
        assert set(dists) == set(raw["families"][family])


def test_a_space_is_a_file_or_a_shipped_name(tmp_path, monkeypatch):
    """A bare name finds the package's own file from any working directory; an existing file of
    that name wins; an unknown name lists the shipped ones."""
    monkeypatch.chdir(tmp_path)
    assert load_space("wga_kl").families == load_space(SPACE_DIR / "wga_kl.yaml").families
    assert load_space("recipes/tofu_phi15_wga_kl").model.name == "microsoft/phi-1_5"
    (tmp_path / "wga_kl.yaml").write_text(yaml.safe_dump({**GOOD, "num_samples": 3}))
    assert load_space("wga_kl.yaml").num_samples == 3 and load_space("wga_kl.yaml").name == "t"
    with pytest.raises(ConfigError, match=r"'nope' not found.*tiny"):
        load_space("nope")


def test_shipped_spaces_are_package_data():
    """A non-editable install carries every shipped space and preset: each file matches one of
    pyproject.toml's package-data patterns."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rayunlearn"]
    package = root / "rayunlearn"
    files = [p for p in SPACE_DIR.rglob("*") if p.is_file()] + list((package / "presets").glob("*"))
    assert len(files) > len(SHIPPED)
    for f in files:
        rel = f.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/") for pat in patterns), rel


def _bad(tmp_path, data: dict, *overrides):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_space(p, list(overrides))
    return str(exc.value)


def test_unknown_top_level_key(tmp_path):
    msg = _bad(tmp_path, {**GOOD, "num_sample": 3})
    assert "num_sample" in msg and "num_samples" in msg     # did-you-mean


def test_unknown_nested_key(tmp_path):
    msg = _bad(tmp_path, {**GOOD, "resources": {"cpu": 1}})
    assert "resources.cpu" in msg


def test_unknown_family(tmp_path):
    msg = _bad(tmp_path, {"name": "t", "families": {"wgaa+kl": {}}})
    assert "families.wgaa+kl" in msg and "'wga'" in msg     # the registry's suggestion


def test_unknown_hyper_parameter(tmp_path):
    msg = _bad(tmp_path, {"name": "t", "families": {"wga+kl": {"wga.beta": {"type": "uniform", "low": 0, "high": 1}}}})
    assert "families.wga+kl.wga.beta" in msg and "alpha" in msg
    msg = _bad(tmp_path, {"name": "t", "families": {"wga+kl": {"npo.beta": {"type": "uniform", "low": 0, "high": 1}}}})
    assert "families.wga+kl.npo.beta" in msg and "not a term" in msg
    msg = _bad(tmp_path, {"name": "t", "families": {"wga+kl": {"alpha": {"type": "uniform", "low": 0, "high": 1}}}})
    assert "families.wga+kl.alpha" in msg and "<term>.<param>" in msg


@pytest.mark.parametrize("spec,needle", [
    ({"type": "uniform", "low": 2, "high": 1}, "low (2) must be < high (1)"),
    ({"type": "uniform", "low": 1, "high": 1}, "must be < high"),
    ({"type": "loguniform", "low": 0, "high": 1}, "low > 0"),
    ({"type": "loguniform", "low": -1, "high": 1}, "low > 0"),
    ({"type": "normal", "low": 0, "high": 1}, "not one of"),
    ({"type": "uniform", "low": 0}, "needs both low and high"),
    ({"type": "int", "low": 0.5, "high": 3}, "integer"),
    ({"type": "choice", "values": []}, "non-empty"),
    ({"type": "uniform", "low": 0, "high": 1, "step": 0.1}, "step"),
])
def test_bad_distribution(tmp_path, spec, needle):
    msg = _bad(tmp_path, {"name": "t", "families": {"wga+kl": {"wga.alpha": spec}}})
    assert "families.wga+kl.wga.alpha" in msg and needle in msg


def test_bad_sampler_objectives_and_counts(tmp_path):
    assert "sampler" in _bad(tmp_path, {**GOOD, "sampler": "cmaes"})
    assert "objectives" in _bad(tmp_path, {**GOOD, "objectives": {"removal": "max"}})
    assert "objectives.retention" in _bad(tmp_path, {**GOOD, "objectives": {"removal": "max", "retention": "up"}})
    assert "num_samples" in _bad(tmp_path, {**GOOD, "num_samples": 0})
    assert "prepare.base.lr" in _bad(tmp_path, {**GOOD, "prepare": {"base": {"lr": -1}}})
    assert "unlearn.train.epochs" in _bad(tmp_path, {**GOOD, "unlearn": {"train": {"epochs": 0}}})
    assert "families" in _bad(tmp_path, {"name": "t"})


def test_overrides(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(GOOD))
    space = load_space(p, ["num_samples=7", "unlearn.train.lr=3e-4", "families.wga+kl.wga.alpha.high=20"])
    assert space.num_samples == 7 and space.unlearn.train.lr == 3e-4
    assert space.distributions["wga+kl"]["wga.alpha"].high == 20


def test_define_by_run_samples_inside_the_distributions():
    space = load_space(SPACE_DIR / "families.yaml")
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    fn = define_by_run(space)
    seen = set()
    for _ in range(40):
        trial = study.ask()
        consts = fn(trial)
        config = {**trial.params, **consts}
        family, hp = decode(space, config)
        seen.add(family)
        dists = space.distributions[family]
        assert set(hp) == set(dists)
        for k, v in hp.items():
            d = dists[k]
            if d.type in ("uniform", "loguniform", "int"):
                assert d.low <= v <= d.high
            if d.type == "int":
                assert isinstance(v, int)
        m = space.parsed_families[family].method_string(hp)
        assert m.split("(")[0].split("+")[0] == family.split("+")[0]
        study.tell(trial, [0.0, 0.0])
    assert len(seen) >= 4     # the family is a categorical choice


def test_method_string_and_unit_positions():
    space = load_space(data=GOOD)
    fam = space.parsed_families["wga+kl"]
    assert fam.method_string({"wga.alpha": 2.0, "kl.weight": 0.5}) == "wga(alpha=2.0)+kl(mask=answer, weight=0.5)"
    assert fam.retain_keys({"wga.alpha": 2.0, "kl.weight": 0.5}) == ["kl.weight"]
    d = space.distributions["wga+kl"]
    assert d["wga.alpha"].unit(1.0) == pytest.approx(0.5)          # log-scaled: 1 is the middle of [0.1, 10]
    assert d["kl.weight"].unit(2.55) == pytest.approx(0.5)         # linear
    assert math.isclose(d["wga.alpha"].unit(10.0), 1.0)


# ------------------------------------------------------------------------------------------
# domains: a range reaching outside a hyper-parameter's domain fails when the space loads


@pytest.mark.parametrize("family, key, spec, message", [
    ("wga+kl", "wga.alpha", {"type": "uniform", "low": -5, "high": -1},
     "families.wga+kl.wga.alpha: uniform [-5, -1] reaches outside the domain of wga.alpha, which must be "
     "a finite number >= 0 (e.g. -5.0); narrow the distribution"),
    ("npo+kl", "npo.beta", {"type": "uniform", "low": 0, "high": 2},
     "families.npo+kl.npo.beta: uniform [0, 2] reaches outside the domain of npo.beta, which must be "
     "a finite number > 0 (e.g. 0.0); narrow the distribution"),
    ("wga+kl", "kl.weight", {"type": "uniform", "low": -1, "high": 1},
     "families.wga+kl.kl.weight: uniform [-1, 1] reaches outside the domain of kl.weight, which must be "
     "a finite number > 0 (e.g. -1.0); narrow the distribution"),
    ("wga+kl", "wga.weight", 0,
     "families.wga+kl.wga.weight: fixed 0 reaches outside the domain of wga.weight, which must be "
     "a finite number > 0 (e.g. 0); narrow the distribution"),
    ("tnpo+kl", "tnpo.eps", {"type": "choice", "values": [0, 1e-5, -1e-5]},
     "families.tnpo+kl.tnpo.eps: choice [0, 1e-05, -1e-05] reaches outside the domain of tnpo.eps, which "
     "must be a finite number >= 0 (e.g. -1e-05); narrow the distribution"),
    ("ga+kl", "kl.mask", {"type": "choice", "values": ["answer", "none"]},
     "families.ga+kl.kl.mask: choice ['answer', 'none'] reaches outside the domain of kl.mask, which "
     "must be one of answer, all (e.g. 'none'); narrow the distribution"),
    ("rmu+kl", "rmu.layer", {"type": "uniform", "low": 0, "high": 3},
     "families.rmu+kl.rmu.layer: uniform [0, 3] reaches outside the domain of rmu.layer, which must be "
     "a block index (negative counts from the last block) or 'middle' (e.g. 0.0); narrow the distribution"),
    ("satimp+gd", "satimp.beta2", {"type": "int", "low": -2, "high": 3},
     "families.satimp+gd.satimp.beta2: int [-2, 3] reaches outside the domain of satimp.beta2, which must "
     "be a finite number >= 0 (e.g. -2); narrow the distribution"),
])
def test_distribution_outside_the_domain_names_the_key_and_domain(tmp_path, family, key, spec, message):
    assert _bad(tmp_path, {"name": "t", "families": {family: {key: spec}}}) == message


def test_distribution_at_the_domain_edge_and_integer_layers_load(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "families": {
        "wga+kl": {"wga.alpha": {"type": "uniform", "low": 0, "high": 2}},      # alpha = 0 is GA
        "rmu+kl": {"rmu.layer": {"type": "int", "low": -2, "high": 3}, "rmu.c": 4}}}))
    space = load_space(p)
    assert space.distributions["rmu+kl"]["rmu.layer"].extremes() == [-2, 3]


def test_family_without_forget_term_needs_allow_no_forget(tmp_path):
    msg = _bad(tmp_path, {"name": "t", "families": {"gd+kl": {"kl.weight": 1}}})
    assert msg.startswith("families.gd+kl: 'gd+kl(mask=answer)' has no forget term"), msg
    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "families": {"gd+kl": {"kl.weight": 1}},
                                 "unlearn": {"allow_no_forget": True}}))
    space = load_space(p)
    assert [t.side for t in space.parsed_families["gd+kl"].method.terms] == ["retain", "retain"]
    # the trial's UnlearnConfig inherits the permission (it parses the method again at load)
    from rayunlearn.config import to_dict
    from rayunlearn.sweep.trial import TrialContext, trial_config

    ctx = TrialContext(space=to_dict(space), sweep_dir=str(tmp_path), target=str(tmp_path / "target"),
                       data=None, retain_reference=None, aggregator=None)
    cfg = trial_config(space, ctx, "t0", space.parsed_families["gd+kl"].method_string({"kl.weight": 1}))
    assert cfg.allow_no_forget is True and cfg.method == "gd+kl(mask=answer)"


@pytest.mark.parametrize("data, message", [
    ({"resources": {"cpus": 0}}, "resources.cpus: must be a finite number > 0 (got 0)"),
    ({"resources": {"gpus": -1}}, "resources.gpus: must be a finite number >= 0 (got -1)"),
    ({"resources": {"num_workers": 0}}, "resources.num_workers: must be an integer >= 1 (got 0)"),
    ({"resources": {"torch_threads": -1}}, "resources.torch_threads: must be an integer >= 0 (got -1)"),
    ({"ray": {"num_cpus": 0}}, "ray.num_cpus: must be an integer >= 1 or null (got 0)"),
    ({"ray": {"num_gpus": -1}}, "ray.num_gpus: must be an integer >= 0 or null (got -1)"),
    ({"num_samples": 0}, "num_samples: must be an integer >= 1 (got 0)"),
    ({"max_concurrent": 0}, "max_concurrent: must be an integer >= 1 (got 0)"),
    ({"max_failures": -1}, "max_failures: must be an integer >= 0 (got -1)"),
    ({"seed": -3}, "seed: must be an integer >= 0 (got -3)"),
    ({"unlearn": {"train": {"max_grad_norm": -1}}},
     "unlearn.train.max_grad_norm: must be a finite number > 0 or null (got -1)"),
])
def test_resource_and_count_domains(tmp_path, data, message):
    assert _bad(tmp_path, {**GOOD, **data}) == message


def test_every_numeric_space_field_has_a_domain():
    import dataclasses
    import typing

    from rayunlearn.sweep.space import Distribution, RaySettings, Resources, SearchSpace

    for cls in (Resources, RaySettings, SearchSpace):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if {int, float} & ({hints[f.name]} | set(typing.get_args(hints[f.name]))):
                assert f.name in cls.DOMAINS, f"{cls.__name__}.{f.name} has no domain"
    # a distribution's bounds are checked against the hyper-parameter's own domain instead
    assert not hasattr(Distribution, "DOMAINS")
