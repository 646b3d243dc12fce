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
