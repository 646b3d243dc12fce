"""LoRA (model.lora_r > 0): G-effects over the adapter parameters equal a float64 brute force;
unlearning changes only adapter weights; checkpoints hold the merged model plus the adapter, and
resume after an interruption gives the uninterrupted adapter."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import perturbed_copy
from test_effects_support import brute_force, effects_llama, forget_retain_batches

from rayunlearn.config import FinetuneConfig, ModelConfig, UnlearnConfig, from_dict
from rayunlearn.io import read_jsonl

DATA = {"max_length": 128, "forget_split": "forget10",
        "synth": {"num_authors": 20, "min_qa_per_author": 4, "max_qa_per_author": 4,
                  "num_world_facts": 24, "retain_perturbed_size": 8, "seed": 4}}
MODEL = {"name": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "vocab_size": 400, "max_position_embeddings": 128, "dtype": "float64"}
LORA = {"lora_r": 4, "lora_alpha": 8}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


def _lora_model(seed=0):
    """A tiny float64 Llama with LoRA adapters whose B matrices are non-zero (peft starts B at 0,
    which would make every A gradient vanish) and its frozen reference (the base, perturbed)."""
    from rayunlearn.models import apply_lora

    base = effects_llama(layers=2, kv_heads=2, seed=seed)
    ref = perturbed_copy(base)
    model = apply_lora(base, ModelConfig(lora_r=4, lora_alpha=8))
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, ref


@pytest.mark.parametrize("method", ["npo+kl", "ga+gd", "wga+kl"])
def test_lora_geffects_match_float64_brute_force(method):
    from rayunlearn.effects import gradient_effects

    model, ref = _lora_model()
    forget, retain = forget_retain_batches()
    res = gradient_effects(model, method, forget, retain, reference=ref)
    oracle = brute_force(model, method, forget, retain, reference=ref)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_A" in n or "lora_B" in n for n in adapters)
    for risk in ("removal", "retention"):
        eff, o = getattr(res, risk), oracle[risk]
        assert set(eff.by_parameter) == adapters                     # adapter tensors only
        scale = max(abs(o["total"]), max(abs(v) for v in o["by_parameter"].values()))
        for name, v in o["by_parameter"].items():
            assert abs(eff.by_parameter[name] - v) <= 1e-9 * scale, (risk, name, eff.by_parameter[name], v)
        assert abs(eff.total - o["total"]) <= 1e-9 * scale
        iscale = np.abs(o["by_instance"]).max()
        assert iscale > 0
        np.testing.assert_allclose(eff.by_instance, o["by_instance"], rtol=0, atol=1e-9 * iscale)


# --------------------------------------------------------------------------------------------
# the loop with LoRA


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from rayunlearn.train import finetune

    root = tmp_path_factory.mktemp("lora")
    finetune(from_dict(FinetuneConfig, {
        "stage": "base", "out": str(root / "target"), "data": _data(root), "model": MODEL,
        "train": {"batch_size": 16, "micro_batch_size": 16, "lr": 5e-3, "warmup_epochs": 0,
                  "max_steps": 2, "progress": False}}))
    return root


def _data(root):
    return {**DATA, "synth": {**DATA["synth"], "out": str(root / "data")}}


def ul_cfg(root, out, method="npo+kl", effects=None, **train) -> UnlearnConfig:
    t = {"batch_size": 8, "micro_batch_size": 4, "lr": 1e-2, "warmup_epochs": 0, "max_steps": 4,
         "checkpoint_every": 2, "progress": False, "seed": 0}
    t.update(train)
    return from_dict(UnlearnConfig, {"method": method, "target": str(root / "target"), "out": str(out),
                                     "data": _data(root), "model": {**MODEL, **LORA}, "train": t,
                                     "effects": effects or {"every": 0}, "evaluate": False})


class _Cut(Exception):
    pass


def _run(cfg, monkeypatch, cut_after=0):
    """Run unlearn(cfg); return the task (its live peft model). `cut_after`: interrupt after
    that many optimiser steps (before that step's checkpoint), then rerun to resume."""
    import rayunlearn.train as T
    from rayunlearn.train.progress import Bar
    from rayunlearn.train.tasks import UnlearnTask

    tasks = []
    real_build = UnlearnTask.build

    def build(self):
        real_build(self)
        tasks.append(self)

    monkeypatch.setattr(UnlearnTask, "build", build)
    if cut_after:
        real_advance, calls = Bar.advance, {"n": 0}

        def advance(self, loss):
            calls["n"] += 1
            if calls["n"] == cut_after:
                raise _Cut
            real_advance(self, loss)

        monkeypatch.setattr(Bar, "advance", advance)
        with pytest.raises(_Cut):
            T.unlearn(cfg)
        monkeypatch.setattr(Bar, "advance", real_advance)
    T.unlearn(cfg)
    monkeypatch.setattr(UnlearnTask, "build", real_build)
    return tasks[-1]


def test_lora_unlearning_changes_only_adapters_merges_and_resumes(root, tmp_path, monkeypatch):
    from rayunlearn.forward import token_view
    from rayunlearn.models import load_model
    from rayunlearn.data import load_benchmark as _load_benchmark
    from rayunlearn.data.examples import collate_examples, encode_records

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    effects = {"every": 1, "probe": "fixed", "probe_size": 4}
    task = _run(ul_cfg(root, full_dir, effects=effects), monkeypatch)
    model = task.model
    target = load_file(str(root / "target" / "model.safetensors"))
    # base weights bit-identical: every non-adapter tensor of the live peft model equals the target
    base = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for p in base.values())
    for n, p in base.items():
        key = n.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), target[key]), n
    # the adapters moved (B starts at 0 in peft: it must have become non-zero)
    adapter = load_file(str(full_dir / "checkpoints" / "step-4" / "adapter.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 1e-3
    # the checkpoint's model.safetensors is the merged model: same outputs as the live peft model
    cfg = ul_cfg(root, full_dir, effects=effects)
    merged, tok = load_model(ModelConfig(**{k: v for k, v in MODEL.items()}), path=full_dir / "checkpoints" / "step-4")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    rows = encode_records(_load_benchmark(cfg.data).split("forget10")[:4], tok, cfg.data)
    batch = collate_examples(rows, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        a, b = token_view(model, batch), token_view(merged, batch)
        t = token_view(load_model(ModelConfig(**MODEL), path=root / "target")[0], batch)
    assert torch.allclose(a.logps, b.logps, rtol=0, atol=1e-6)
    assert float((a.logps - t.logps).abs().max()) > 1e-3          # and it differs from the target
    # live G-effects ran over the adapter tensors only
    g = _geffects(full_dir)
    params = set(g[g.kind == "parameter"].parameter)
    assert params and all("lora_" in p for p in params)

    # interrupted after step 3 (last checkpoint step-2), resumed: the uninterrupted adapter
    _run(ul_cfg(root, cut_dir, effects=effects), monkeypatch, cut_after=3)
    resumed = load_file(str(cut_dir / "checkpoints" / "step-4" / "adapter.safetensors"))
    assert set(resumed) == set(adapter)
    for k in adapter:
        assert torch.equal(resumed[k], adapter[k]), k
    la = [r["loss"] for r in read_jsonl(full_dir / "log.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(cut_dir / "log.jsonl") if "loss" in r]
    assert la == lb and len(la) == 4
    # the G-effect rows recorded before the interruption survive the resume
    ga, gb = _geffects(full_dir), _geffects(cut_dir)
    key = ["step", "risk", "kind", "parameter", "term", "instance", "estimator"]
    assert sorted(set(gb.step)) == [0, 1, 2, 3, 4]
    a, b = ga.set_index(key)["value"].sort_index(), gb.set_index(key)["value"].sort_index()
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.values, a.values, rtol=1e-12, atol=0)


def _geffects(run):
    import pyarrow.parquet as pq

    [d] = list((run / "effects").iterdir())
    return pq.read_table(d / "geffects.parquet").to_pandas()
