"""Evaluation split across 2 CPU processes (gloo) returns the single-process result on every
rank — with a replicated model and with an FSDP2-sharded one (per decoder layer + root) — and
the sharding helpers deal batches round-robin and gather them back in order."""

import os
import pickle
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rayunlearn import UserError
from rayunlearn.config import EvalConfig
from rayunlearn.eval import distributed as D
from rayunlearn.eval.evaluate import Evaluator, evaluate_model
from rayunlearn.eval.probe import MAX_TOKENS, generate_batch, plan_batches
from conftest import data_config, tiny_setup

# 7 items per split -> forget 2, retain 7, real 3, world 3, holdout 2 items; 71 scored sequences
# and 15 prompts -> 15 and 3 batches of <= 5: odd counts, so the two ranks get uneven shares.
ECFG = dict(max_new_tokens=6, batch_size=5, max_items=7)
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, reference):
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    out = {}
    try:
        torch.set_num_threads(1)
        model, tok, bench = tiny_setup(seed=0)
        ecfg = EvalConfig(**ECFG)
        out["plain"] = evaluate_model(model, tok, bench, data_config(), ecfg, retain_reference=reference)
        # ranks with different inputs refuse (on every rank) instead of hanging
        try:
            D.check_same("probes", rank)
        except D.DistributedEvalError as exc:
            out["mismatch"] = str(exc)
        # FSDP2: per decoder layer + root, parameters resharded after every forward
        fmodel = tiny_setup(seed=0)[0]
        mesh = init_device_mesh("cpu", (world,))
        for layer in fmodel.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(fmodel, mesh=mesh)
        out["fsdp_dtensor"] = all(type(p).__name__ == "DTensor" for p in fmodel.parameters())
        out["fsdp_sharded"] = D.is_sharded(fmodel)
        ev = Evaluator(tok, bench, data_config(), ecfg, retain_reference=reference)
        out["fsdp"] = ev(fmodel, step=3)
        # uneven decoding lengths under FSDP: rank 0 stops after one token (its EOS is the first
        # greedy token), rank 1 decodes all 6; synced_gpus keeps the collective forwards aligned
        pad, eos = ev.encoder.pad_id, ev.encoder.eos_id
        full = generate_batch(model, ev.prompts, [0], pad, eos, 6)[0]
        stop = full[0] if rank == 0 else eos
        out["uneven"] = (full, generate_batch(fmodel, ev.prompts, [0], pad, stop, 6, synced_gpus=True)[0])
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(out, fh)
    finally:
        dist.destroy_process_group()


def assert_same(a, b, path="", tol=1e-6):
    """Recursive equality: floats to `tol` absolute, everything else exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}", tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", tol)
    elif isinstance(a, float) and not isinstance(b, bool):
        assert isinstance(b, float), f"{path}: {a!r} vs {b!r}"
        assert b == pytest.approx(a, abs=tol, rel=0, nan_ok=True), f"{path}: {a!r} vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def _max_float_diff(a, b) -> float:
    if isinstance(a, dict):
        return max([_max_float_diff(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        return max([_max_float_diff(x, y) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, float):
        return abs(a - b) if np.isfinite(a) else 0.0
    return 0.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("dist_eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # the workers' setting: same CPU kernels
    try:
        model, tok, bench = tiny_setup(seed=0)
        reference = evaluate_model(tiny_setup(seed=1)[0], tok, bench, data_config(), EvalConfig(**ECFG))
        single = evaluate_model(model, tok, bench, data_config(), EvalConfig(**ECFG), retain_reference=reference)
        ev = Evaluator(tok, bench, data_config(), EvalConfig(**ECFG))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out_dir), reference), nprocs=WORLD, join=True)
    ranks = [pickle.loads((out_dir / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    return single, ranks, ev


def test_shards_are_uneven(runs):
    _, _, ev = runs
    score_plan = plan_batches([len(p.input_ids) for p in ev.probes], 5, MAX_TOKENS)
    gen_plan = plan_batches([len(p) for p in ev.prompts], 5)
    assert len(ev.probes) == 71 and len(ev.prompts) == 15
    assert (len(score_plan), len(gen_plan)) == (15, 3)          # rank 0: 8 and 2 batches, rank 1: 7 and 1
    assert [len(D.shard_batches(score_plan, r, WORLD)) for r in range(WORLD)] == [8, 7]
    assert [D.local_items(score_plan, r, WORLD) for r in range(WORLD)] == [36, 35]     # 7 full + the 1-item last batch


def test_two_processes_equal_single_process(runs):
    single, ranks, _ = runs
    assert single["removal_kind"] == "tr_closeness" and single["mia"]["privleak"] is not None
    assert "generated" in single["raw"]["forget"]
    for r, got in enumerate(ranks):
        res = got["plain"]
        assert_same(single, res, f"rank{r}")                  # every metric and every raw per-item array
        assert res["raw"]["retain"]["generated"] == single["raw"]["retain"]["generated"]
        assert _max_float_diff(single, res) == 0.0            # same batches, same kernels: bit-identical
    assert ranks[0]["plain"]["raw"] == ranks[1]["plain"]["raw"]


def test_fsdp2_sharded_model_equals_single_process(runs):
    single, ranks, _ = runs
    for r, got in enumerate(ranks):
        assert got["fsdp_dtensor"] and got["fsdp_sharded"]
        res = got["fsdp"]
        assert res["step"] == 3
        assert_same({k: v for k, v in single.items() if k != "step"},
                    {k: v for k, v in res.items() if k != "step"}, f"fsdp rank{r}")
        assert res["raw"]["world_facts"]["generated"] == single["raw"]["world_facts"]["generated"]


def test_rank_mismatch_is_refused_on_every_rank(runs):
    _, ranks, _ = runs
    for got in ranks:
        assert "ranks [1] have other probes than rank 0" in got["mismatch"]


def test_helpers_without_process_group():
    plan = [[4, 0], [3, 1], [2], [5]]
    assert D.shard_batches(plan, 0, 3) == [[4, 0], [5]] and D.shard_batches(plan, 2, 3) == [[2]]
    assert D.num_rounds(plan, 3) == 2 and D.num_rounds(plan, 5) == 1 and D.num_rounds([], 2) == 0
    assert D.rank_world() == (0, 1) and D.use_distributed(None) is False and D.use_distributed(False) is False
    with pytest.raises(UserError, match="not initialised"):
        D.use_distributed(True)
    assert D.gather_items([(1, "b"), (0, "a")], 2) == ["a", "b"]
    with pytest.raises(D.DistributedEvalError, match=r"items \[2\]"):
        D.gather_items([(1, "b"), (0, "a")], 3)
    model = tiny_setup(seed=0)[0]
    assert D.is_sharded(model) is False


def test_fsdp2_generation_with_uneven_lengths_stays_in_step(runs):
    _, ranks, _ = runs
    full, got0 = ranks[0]["uneven"]
    assert len(full) == 6 and full[0] != 1       # no EOS from the random model within 6 tokens
    assert got0 == []                            # rank 0 hit its EOS at once ...
    assert ranks[1]["uneven"] == (full, full)    # ... while rank 1 decoded its 6 tokens
