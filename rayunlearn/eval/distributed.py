"""Evaluation split across `torch.distributed` ranks, with results identical to one process.

`Evaluator` / `evaluate_model` use this automatically when `torch.distributed` is initialised
with a world size W > 1 (``distributed=False`` turns it off; then only the calling rank works).
Every rank must then call the evaluation (collectively, with the same benchmark, tokenizer and
settings); every rank returns the full, identical result (rank 0 usually writes it).

How the work is split
---------------------
1. Every rank derives the *same* batch schedule as the single-process code (scoring:
   `probe.plan_packs`, the probes sharing a prompt packed into one row, rows sorted by
   decreasing length, cut into batches of about ``batch_size`` probes / ``max_tokens`` padded
   tokens; generation: `probe.plan_batches`, prompts sorted by decreasing length, cut into
   batches of ``batch_size`` rows).
2. The schedule's batches are dealt round-robin: rank r runs batches r, r+W, r+2W, ... (the
   longest batches come first, so the ranks' loads differ by at most one batch).  Because each
   batch holds exactly the rows it holds in one process, with the same padding, each rank
   computes exactly the numbers one process would compute for those rows.
3. The per-item results (answer-token log-probs, argmax flags, vocabulary mean/std per
   sequence; generated token ids per prompt) are gathered to every rank with one
   `all_gather_object` of plain (index, numpy arrays / lists) pairs per phase — small values,
   never model weights or gradients — and put back in the original item order.
4. The raw per-item arrays and the metrics are computed from the full gathered lists on every
   rank, with the single-process code.

Sharded models (FSDP)
---------------------
With FSDP (FSDP2 ``fully_shard``; auto-detected from DTensor parameters / `FSDPModule`s, or
forced with ``sharded=True``, e.g. for DeepSpeed ZeRO-3) every forward is a collective: all
ranks must run the same number of forwards.  Therefore

* scoring runs ``ceil(num_batches / W)`` rounds on every rank; a rank with no batch left in a
  round runs a *dummy* forward on one short sequence and discards its result;
* generation runs ``ceil(num_prompt_batches / W)`` `generate` calls on every rank (a one-prompt
  dummy call where a rank has no batch left) with ``synced_gpus=True``, so every rank keeps
  stepping the model until all ranks' sequences are finished (equal-length decoding loops);
* the head-split scoring (decoder + output head on answer positions only) runs inside the FSDP
  root's call so the root's parameters are all-gathered (`probe.answer_logits`).

Before any forward, the ranks compare a digest of their inputs (one small `all_gather_object`)
and refuse to go on if they differ, instead of hanging in a collective.  FSDP1
(`FullyShardedDataParallel`) is not supported: wrap with FSDP2 ``fully_shard``.

With NCCL, `all_gather_object` uses the current CUDA device: set it to the rank's GPU
(`torch.cuda.set_device`; Ray Train does this).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Optional, Sequence

from rayunlearn import UserError
from rayunlearn.eval.probe import MAX_TOKENS


class DistributedEvalError(UserError):
    """The ranks of a distributed evaluation disagree about their inputs or settings."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) of `group` (default group), or (0, 1) without `torch.distributed`."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def use_distributed(flag: Optional[bool] = None, group=None) -> bool:
    """Whether to split the evaluation: `flag` if given (True needs an initialised process group),
    else automatically when `torch.distributed` is initialised with world size > 1."""
    if flag is None:
        return rank_world(group)[1] > 1
    if flag and _dist() is None:
        raise UserError("distributed evaluation was requested but torch.distributed is not initialised; "
                        "call torch.distributed.init_process_group first or pass distributed=None/False")
    return bool(flag)


def is_sharded(model) -> bool:
    """Whether the model's forward is a collective (FSDP2 `fully_shard` / DTensor parameters).
    Raises for FSDP1, which this evaluation does not support."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    mods = list(model.modules()) if hasattr(model, "modules") else []
    if any(isinstance(m, FullyShardedDataParallel) for m in mods):
        raise UserError("distributed evaluation supports FSDP2 (torch.distributed.fsdp.fully_shard), not "
                        "FullyShardedDataParallel (FSDP1); wrap the model with fully_shard")
    if any(isinstance(m, FSDPModule) for m in mods):
        return True
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def shard_batches(plan: Sequence[Sequence[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's batches of a batch schedule: round-robin, batches rank, rank+W, rank+2W, ..."""
    return [list(b) for b in plan[rank::world]]


def num_rounds(plan: Sequence, world: int) -> int:
    """Forwards every rank runs (the largest per-rank batch count): ceil(len(plan) / W)."""
    return math.ceil(len(plan) / world) if plan else 0


def local_items(plan: Sequence[Sequence[int]], rank: int, world: int) -> int:
    """How many items this rank processes (for progress bars)."""
    return sum(len(b) for b in shard_batches(plan, rank, world))


def _digest(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def check_same(tag: str, value: Any, group=None) -> None:
    """All ranks must pass the same `value` (compared by digest); otherwise every rank raises
    `DistributedEvalError` naming the ranks that differ from rank 0."""
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return
    d = _digest(value)
    got: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, d, group=group)
    bad = [r for r, x in enumerate(got) if x != got[0]]
    if bad:
        raise DistributedEvalError(
            f"distributed evaluation: ranks {bad} have other {tag} than rank 0; every rank must evaluate the "
            f"same benchmark split with the same tokenizer and eval settings")


def gather_items(local: list[tuple[int, Any]], n: int, group=None) -> list:
    """Every rank's (index, value) pairs gathered to every rank and put in index order: a list
    of `n` values (each index must come from exactly one rank)."""
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        parts = [local]
    else:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
    out: list = [None] * n
    seen = [False] * n
    for part in parts:
        for i, v in part:
            if seen[i]:
                raise DistributedEvalError(f"distributed evaluation: item {i} was computed by two ranks")
            out[i], seen[i] = v, True
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise DistributedEvalError(f"distributed evaluation: items {missing[:10]} were computed by no rank")
    return out


def score_probes_distributed(model, probes, pad_id: int, batch_size: int = 32, max_tokens: Optional[int] = MAX_TOKENS,
                             head_split: bool = True, on_batch: Optional[Callable[[int], None]] = None,
                             sharded: Optional[bool] = None, group=None) -> list:
    """`probe.score_probes` split across ranks (module docstring): the same `SeqScore` list, in
    input order, on every rank.  Sharded models run a dummy forward on ranks with fewer batches."""
    from rayunlearn.eval.probe import packs_supported, plan_packs, score_pack_batch

    rank, world = rank_world(group)
    sharded = is_sharded(model) if sharded is None else bool(sharded)
    share = packs_supported(model)
    packs, plan = plan_packs(probes, batch_size, max_tokens, share_prompts=share)
    check_same("probes", ([(p.input_ids, p.labels, p.extras) for p in probes], batch_size, max_tokens,
                          head_split, sharded, share), group)
    mine = shard_batches(plan, rank, world)
    rounds = num_rounds(plan, world) if sharded else len(mine)
    local: list[tuple[int, Any]] = []
    for k in range(rounds):
        if k < len(mine):
            scored = score_pack_batch(model, probes, packs, mine[k], pad_id, head_split=head_split)
            local.extend(scored)
            if on_batch is not None:
                on_batch(len(scored))
        else:   # FSDP: keep the number of (collective) forwards equal on every rank
            score_pack_batch(model, probes, packs, [plan[-1][-1]], pad_id, head_split=head_split)
    return gather_items(local, len(probes), group)


def generate_greedy_distributed(model, prompts, pad_id: int, eos_id: int, max_new_tokens: int = 48,
                                batch_size: int = 32, on_batch: Optional[Callable[[int], None]] = None,
                                sharded: Optional[bool] = None, group=None) -> list:
    """`probe.generate_greedy` split across ranks (module docstring): the same token lists, in
    prompt order, on every rank.  Sharded models: equal `generate` call counts (one-prompt dummy
    calls) and ``synced_gpus=True`` inside each call."""
    from rayunlearn.eval.probe import generate_batch, plan_batches

    rank, world = rank_world(group)
    sharded = is_sharded(model) if sharded is None else bool(sharded)
    plan = plan_batches([len(p) for p in prompts], batch_size, None)
    check_same("generation prompts", ([list(p) for p in prompts], batch_size, max_new_tokens, pad_id, eos_id,
                                      sharded), group)
    mine = shard_batches(plan, rank, world)
    rounds = num_rounds(plan, world) if sharded else len(mine)
    synced = True if sharded else None
    local: list[tuple[int, Any]] = []
    for k in range(rounds):
        if k < len(mine):
            chunk = mine[k]
            local.extend(zip(chunk, generate_batch(model, prompts, chunk, pad_id, eos_id, max_new_tokens,
                                                   synced_gpus=synced)))
            if on_batch is not None:
                on_batch(len(chunk))
        else:   # FSDP: same number of generate calls on every rank
            generate_batch(model, prompts, [plan[-1][-1]], pad_id, eos_id, max_new_tokens, synced_gpus=synced)
    return gather_items(local, len(prompts), group)
