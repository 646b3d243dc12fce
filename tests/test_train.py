"""The training loop (rayunlearn.train): determinism, gradient-accumulation invariance with
effective-batch normalisation, resume after interruption, and 1 process == 2 Ray Train workers."""

import os

import pytest
import torch
from safetensors.torch import load_file

from rayunlearn.config import ConfigError, FinetuneConfig, TrainConfig, from_dict
from rayunlearn.forward import token_view
from rayunlearn.io import read_json, read_jsonl

DATA = {"max_length": 128, "forget_split": "forget10",
        "synth": {"num_authors": 20, "min_qa_per_author": 4, "max_qa_per_author": 4,
                  "num_world_facts": 24, "retain_perturbed_size": 8, "seed": 1}}
MODEL = {"name": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "vocab_size": 400, "max_position_embeddings": 128, "dtype": "float64"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench") / "synthetic")


def ft_cfg(data_dir, out, stage="base", init=None, **train) -> FinetuneConfig:
    t = {"epochs": 1, "batch_size": 8, "micro_batch_size": 8, "lr": 3e-3, "warmup_epochs": 0,
         "progress": False, "seed": 0}
    t.update(train)
    return from_dict(FinetuneConfig, {"stage": stage, "init": init, "out": str(out),
                                      "data": {**DATA, "synth": {**DATA["synth"], "out": data_dir}},
                                      "model": MODEL, "train": t})


@pytest.fixture(scope="session")
def base_dir(data_dir, tmp_path_factory):
    from rayunlearn.train import finetune

    out = tmp_path_factory.mktemp("models") / "base"
    return str(finetune(ft_cfg(data_dir, out, max_steps=2)))


def weights(run_dir):
    return load_file(os.path.join(run_dir, "model.safetensors"))


def test_schedule_is_a_function_of_the_seed_and_covers_each_epoch():
    from rayunlearn.train.schedule import Schedule

    tc = TrainConfig(epochs=2, batch_size=4, micro_batch_size=2, seed=5)
    a, b = Schedule(10, tc), Schedule(10, tc)
    assert a.total_steps == 5 and a.warmup_steps == 2          # int(2*10)//4, round(1*10/4)
    stream = [i for s in range(5) for i in a.indices(s)]
    assert stream == [i for s in range(5) for i in b.indices(s)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream != [i for s in range(5) for i in Schedule(10, TrainConfig(epochs=2, batch_size=4,
                                                                            micro_batch_size=2, seed=6)).indices(s)]
    # warm-up then linear decay; never 0 during the run
    assert [round(a.lr_factor(s), 4) for s in range(5)] == [0.5, 1.0, 1.0, 0.6667, 0.3333]
    # TOFU's step count: forget05 (200 items), 5 epochs, effective batch 16 -> 62 steps
    assert Schedule(200, TrainConfig(epochs=5, batch_size=16, micro_batch_size=4)).total_steps == 62


def test_same_seed_same_weights(data_dir, tmp_path):
    from rayunlearn.train import finetune

    a = finetune(ft_cfg(data_dir, tmp_path / "a", max_steps=2))
    b = finetune(ft_cfg(data_dir, tmp_path / "b", max_steps=2))
    c = finetune(ft_cfg(data_dir, tmp_path / "c", max_steps=2, seed=1))
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert read_json(a / "status.json")["status"] == "completed"
    assert (a / "config.yaml").exists() and (a / "checkpoints" / "step-2" / "optimizer.safetensors").exists()


def test_grad_accumulation_invariance_and_loss_oracle(data_dir, base_dir, tmp_path):
    """micro 2 x accum 4 == micro 8 x accum 1 after a step (float64), and the logged loss is
    the token-mean NLL of the whole effective batch (brute force)."""
    from rayunlearn.models import load_model
    from rayunlearn.data import load_benchmark as _load_benchmark
    from rayunlearn.data.examples import collate_examples, encode_records
    from rayunlearn.train import finetune
    from rayunlearn.train.schedule import Schedule

    split = finetune(ft_cfg(data_dir, tmp_path / "split", "target", base_dir, max_steps=1, micro_batch_size=2))
    whole = finetune(ft_cfg(data_dir, tmp_path / "whole", "target", base_dir, max_steps=1, micro_batch_size=8))
    ws, ww = weights(split), weights(whole)
    for k in ws:
        assert torch.allclose(ws[k], ww[k], rtol=0, atol=1e-12), k
    base = weights(base_dir)
    assert any(not torch.equal(ws[k], base[k]) for k in ws)

    cfg = ft_cfg(data_dir, tmp_path / "x", "target", base_dir)
    model, tok = load_model(cfg.model, path=base_dir)
    bench = _load_benchmark(cfg.data)
    ex = encode_records(bench.split("full"), tok, cfg.data)
    idx = Schedule(len(ex), cfg.train).indices(0)
    total_nll, total_tok = 0.0, 0
    with torch.no_grad():
        for i in idx:                           # one example at a time: no batching effects
            v = token_view(model, collate_examples([ex[i]], tok.pad_token_id))
            total_nll += float(-(v.logps * v.mask).sum())
            total_tok += int(v.mask.sum())
    for run in (split, whole):
        rec = [r for r in read_jsonl(run / "log.jsonl") if "loss" in r][0]
        # rel 1e-6: forward.label_logps computes log-softmax in float32 even for float64 models
        assert rec["step"] == 1 and rec["loss"] == pytest.approx(total_nll / total_tok, rel=1e-6)


def test_resume_after_interruption_gives_identical_weights(data_dir, base_dir, tmp_path, monkeypatch):
    import rayunlearn.train as T
    from rayunlearn.train.progress import Bar

    kw = dict(max_steps=4, checkpoint_every=2, micro_batch_size=4)
    full = T.finetune(ft_cfg(data_dir, tmp_path / "full", "target", base_dir, **kw))

    calls = {"n": 0}
    real_advance = Bar.advance

    def interrupt(self, loss):
        calls["n"] += 1
        if calls["n"] == 3:                      # after step 3's log line, before its hooks
            raise KeyboardInterrupt
        real_advance(self, loss)

    monkeypatch.setattr(Bar, "advance", interrupt)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        T.finetune(ft_cfg(data_dir, cut, "target", base_dir, **kw))
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-2"]
    assert read_json(cut / "status.json")["status"] == "running"
    monkeypatch.setattr(Bar, "advance", real_advance)

    with pytest.raises(ConfigError, match="different config"):
        T.finetune(ft_cfg(data_dir, cut, "target", base_dir, **{**kw, "lr": 1e-3}))
    T.finetune(ft_cfg(data_dir, cut, "target", base_dir, **kw))
    wf, wc = weights(full), weights(cut)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    steps = [r["step"] for r in read_jsonl(cut / "log.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert [r["loss"] for r in read_jsonl(cut / "log.jsonl") if "loss" in r] == \
        [r["loss"] for r in read_jsonl(full / "log.jsonl") if "loss" in r]


def test_finetune_target_needs_init(data_dir, tmp_path):
    from rayunlearn import UserError
    from rayunlearn.train import finetune

    with pytest.raises(UserError, match="init="):
        finetune(ft_cfg(data_dir, tmp_path / "t", "target"))


@pytest.mark.ray
def test_two_ray_train_workers_match_one_process(data_dir, base_dir, tmp_path):
    """Same effective batches, same seed: 2 workers (gloo, summed gradients) == 1 process."""
    import ray

    from rayunlearn.train import finetune

    kw = dict(max_steps=2, micro_batch_size=2)
    one = finetune(ft_cfg(data_dir, tmp_path / "one", "target", base_dir, **kw))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        two = finetune(ft_cfg(data_dir, tmp_path / "two", "target", base_dir, num_workers=2, **kw))
    finally:
        if started:
            ray.shutdown()
    # the loss and the gradient norm are all-reduced sums over the workers: a worker reading
    # the whole batch would double the loss, averaged (DDP-style) gradients would halve the norm.
    # Tolerances: forward.label_logps computes log-softmax in float32 and Ray workers run
    # single-threaded, so float32 rounding differs (~1e-7 relative); Adam's first steps turn
    # that into ~1e-6 absolute on parameters whose gradients are tiny.
    r1 = [r for r in read_jsonl(one / "log.jsonl") if "loss" in r]
    r2 = [r for r in read_jsonl(two / "log.jsonl") if "loss" in r]
    assert len(r1) == len(r2) == 2
    for a, b in zip(r1, r2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    w1, w2, w0 = weights(one), weights(two), weights(base_dir)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=2e-5), k
    assert max(float((w1[k] - w0[k]).abs().max()) for k in w1) > 3e-3     # the steps moved weights


def _spoil(path, how):
    """Truncate a file to half its length, or overwrite it with bytes that are not its format."""
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"\x00garbage, not a checkpoint file\xff" * 4)


@pytest.mark.parametrize("name,how", [("model.safetensors", "truncate"), ("optimizer.safetensors", "garbage"),
                                      ("trainer.json", "garbage")])
def test_latest_checkpoint_skips_an_unreadable_one(name, how, tmp_path):
    from safetensors.torch import save_file

    from rayunlearn.io import write_json
    from rayunlearn.models.checkpoints import latest_checkpoint

    run = tmp_path / "run"
    for k in (1, 2):
        ckpt = run / "checkpoints" / f"step-{k}"
        ckpt.mkdir(parents=True)
        save_file({"w": torch.full((64,), float(k))}, str(ckpt / "model.safetensors"))
        save_file({"rng.torch": torch.zeros(8, dtype=torch.uint8)}, str(ckpt / "optimizer.safetensors"))
        write_json(ckpt / "trainer.json", {"step": k, "optimizer_format": "index", "param_groups": []})
    assert latest_checkpoint(run).name == "step-2"
    _spoil(run / "checkpoints" / "step-2" / name, how)
    warnings = []
    assert latest_checkpoint(run, warn=warnings.append).name == "step-1"
    assert len(warnings) == 1 and "step-2 is unreadable" in warnings[0] and name in warnings[0]
    assert "previous one (step-1)" in warnings[0]
    _spoil(run / "checkpoints" / "step-1" / name, how)
    warnings = []
    assert latest_checkpoint(run, warn=warnings.append) is None
    assert len(warnings) == 2 and "starting from the beginning" in warnings[1]


@pytest.mark.parametrize("spoiled", ["latest", "all"])
def test_resume_falls_back_past_a_corrupt_checkpoint(spoiled, data_dir, base_dir, tmp_path, monkeypatch, capsys):
    """A truncated model.safetensors in the latest checkpoint: the rerun resumes from the one
    before it (or, with every checkpoint spoiled, from the start) and ends with the weights and
    log of an uninterrupted run."""
    import rayunlearn.train as T
    from rayunlearn.train.progress import Bar

    kw = dict(max_steps=4, checkpoint_every=1, micro_batch_size=4)
    full = T.finetune(ft_cfg(data_dir, tmp_path / "full", "target", base_dir, **kw))
    real_advance = Bar.advance
    calls = {"n": 0}

    def interrupt(self, loss):
        calls["n"] += 1
        if calls["n"] == 4:                      # during step 4: checkpoints 1..3 are written
            raise KeyboardInterrupt
        real_advance(self, loss)

    monkeypatch.setattr(Bar, "advance", interrupt)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        T.finetune(ft_cfg(data_dir, cut, "target", base_dir, **kw))
    monkeypatch.setattr(Bar, "advance", real_advance)
    for k in ((3,) if spoiled == "latest" else (1, 2, 3)):
        _spoil(cut / "checkpoints" / f"step-{k}" / "model.safetensors", "truncate")
    capsys.readouterr()
    T.finetune(ft_cfg(data_dir, cut, "target", base_dir, **kw))
    out = capsys.readouterr().out
    assert "checkpoint" in out and "step-3 is unreadable (model.safetensors:" in out
    if spoiled == "latest":
        assert "resuming" in out and "from step-2 (2/4 steps)" in out
    else:
        assert "resuming" not in out and "starting from the beginning" in out
    wf, wc = weights(full), weights(cut)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    assert [r["step"] for r in read_jsonl(cut / "log.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert load_file(cut / "checkpoints" / "step-3" / "model.safetensors")    # rewritten, readable
    assert read_json(cut / "status.json")["status"] == "completed"


def test_truncated_log_is_strict_json(tmp_path):
    """Records kept on resume are rewritten as strict JSON (an old bare Infinity becomes null)."""
    import json

    from rayunlearn.train.loop import _truncate_jsonl

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": Infinity, "grad_norm": 2.5}\n{"step": 2, "loss": NaN}\n{"step": 3}\n')
    _truncate_jsonl(log, 2)

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    rows = [json.loads(line, parse_constant=refuse) for line in log.read_text().splitlines()]
    assert rows == [{"step": 1, "loss": None, "grad_norm": 2.5}, {"step": 2, "loss": None}]


def test_progress_bar_shows_the_last_logged_loss_not_nan():
    from rayunlearn.train.progress import loss_text, progress_bar

    assert loss_text(None) == "—" and loss_text(0.123456) == "0.1235"
    bar = progress_bar(True, "finetune x", total=4, done=4, last_loss=1.5)
    assert bar.progress.tasks[0].fields["loss"] == "1.5000"
    bar = progress_bar(True, "finetune x", total=4, done=0)
    assert bar.progress.tasks[0].fields["loss"] == "—"
    bar.advance(2.0)
    assert bar.progress.tasks[0].fields["loss"] == "2.0000"
