"""Typed configs: presets, overrides, and errors that name the key."""

import pytest
import yaml

from rayunlearn import config as C


def test_defaults_and_overrides_are_typed():
    cfg = C.load_config(C.UnlearnConfig, overrides=["method=npo(beta=0.1)+kl(weight=0.5)", "train.lr=1e-4",
                                                   "train.epochs=3", "data.forget_split=forget05",
                                                   "eval.max_items=null", "effects.every=2"])
    assert cfg.method == "npo(beta=0.1)+kl(weight=0.5)"
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    assert cfg.data.forget_split == "forget05"
    assert cfg.eval.max_items is None
    assert cfg.effects.every == 2
    # untouched nested defaults survive a partial override
    assert cfg.train.micro_batch_size == 4 and cfg.model.name == "tiny"


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),                 # unknown key
    ("train.micro_batch_size=two", "train.micro_batch_size"),   # wrong type
    ("train.lr=-1", "train.lr"),                  # impossible value
    ("data.forget_split=forget07", "data.forget_split"),        # not a choice
    ("model.num_kv_heads=3", "model.num_kv_heads"),             # does not divide the heads
    ("train.batch_size=10", "train.batch_size"),  # not a multiple of the micro-batch
    ("effects.per_instance=maybe", "effects.per_instance"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.UnlearnConfig, overrides=[override])
    assert str(err.value).startswith(key), str(err.value)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(C.ConfigError, match=r"did you mean train\.epochs"):
        C.load_config(C.UnlearnConfig, overrides=["train.epoch=3"])


def test_override_syntax_error():
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load_config(C.UnlearnConfig, overrides=["train.lr"])


def test_yaml_preset_file_and_missing_preset(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"method": "ga", "train": {"epochs": 2}}))
    cfg = C.load_config(C.UnlearnConfig, preset=str(path), overrides=["train.epochs=4"])
    assert cfg.method == "ga" and cfg.train.epochs == 4.0
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(C.UnlearnConfig, preset="no_such_preset")


def test_saved_config_round_trips_and_guards_resume(tmp_path):
    cfg = C.load_config(C.UnlearnConfig, overrides=["train.lr=0.002"])
    C.save_config(cfg, tmp_path / "config.yaml")
    again = C.load_config(C.UnlearnConfig, data=yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    C.check_resume_config(cfg, tmp_path / "config.yaml")           # same: fine
    other = C.load_config(C.UnlearnConfig, overrides=["train.lr=0.003"])
    with pytest.raises(C.ConfigError, match="train.lr: saved 0.002, now 0.003"):
        C.check_resume_config(other, tmp_path / "config.yaml")


def test_finetune_defaults_differ_from_unlearn_train_defaults():
    ft = C.load_config(C.FinetuneConfig, overrides=["train.epochs=2"])
    # a partial override of the finetune train section keeps the finetune defaults
    assert ft.train.lr == pytest.approx(3e-3) and ft.train.epochs == 2.0


# ------------------------------------------------------------------------------------------
# domains: every numeric setting is checked when the config loads, and the message names it


@pytest.mark.parametrize("override, message", [
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be a finite number > 0 or null (got -1)"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm: must be a finite number > 0 or null (got nan)"),
    ("train.max_grad_norm=0", "train.max_grad_norm: must be a finite number > 0 or null (got 0)"),
    ("train.num_workers=0", "train.num_workers: must be an integer >= 1 (got 0)"),
    ("train.epochs=inf", "train.epochs: must be a finite number > 0 (got inf)"),
    ("train.epochs=0", "train.epochs: must be a finite number > 0 (got 0)"),
    ("train.lr=.inf", "train.lr: must be a finite number > 0 (got inf)"),
    ("train.lr=0", "train.lr: must be a finite number > 0 (got 0)"),
    ("train.batch_size=0", "train.batch_size: must be an integer >= 1 (got 0)"),
    ("train.micro_batch_size=-4", "train.micro_batch_size: must be an integer >= 1 (got -4)"),
    ("train.warmup_epochs=-1", "train.warmup_epochs: must be a finite number >= 0 (got -1)"),
    ("train.warmup_epochs=6", "train.warmup_epochs: must be <= epochs (5), got 6"),
    ("train.weight_decay=-0.01", "train.weight_decay: must be a finite number >= 0 (got -0.01)"),
    ("train.checkpoint_every=-5", "train.checkpoint_every: must be an integer >= 0 (got -5)"),
    ("train.log_every=0", "train.log_every: must be an integer >= 1 (got 0)"),
    ("train.max_steps=-1", "train.max_steps: must be an integer >= 0 (got -1)"),
    ("train.seed=-1", "train.seed: must be an integer >= 0 (got -1)"),
    ("effects.every=-1", "effects.every: must be an integer >= 0 (got -1)"),
    ("effects.probe_size=0", "effects.probe_size: must be an integer >= 1 (got 0)"),
    ("eval.every=-2", "eval.every: must be an integer >= 0 (got -2)"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens: must be an integer >= 1 (got 0)"),
    ("eval.max_items=0", "eval.max_items: must be an integer >= 1 or null (got 0)"),
    ("eval.batch_size=0", "eval.batch_size: must be an integer >= 1 (got 0)"),
    ("eval.mia_min_k=0", "eval.mia_min_k: must be a finite number in (0, 1] (got 0)"),
    ("eval.mia_min_k=1.5", "eval.mia_min_k: must be a finite number in (0, 1] (got 1.5)"),
    ("data.max_length=4", "data.max_length: must be an integer >= 8 (got 4)"),
    ("data.synth.max_qa_per_author=21", "data.synth.max_qa_per_author: must be an integer in [1, 20] (got 21)"),
    ("data.synth.num_authors=5", "data.synth.num_authors: must be an integer >= 10 (got 5)"),
    ("model.num_heads=0", "model.num_heads: must be an integer >= 1 (got 0)"),
    ("model.num_kv_heads=0", "model.num_kv_heads: must be an integer >= 1 (got 0)"),
    ("model.lora_r=-1", "model.lora_r: must be an integer >= 0 (got -1)"),
    ("model.lora_dropout=1", "model.lora_dropout: must be a finite number in [0, 1) (got 1)"),
    ("model.vocab_size=100", "model.vocab_size: must be an integer >= 300 (got 100)"),
])
def test_domains_refuse_with_the_key_and_the_domain(override, message):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.UnlearnConfig, overrides=[override])
    assert str(err.value) == message


def test_warmup_may_exceed_epochs_when_max_steps_sets_the_length():
    cfg = C.load_config(C.UnlearnConfig, overrides=["train.warmup_epochs=6", "train.max_steps=10"])
    assert cfg.train.warmup_epochs == 6.0 and cfg.train.max_grad_norm is None
    assert C.load_config(C.UnlearnConfig, overrides=["train.max_grad_norm=1"]).train.max_grad_norm == 1.0


def test_every_numeric_field_has_a_domain():
    import dataclasses
    import typing

    for cls in (C.SynthConfig, C.DataConfig, C.ModelConfig, C.TrainConfig, C.EffectsConfig, C.EvalConfig,
                C.FinetuneConfig, C.UnlearnConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if {int, float} & ({hints[f.name]} | set(typing.get_args(hints[f.name]))):
                assert f.name in cls.DOMAINS, f"{cls.__name__}.{f.name} has no domain"


@pytest.mark.parametrize("method, message", [
    ("ga(weight=-1)", "method: ga.weight=-1"),
    ("ga+kl(weight=0)", "method: kl.weight=0"),
    ("wga(alpha=-2)+kl", "method: wga.alpha=-2"),
    ("kl", "method: 'kl(mask=answer)' has no forget term"),
    ("gd", "method: 'gd' has no forget term"),
])
def test_method_is_checked_when_the_config_loads(method, message):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.UnlearnConfig, overrides=[f"method={method}"])
    assert str(err.value).startswith(message), str(err.value)


def test_allow_no_forget_is_explicit():
    cfg = C.load_config(C.UnlearnConfig, overrides=["method=gd+kl", "allow_no_forget=true"])
    assert cfg.method == "gd+kl" and cfg.allow_no_forget is True
    with pytest.raises(C.ConfigError, match="allow_no_forget: expected true/false"):
        C.load_config(C.UnlearnConfig, overrides=["method=gd", "allow_no_forget=1"])


@pytest.mark.parametrize("name", ["garbage", "no_such_dir/", "/no/such/model/dir", "a/b/c", "org/"])
def test_unknown_model_name_is_refused_even_with_a_target(name):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(C.UnlearnConfig, overrides=[f"model.name={name}", "target=results/models/target"])
    msg = str(err.value)
    assert msg.startswith(f"model.name: {name!r} is not a model preset (tiny, smollm2-135m)"), msg


def test_model_names_that_resolve(tmp_path):
    for name in ("tiny", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "locuslab/tofu_ft_phi-1.5", str(tmp_path)):
        assert C.load_config(C.ModelConfig, overrides=[f"name={name}"]).name == name


def test_resume_tolerates_a_field_added_since_the_run_at_its_default(tmp_path):
    cfg = C.load_config(C.UnlearnConfig)
    saved = C.to_dict(cfg)
    del saved["allow_no_forget"]        # a run saved before the field existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    C.check_resume_config(cfg, tmp_path / "config.yaml")
    other = C.load_config(C.UnlearnConfig, overrides=["method=gd", "allow_no_forget=true"])
    with pytest.raises(C.ConfigError, match="allow_no_forget: saved False, now True"):
        C.check_resume_config(other, tmp_path / "config.yaml")
