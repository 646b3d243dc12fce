"""rayunlearn.sweep.prepare.finetune_all: the finetunings that start from the base model, one
after another or several at once in processes of their own, give the same models."""

import pytest
import torch
from safetensors.torch import load_file

from rayunlearn.config import FinetuneConfig, from_dict

DATA = {"max_length": 96, "forget_split": "forget10",
        "synth": {"num_authors": 10, "min_qa_per_author": 3, "max_qa_per_author": 3,
                  "num_world_facts": 12, "retain_perturbed_size": 4, "seed": 5}}
MODEL = {"name": "tiny", "hidden_size": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "vocab_size": 400, "max_position_embeddings": 96}
TRAIN = {"batch_size": 8, "micro_batch_size": 8, "lr": 5e-3, "warmup_epochs": 0, "max_steps": 3, "progress": False}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


def _cfg(root, stage, out, seed=0, init=None):
    return from_dict(FinetuneConfig, {"stage": stage, "init": init, "out": str(out), "replay_world": True,
                                      "data": {**DATA, "synth": {**DATA["synth"], "out": str(root / "data")}},
                                      "model": MODEL, "train": {**TRAIN, "seed": seed}})


def test_parallel_finetunings_equal_the_sequential_ones(tmp_path):
    from rayunlearn.sweep.prepare import finetune_all
    from rayunlearn.train import finetune

    base = finetune(_cfg(tmp_path, "base", tmp_path / "base"))
    stages = [("target", "target", 0), ("retain", "retain", 0), ("retain.1", "retain", 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # what each of the parallel workers below gets (2 threads // 2)
    try:
        order = []
        finetune_all([(n, _cfg(tmp_path, s, tmp_path / "seq" / n, j, str(base))) for n, s, j in stages], 1,
                     order.append)
        assert order == ["target", "retain", "retain.1"]
        torch.set_num_threads(2)
        done = []
        finetune_all([(n, _cfg(tmp_path, s, tmp_path / "par" / n, j, str(base))) for n, s, j in stages], 2,
                     done.append)
    finally:
        torch.set_num_threads(threads)
    assert sorted(done) == sorted(order)
    for name, _, _ in stages:
        seq = load_file(tmp_path / "seq" / name / "model.safetensors")
        par = load_file(tmp_path / "par" / name / "model.safetensors")
        assert seq.keys() == par.keys()
        for k in seq:
            assert torch.equal(seq[k], par[k]), (name, k)
    # the seeds differ: the replicate is another model than the retain model
    a = load_file(tmp_path / "par" / "retain" / "model.safetensors")
    b = load_file(tmp_path / "par" / "retain.1" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_failed_parallel_finetuning_is_raised(tmp_path):
    from rayunlearn.sweep.prepare import finetune_all

    done = []
    bad = _cfg(tmp_path, "target", tmp_path / "t", init=str(tmp_path / "no-such-base"))
    with pytest.raises(Exception, match="no-such-base"):
        finetune_all([("target", bad), ("retain", _cfg(tmp_path, "retain", tmp_path / "r",
                                                       init=str(tmp_path / "no-such-base")))], 2, done.append)
    assert done == []
