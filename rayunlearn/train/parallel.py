"""Data parallelism for one run: what differs between ``train.strategy`` ddp, fsdp and deepspeed.

:class:`Parallel` wraps a task's model for the strategy and owns the optimiser. The libraries
(``strategies.py``) all **average** gradients over the W ranks while our losses are shares of one
globally normalised sum, so ``backward`` multiplies each rank's loss by W (``strategies.
loss_scale``; exact in floating point for powers of two): average of W·(share of the sum) = the
sum.

- ``ddp``: torch ``DistributedDataParallel`` (parameters broadcast from rank 0 at wrap time);
  ``no_sync()`` on every micro-batch but the last.
- ``fsdp``: FSDP2 ``fully_shard`` on every decoder block and the root;
  ``set_requires_gradient_sync(False)`` on every micro-batch but the last; AdamW on the shards.
  ``train.shard_reference`` shards the frozen reference as well (memory per rank for it: 1/W,
  cost: an all-gather of each block per reference forward); by default it is replicated.
- ``deepspeed``: ``deepspeed.initialize`` with ZeRO-3 (``strategies.deepspeed_config``);
  DeepSpeed owns the optimiser, the accumulation boundary and the clipping.

Checkpoints: under fsdp the full model and optimiser state dicts are gathered on rank 0
(``torch.distributed.checkpoint.state_dict``, CPU offload) and saved in the same files as a
single process's (optimiser state keyed by parameter name); on resume every rank reads them and
keeps its shard. Under deepspeed the engine's own checkpoint goes to
``checkpoints/deepspeed/step-<k>/`` next to a consolidated model. The file formats are
``rayunlearn.models.checkpoints``'.

The wrapper never writes into the task: training forwards go through :attr:`Parallel.
forward_model`, which the loop passes to the task.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Optional

import torch

from rayunlearn.config import TrainConfig
from rayunlearn.models import DTYPES, unwrap
from rayunlearn.models import checkpoints as ckpt_files
from rayunlearn.runs import CHECKPOINTS_DIR, DEEPSPEED_CHECKPOINTS_DIR, checkpoint_dir
from rayunlearn.train import strategies as S


def process_group():
    """``torch.distributed`` when a process group is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    dist = process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def training_device(train: TrainConfig) -> torch.device:
    """Ray Train's device for this worker under a process group, else cuda when asked and
    available, else the CPU."""
    if process_group() is not None:
        try:
            import ray.train.torch

            return ray.train.torch.get_device()
        except Exception:  # a process group, but not under Ray Train
            pass
    if train.use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def sum_over_workers(values: dict[str, float], device) -> dict[str, float]:
    """Each value summed over every worker, in one all-reduce (float64; keys sorted so that every
    rank packs them alike). Without a process group: the values unchanged."""
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist = process_group()
    if dist is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.cpu().tolist()))


def _broadcast_parameters(model) -> None:
    dist = process_group()
    if dist is None:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


class Parallel:
    """The model wrapped for ``train.strategy`` (module docstring) and its optimiser.

    ``micro(last)`` is the context of one micro-batch's forward + backward (gradients are
    synchronised on the last micro-batch only); ``backward`` scales the loss by the world size;
    ``grad_norm`` / ``step``; ``recording()`` the context of a G-effect recording;
    ``eval_model()`` the unsharded model to evaluate on rank 0 (collective under fsdp)."""

    def __init__(self, model, train: TrainConfig, device, rank: int, world: int, *, dtype: str,
                 reference=None, find_unused_parameters: bool = False):
        self.train, self.device, self.rank, self.world = train, device, rank, world
        self.strategy = train.strategy
        self.model = model
        self.dtype = dtype
        self.engine = self.wrapper = None
        self._eval_copy = None
        self.sharded = False
        if self.strategy == "deepspeed":
            n_micro = train.batch_size // (train.micro_batch_size * max(1, world))
            ds_cfg = S.deepspeed_config(train.micro_batch_size, n_micro, max(1, world), train.lr, bf16=train.bf16,
                                        weight_decay=train.weight_decay)
            ds_cfg["gradient_clipping"] = float(train.max_grad_norm or 0.0)
            self.engine, self.optimizer = S.deepspeed_engine(self.model, ds_cfg)
            self.rank, self.world = S.world()
        elif world > 1:
            _broadcast_parameters(self.model)
            if self.strategy == "ddp":
                self.wrapper = S.shard_model(self.model, "ddp", device, find_unused_parameters=find_unused_parameters)
            else:
                S.shard_model(self.model, "fsdp", device)
                self.sharded = True
                if train.shard_reference and reference is not None:
                    S.shard_model(reference, "fsdp", device)
        self.scale = S.loss_scale(self.strategy) if self.world > 1 else 1.0
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.engine is None:
            self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay,
                                               betas=(0.9, 0.999), eps=1e-8)

    @property
    def forward_model(self):
        """What training forwards go through: the DeepSpeed engine / DDP wrapper, else the model."""
        if self.engine is not None:
            return self.engine
        return self.wrapper if self.wrapper is not None else self.model

    def micro(self, last: bool):
        if self.wrapper is not None and not last:
            return self.wrapper.no_sync()
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        scaled = loss * self.scale if self.scale != 1.0 else loss
        if self.engine is not None:
            # our loss is already normalised by the whole effective batch: DeepSpeed must not
            # divide it by the accumulation steps again (older engines: scale_wrt_gas=False;
            # others divide, which we undo). Verify on a GPU: the logged grad_norm equals ddp's.
            if "scale_wrt_gas" in inspect.signature(self.engine.backward).parameters:
                self.engine.backward(scaled, scale_wrt_gas=False)
            else:
                self.engine.backward(scaled * self.engine.gradient_accumulation_steps())
            if not last:
                self.engine.step()        # DeepSpeed counts micro-steps; it updates at the boundary only
        else:
            scaled.backward()

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def zero_grad(self) -> None:
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self, max_norm: Optional[float]) -> float:
        """Clip (when `max_norm`) and return the global gradient norm (NaN under DeepSpeed,
        which clips inside its step: see ``step``)."""
        if self.engine is not None:
            return float("nan")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):           # DTensor (fsdp)
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> Optional[float]:
        """The optimiser step; under DeepSpeed returns its global gradient norm."""
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else None
        self.optimizer.step()
        return None

    def train_mode(self, on: bool = True) -> None:
        self.forward_model.train(on)

    def recording(self):
        """The context of a G-effect recording: FSDP parameters stay unsharded across its
        several forwards and backwards."""
        if self.sharded:
            return S.fsdp_keep_unsharded(self.model)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        dist = process_group()
        if dist is not None:
            dist.barrier()

    def eval_model(self):
        """The model rank 0 evaluates / saves (None on other ranks).  Under fsdp / deepspeed every
        rank must call it: the full weights are gathered into an unsharded copy on rank 0."""
        if self.engine is None and not self.sharded:
            return self.model if self.rank == 0 else None
        if self.engine is not None:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = S.full_state_dict(self.model)
        if self.rank != 0:
            return None
        if self._eval_copy is None:
            from transformers import AutoModelForCausalLM

            self._eval_copy = AutoModelForCausalLM.from_config(
                self.model.config, dtype=DTYPES[self.dtype]).to(self.device)
        self._eval_copy.load_state_dict(sd, strict=False)
        if hasattr(self._eval_copy, "tie_weights"):
            self._eval_copy.tie_weights()
        self._eval_copy.eval()
        return self._eval_copy

    # -- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, run_dir: Path, step: int, tokenizer, trainer_state: dict) -> Path:
        """Write ``checkpoints/step-<step>/`` (``models.checkpoints.write_checkpoint``).  Every
        rank calls it (under fsdp / deepspeed the state is gathered collectively); rank 0 writes."""
        model_sd = opt_sd = None
        fmt = "index"
        if self.engine is not None:
            self.engine.save_checkpoint(str(run_dir / CHECKPOINTS_DIR / DEEPSPEED_CHECKPOINTS_DIR),
                                        tag=checkpoint_dir(run_dir, step).name)
            model_sd, fmt = self.engine._zero3_consolidated_16bit_state_dict(), "deepspeed"
        elif self.sharded:
            model_sd = S.full_state_dict(self.model)
            opt_sd, fmt = S.full_optimizer_state_dict(self.model, self.optimizer), "fqn"
        final = checkpoint_dir(run_dir, step)
        if self.rank == 0:
            if fmt == "index":
                opt_sd = self.optimizer.state_dict()
            final = ckpt_files.write_checkpoint(run_dir, step, unwrap(self.model), tokenizer, trainer_state,
                                                model_state=model_sd, optimizer_state=opt_sd,
                                                optimizer_format=fmt)
        self.barrier()
        return final

    def load_optimizer(self, ckpt: Path) -> dict:
        """Restore the optimiser state (and the RNG) of a checkpoint; returns its trainer state."""
        meta = ckpt_files.read_trainer_state(ckpt)
        if self.engine is not None:
            self.engine.load_checkpoint(str(ckpt.parent / DEEPSPEED_CHECKPOINTS_DIR), tag=ckpt.name,
                                        load_module_strict=False)
            return meta
        saved = ckpt_files.read_optimizer_state(ckpt, meta)
        if meta.get("optimizer_format", "index") == "fqn":
            S.load_full_optimizer_state_dict(self.model, self.optimizer, saved)
        else:
            device = self.params[0].device if self.params else torch.device("cpu")
            for st in saved["state"].values():
                for name in list(st):
                    if name != "step":
                        st[name] = st[name].to(device)
            self.optimizer.load_state_dict(saved)
        return meta
