"""Real-model recipes (rayunlearn/search_spaces/recipes/*.yaml): they load and validate offline, encode the
paper's TOFU recipe, build valid per-trial configs, and starting one offline fails fast with the
data / model error (no download, no training)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rayunlearn.config import UnlearnConfig, from_dict, to_dict
from rayunlearn.sweep.space import SPACE_DIR, load_space, stage_train

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPE_DIR = SPACE_DIR / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))

# file stem -> (model, template, lr, unlearning strategy, workers per trial, families)
EXPECTED = {
    "tofu_phi15_wga_kl": ("microsoft/phi-1_5", "plain", 2e-5, "ddp", 1, {"wga+kl"}),
    "tofu_llama2_7b_chat_npo_kl": ("NousResearch/Llama-2-7b-chat-hf", "llama2", 1e-5, "fsdp", 4, {"npo+kl"}),
    "tofu_llama32_1b_families": ("meta-llama/Llama-3.2-1B-Instruct", "chat", 1e-5, "ddp", 1,
                                 {"wga+kl", "npo+kl", "tnpo+kl", "wtnpo+kl"}),
}

# the paper's grids (log-uniform): key -> (low, high)
GRIDS = {"wga.alpha": (0.5, 5.0), "npo.beta": (0.05, 2.0), "kl.weight": (0.1, 10.0),
         "tnpo.beta": (0.5, 10.0), "wtnpo.alpha": (0.5, 5.0), "wtnpo.beta": (0.5, 10.0)}


def test_every_recipe_is_expected():
    assert {p.stem for p in RECIPES} == set(EXPECTED)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_encodes_the_paper_recipe(path: Path):
    from rayunlearn.train.schedule import Schedule

    space = load_space(path)
    model, template, lr, strategy, workers, families = EXPECTED[path.stem]
    assert space.name == path.stem
    assert (space.data.benchmark, space.data.forget_split, space.data.template) == ("tofu", "forget05", template)
    assert space.data.max_length == 500
    assert space.model.name == model
    assert space.seed == 42
    t = space.unlearn.train
    assert (t.epochs, t.batch_size, t.micro_batch_size, t.lr) == (5, 16, 4, lr)
    assert (t.warmup_epochs, t.weight_decay, t.max_grad_norm, t.bf16) == (1, 0.0, None, True)
    assert (t.checkpoint_every, space.unlearn.effects.every) == (5, 5)
    assert t.strategy == strategy
    assert space.resources.num_workers == workers and space.resources.gpus == 1
    # forget05 = 200 QA pairs: int(5 * 200) // 16 = 62 steps, warm-up round(200 / 16) = 12
    sched = Schedule(200, t)
    assert (sched.total_steps, sched.warmup_steps) == (62, 12)
    assert Schedule(400, t).total_steps == 125          # forget10
    # preparation: no base stage, target and retain with TOFU's finetuning recipe (batch 32)
    assert space.prepare.train_base is False and space.prepare.enabled and space.prepare.reference_eval
    for stage in ("target", "retain"):
        ft = stage_train(space, stage)
        assert (ft.epochs, ft.batch_size, ft.lr, ft.weight_decay, ft.bf16) == (5, 32, lr, 0.0, True)
        assert ft.use_gpu and ft.num_workers >= 2   # a Ray Train job: lands on GPU nodes
        assert ft.batch_size % (ft.micro_batch_size * ft.num_workers) == 0
    # the search: the paper's families and grids
    assert set(space.families) == families
    for fam, dists in space.distributions.items():
        for key, dist in dists.items():
            assert dist.type == "loguniform", (fam, key)
            assert (dist.low, dist.high) == pytest.approx(GRIDS[key]), (fam, key)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trial_configs_validate(path: Path):
    """Every family's per-trial UnlearnConfig (what the sweep builds) validates, with the
    recipe's worker count (batch 16 divisible by micro-batch x workers) and a GPU."""
    import optuna

    from rayunlearn.sweep.space import decode, define_by_run
    from rayunlearn.sweep.trial import TrialContext, trial_config

    space = load_space(path)
    ctx = TrialContext(space=to_dict(space), sweep_dir="/tmp/sweep", target="/tmp/target", data=None,
                       retain_reference="/tmp/sweep/reference/retain.json", aggregator=None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    fn = define_by_run(space)
    seen = set()
    for _ in range(40):
        trial = study.ask()
        consts = fn(trial)                                 # suggests first, then read params
        family, hp = decode(space, {**trial.params, **consts})
        study.tell(trial, [0.0, 0.0])
        cfg = trial_config(space, ctx, "t0", space.parsed_families[family].method_string(hp))
        cfg = from_dict(UnlearnConfig, to_dict(cfg))       # round trip: what a Ray worker receives
        assert cfg.train.num_workers == space.resources.num_workers
        assert cfg.train.use_gpu is True
        assert cfg.train.batch_size // (cfg.train.micro_batch_size * cfg.train.num_workers) in (1, 4)
        assert cfg.eval.retain_reference == ctx.retain_reference
        assert cfg.data.template == space.data.template and cfg.model.name == space.model.name
        for key, value in hp.items():
            lo, hi = GRIDS[key]
            assert lo <= value <= hi
        seen.add(family)
    assert seen == set(space.families)


def test_recipe_names_resolve_like_shipped_spaces():
    """`rayunlearn sweep recipes/<name>` finds the shipped file under rayunlearn/search_spaces/."""
    assert load_space("recipes/tofu_phi15_wga_kl").name == "tofu_phi15_wga_kl"


def _offline_single_process(path: Path, tmp_path: Path, extra=()):
    """The recipe with its preparation in this process (no Ray Train job, no GPU)."""
    over = [f"results={tmp_path / 'results'}"]
    for stage in ("target", "retain"):
        over += [f"prepare.{stage}.num_workers=1", f"prepare.{stage}.use_gpu=false",
                 f"prepare.{stage}.strategy=ddp", f"prepare.{stage}.progress=false"]
    return load_space(path, over + list(extra))


def test_offline_sweep_start_fails_fast_with_the_data_error(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1, no local TOFU copy: preparation stops at the benchmark with the
    message that says how to provide it (before any model is loaded)."""
    from rayunlearn.data.schema import DataError
    from rayunlearn.sweep import prepare as prep

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)                        # no results/data/tofu here
    import rayunlearn.models as models

    def no_model(*a, **k):                             # the data must fail first
        raise AssertionError("a model was loaded before the benchmark")

    monkeypatch.setattr(models, "load_model", no_model)
    import rayunlearn.data.tofu as tofu

    calls = []
    real = tofu._hub_split

    def hub_split(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(tofu, "_hub_split", hub_split)
    space = _offline_single_process(RECIPE_DIR / "tofu_phi15_wga_kl.yaml", tmp_path)
    with pytest.raises(DataError) as err:
        prep.prepare(space)
    msg = str(err.value)
    assert "cannot load the TOFU benchmark" in msg
    assert "data.tofu_dir=" in msg and "forget05.json" in msg
    assert calls == ["full"]                           # stopped at the first split
    root = tmp_path / "results" / "prepared" / space.prepare_key()
    assert not (root / "done.json").exists()           # nothing marked as prepared


def test_offline_sweep_start_fails_fast_with_the_model_error(tmp_path, monkeypatch):
    """With the benchmark available (a stand-in here) but the model neither local nor cached,
    the target finetuning stops with ModelLoadError naming the model and the fixes."""
    import rayunlearn.models as models
    from rayunlearn.train import tasks as train_tasks
    from rayunlearn.models import ModelLoadError
    from rayunlearn.sweep import prepare as prep

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)

    class Bench:
        def split(self, name):
            assert name == "full"                      # target stage trains on `full`
            return [{"question": "q", "answer": "a"}]

        def has(self, name):
            return False

    monkeypatch.setattr(train_tasks, "load_benchmark", lambda data_cfg: Bench())
    import rayunlearn.data as data_mod          # the driver's fail-fast check loads it too

    monkeypatch.setattr(data_mod, "load_benchmark", lambda data_cfg: Bench())

    def hub(cfg):      # the hub loader, offline and with an empty cache (no network attempt)
        raise ModelLoadError(f"could not load {cfg.name!r}: not a local directory and the hub is "
                             f"unreachable (HF_HUB_OFFLINE is set) and it is not in the local cache")

    monkeypatch.setattr(models, "_load_hub", hub)
    for path in RECIPES:
        space = _offline_single_process(path, tmp_path / path.stem)
        with pytest.raises(ModelLoadError) as err:
            prep.prepare(space)
        assert repr(space.model.name) in str(err.value)


def test_offline_model_error_message_from_the_real_loader(tmp_path, monkeypatch):
    """The real hub loader offline, with an empty hub cache: ModelLoadError, not a download."""
    from rayunlearn.config import ModelConfig
    from rayunlearn.models import ModelLoadError, load_model

    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(name="NousResearch/Llama-2-7b-chat-hf"))
    assert "HF_HUB_OFFLINE" in str(err.value) and "local model directory" in str(err.value)
