"""Sharding strategies for one run, the library calls behind ``parallel.py``: DDP, FSDP2
(`fully_shard`) and DeepSpeed ZeRO-3, each used through its library, never re-implemented.

All three average gradients over ranks.  Our losses are normalised by the *global* token
count of the effective batch (batch-size invariance), so each rank's loss is its share of one
sum and the exact gradient is the SUM over ranks: `loss_scale()` gives the factor to multiply
the loss by before backward (the world size) so that the averaged gradient equals that sum.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Strategy = Literal["ddp", "fsdp", "deepspeed"]


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def loss_scale(strategy: Strategy) -> float:
    """Multiply the globally normalised loss by this before backward (gradients get averaged)."""
    _, size = world()
    return float(size)


def shard_model(model: torch.nn.Module, strategy: Strategy, device: torch.device | None = None,
                mixed_bf16: bool = False, find_unused_parameters: bool = False):
    """Wrap `model` for data-parallel training under `strategy` in the current process group.

    ``ddp``: returns a ``DistributedDataParallel`` wrapper (the bare module stays usable as
    ``.module``; forwards that must synchronise gradients go through the wrapper).  ``fsdp``:
    ``fully_shard`` on every decoder block and on the root, in place (returns `model`, whose
    parameters are now DTensors).  DeepSpeed is prepared separately (`deepspeed_engine`)
    because it owns the optimiser."""
    rank, size = world()
    if strategy == "ddp":
        if size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if mixed_bf16:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in decoder_blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if strategy == "deepspeed":
        raise ValueError("DeepSpeed wraps model and optimiser together: use deepspeed_engine()")
    raise ValueError(f"unknown strategy {strategy!r}; valid: ddp, fsdp, deepspeed")


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `model` (or a submodule) was sharded with FSDP2 ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def fsdp_keep_unsharded(model: torch.nn.Module):
    """Keep FSDP2 parameters unsharded across several forwards / backwards of one graph (what
    the G-effect engine needs: it takes several vector-Jacobian products from one forward), then
    restore resharding and free the unsharded parameters.  A no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
    try:
        yield model
    finally:
        for m in mods:
            m.set_reshard_after_forward(True, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
        for m in mods:
            m.reshard()


def full_state_dict(model: torch.nn.Module) -> dict:
    """The full (unsharded) model state dict on CPU on rank 0 ({} on other ranks) of an FSDP2 /
    DDP / plain model.  A collective under a process group: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: torch.nn.Module, optimizer) -> dict:
    """The full optimiser state dict (keyed by parameter FQN) on CPU on rank 0; collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a full FQN-keyed optimiser state dict (every rank passes the same dict) into the
    optimiser of a sharded model: each rank keeps its own shard.  Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a HF causal LM (the FSDP wrapping unit)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                 "base_model.model.model.layers"):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return list(node)
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} to shard")


def deepspeed_config(micro_batch_size: int, grad_accum: int, world_size: int, lr: float, bf16: bool = True,
                     zero_stage: int = 3, weight_decay: float = 0.0, offload: bool = False) -> dict:
    """A DeepSpeed config for one unlearning run (AdamW, no scheduler: ours drives the lr)."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        # torch_adam: torch's AdamW (no JIT-compiled fused kernel needed at start-up)
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True,
                                                    "betas": [0.9, 0.999], "eps": 1e-8}},
        "zero_optimization": {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": bool(bf16)},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    return cfg


def validate_deepspeed_config(cfg: dict) -> None:
    """Check a config with DeepSpeed's own pydantic model when deepspeed is importable."""
    from deepspeed.runtime.config import DeepSpeedConfig  # noqa: F401  (import checks the install)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    DeepSpeedZeroConfig(**cfg["zero_optimization"])


def deepspeed_engine(model: torch.nn.Module, ds_config: dict):
    """``deepspeed.initialize`` for `model` (trainable parameters only) -> (engine, optimizer).
    Initialises DeepSpeed's process group when none exists (single-process ZeRO / offload)."""
    import deepspeed

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        deepspeed.init_distributed()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine, optimizer
