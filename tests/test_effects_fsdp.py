"""Two CPU processes (gloo) with FSDP2-sharded parameters give the single-process G-effects:
per-shard partial dot products, one all-reduce of scalars, no gather."""

import json
import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import perturbed_copy
from test_effects_support import effects_llama, forget_retain_batches

METHOD = "npo+kl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rayunlearn.effects import gradient_effects

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = effects_llama(layers=2, kv_heads=2, seed=0)
        ref = perturbed_copy(model)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, reshard_after_forward=False)
        model.set_reshard_after_backward(False)     # several VJPs from one graph
        assert any(type(p).__name__ == "DTensor" for p in model.parameters())
        forget, retain = forget_retain_batches()     # every rank: the same batch (grads are averaged)
        res = gradient_effects(model, METHOD, forget, retain, reference=ref, per_instance=False)
        model.reshard()
        out = {k: {"total": getattr(res, k).total, "by_parameter": getattr(res, k).by_parameter,
                   "by_term": getattr(res, k).by_term, "cosine": getattr(res, k).cosine}
               for k in ("removal", "retention")}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    from rayunlearn.effects import gradient_effects

    model = effects_llama(layers=2, kv_heads=2, seed=0)
    ref = perturbed_copy(model)
    forget, retain = forget_retain_batches()
    single = gradient_effects(model, METHOD, forget, retain, reference=ref, per_instance=False)

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for risk in ("removal", "retention"):
            eff = getattr(single, risk)
            g = got[risk]
            assert g["total"] == pytest.approx(eff.total, rel=1e-9)
            assert g["cosine"] == pytest.approx(eff.cosine, rel=1e-9)
            for lab, v in eff.by_term.items():
                assert g["by_term"][lab] == pytest.approx(v, rel=1e-9, abs=1e-14)
            assert set(g["by_parameter"]) == set(eff.by_parameter)
            for name, v in eff.by_parameter.items():
                assert g["by_parameter"][name] == pytest.approx(v, rel=1e-8, abs=1e-12 * abs(eff.total)), name
