"""Finetuning and unlearning: one training loop of our own, in-process or per Ray Train worker.

    finetune(cfg: FinetuneConfig) -> Path      base / target / retain model
    unlearn(cfg: UnlearnConfig) -> dict        unlearn data.forget_split from the target model
    unlearn_trial(cfg, report=None) -> dict    the per-trial entry for a Ray Tune sweep

The loop (:func:`run_loop`) reads top to bottom like nanoGPT's: build → wrap for the strategy →
resume → for each optimiser step { take this worker's shard of the effective batch →
micro-batches → token views → loss × world size → backward (accumulate; gradients synchronised
by the strategy on the last micro-batch only) → guard → clip → G-effect recorder (before) →
AdamW step → recorder (after: measured risk change) → log → evaluation / checkpoint every k
steps } → save.

Batches and exactness
- The data order is a function of the seed only: step k of a run uses positions
  ``[k·B, (k+1)·B)`` of a stream made of one seeded permutation of the training (forget) set per
  epoch, B = ``train.batch_size`` (the effective batch over micro-batches *and* workers).  Worker
  r of W takes the r-th contiguous slice of B/W examples and splits it into micro-batches of
  ``train.micro_batch_size``.  So 1 worker and 2 workers see the same effective batches.
- Unlearning pairs each forget example with a retain example drawn (seeded by step) from
  ``retain<NN>``; the retain micro-batch j of a worker pairs with its forget micro-batch j.
- The loss is normalised by the counts of the **whole effective batch**: before any forward,
  the loop computes the effective batch's answer-token count of every view it uses (all workers
  know every index, so each computes the global count itself: the same number an all-reduce
  would give, without a collective) and passes it as ``token_count`` / ``seq_count`` to the
  token view.  Micro-batch losses then add up to the unsplit batch's loss, and so do their
  gradients.
- Across workers the gradients must therefore be **summed**.  Data parallelism is done by the
  libraries (``train.strategy``; :mod:`rayunlearn.strategies`), which all **average** over the
  W ranks, so each rank multiplies its loss by W before backward (``strategies.loss_scale``;
  exact in floating point: W is a power of two in practice, and otherwise one rounding):
  average of W·(share of the sum) = the sum.

  - ``ddp``: torch ``DistributedDataParallel`` (parameters broadcast from rank 0 at wrap time);
    ``no_sync()`` on every micro-batch but the last.
  - ``fsdp``: FSDP2 ``fully_shard`` on every decoder block and the root;
    ``set_requires_gradient_sync(False)`` on every micro-batch but the last; AdamW on the
    shards.  ``train.shard_reference`` shards the frozen reference as well (memory per rank
    for it: 1/W, cost: an all-gather of each block per reference forward); by default it is
    replicated (a full copy per rank, no traffic), and methods that only need reference
    log-probs of the forget/refusal rows never keep it (``RefLogpCache``).
  - ``deepspeed``: ``deepspeed.initialize`` with ZeRO-3 (``strategies.deepspeed_config``);
    DeepSpeed owns the optimiser, the accumulation boundary and the clipping.  Optional extra
    (``pip install deepspeed``); G-effects are not recorded under it (ZeRO-3 partitions are
    not DTensors: use fsdp).
  Ray Train's ``TorchTrainer`` sets up the process group (gloo on CPU, NCCL on GPU) and we use
  its device; ``run_loop`` also runs under any other launcher that initialised one.
- Learning rate: AdamW, linear warm-up over ``warmup_epochs`` then linear decay.  Step s
  (0-based) uses ``lr·(s+1)/W`` for s < W and ``lr·(T−s)/(T−W)`` after (never 0 during the run,
  unlike HF's schedule whose first step has lr 0).  T = ⌊epochs·N⌋ // B steps (TOFU's count:
  forget05, 5 epochs, B=16 → 62).

Files (``rank 0`` writes; the layout of docs/ARCHITECTURE.md):
``config.yaml``, ``log.jsonl`` (per step: step, epoch, lr, loss, grad_norm, term.<label>,
stat.<name>), ``status.json`` (running | complete | diverged), ``checkpoints/step-<k>/``
(``model.safetensors`` + config.json + tokenizer, ``optimizer.safetensors``, ``trainer.json``;
written atomically and all kept), and for unlearning ``trajectory.jsonl`` / ``metrics.json``.
Re-running the same command resumes from the last checkpoint; a different config is refused.
Under ``fsdp`` the full model and optimiser state dicts are gathered on rank 0
(``torch.distributed.checkpoint.state_dict``, CPU offload) and saved in the same files
(optimiser state keyed by parameter name); on resume every rank reads them and keeps its shard.
With LoRA (``model.lora_r > 0``) ``model.safetensors`` holds the *merged* model (a checkpoint
is a usable model directory) and ``adapter.safetensors`` the trainable adapter tensors, which
resume loads back into the peft-wrapped target model.  Under ``deepspeed`` the engine's own
checkpoint goes to ``checkpoints/deepspeed/step-<k>/`` next to a consolidated model.

G-effects (``effects.every > 0``): ``recorder.before_step`` just before ``optimizer.step()``
(G-effects at the weights the step starts from, with that step's lr) and
``recorder.after_step`` just after it (measured probe-risk change of that very step: the
fidelity of −lr·e), and once more at the final weights.  Under ``ddp`` the recorder runs on
rank 0 on the bare module (replicated weights); under ``fsdp`` every rank takes part (collective
forwards; the engine all-reduces its scalar dot products; parameters are kept unsharded during
the recording, ``strategies.fsdp_keep_unsharded``) and rank 0 writes the rows.

A non-finite loss or gradient stops the run before the optimiser step (:class:`DivergedError`),
records ``status.json`` = diverged and keeps every checkpoint written so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rayunlearn import UserError
from rayunlearn.config import (FinetuneConfig, TrainConfig, UnlearnConfig, check_resume_config,
                               from_dict, save_config, to_dict)
from rayunlearn.forward import IGNORE, RefLogpCache, token_view
from rayunlearn.io import append_jsonl, read_json, read_jsonl, save_safetensors, seed_everything, write_json
from rayunlearn.runs import DivergedError  # noqa: F401  (raised here; the sweep recognises its type)

CHECKPOINTS = "checkpoints"


# --------------------------------------------------------------------------------------------
# public API


def finetune(cfg: FinetuneConfig) -> Path:
    """Train the protocol's models and save the result to ``cfg.out`` (safetensors, tokenizer,
    ``config.yaml``, ``log.jsonl``).

    - ``stage="base"``: from nothing (tiny preset: a fresh model and a tokenizer trained on the
      benchmark corpus) on the benchmark's ``world`` split (world knowledge);
    - ``stage="target"``: from ``cfg.init`` (the base model directory) on ``full``;
    - ``stage="retain"``: from ``cfg.init`` on ``retain<NN>`` matching ``data.forget_split``.

    Prints the answer-token accuracy per epoch and at the end (also in the log and in
    ``status.json``).  Same seed → same weights.  Rerunning resumes; a finished run returns at once.
    """
    _check_finetune(cfg)
    run_dir = Path(cfg.out)
    status = _prepare_run_dir(cfg, run_dir)
    if status.get("status") == "complete":
        print(f"{run_dir} is already trained (status.json: complete); nothing to do")
        return run_dir
    _launch("finetune", cfg, run_dir)
    return run_dir


def unlearn(cfg: UnlearnConfig) -> dict:
    """Unlearn ``data.forget_split`` from the target model ``cfg.target`` with ``cfg.method``.

    Writes into :func:`run_dir_of` ``(cfg)`` (``cfg.out``, or ``cfg.out/trials/<trial_id>``):
    config.yaml, log.jsonl, checkpoints, trajectory.jsonl (evaluation every ``eval.every``
    steps), metrics.json (final evaluation).  Runs in-process (``train.num_workers == 1``) or on
    a Ray Train ``TorchTrainer``.  Returns the final metrics dict (with ``removal`` and
    ``retention`` when ``rayunlearn.eval`` is available; otherwise the last log record)."""
    return unlearn_trial(cfg)


def unlearn_trial(cfg: UnlearnConfig, report: Optional[Callable[[dict], None]] = None) -> dict:
    """The per-trial entry for a sweep (call it inside a Ray Tune trainable).

    In-process (``train.num_workers == 1``): ``report(metrics)`` is called after every
    evaluation (``{"step", "removal", "retention", ...}``, ``"done": False``) and once at the
    end (``"done": True``), so Tune schedulers can act on intermediate results.  With
    ``num_workers > 1`` it launches a nested Ray Train ``TorchTrainer`` (the trial must leave
    room for its workers: e.g. ``tune.with_resources(trainable, {"CPU": 0})`` or a placement
    group with one bundle per worker) and ``report`` is called once, at the end.
    Returns the final metrics dict.  A diverged run raises :class:`DivergedError`."""
    _check_unlearn(cfg)
    run_dir = run_dir_of(cfg)
    status = _prepare_run_dir(cfg, run_dir)
    if status.get("status") == "complete" and (run_dir / "metrics.json").exists():
        metrics = read_json(run_dir / "metrics.json")
        if report is not None:
            report({**_scalars(metrics), "done": True})
        return metrics
    result = _launch("unlearn", cfg, run_dir, report=report)
    if report is not None and cfg.train.num_workers > 1:
        report({**_scalars(result), "done": True})
    return result


def run_dir_of(cfg: UnlearnConfig) -> Path:
    """Where an unlearning run writes: ``cfg.out/trials/<trial_id>`` in a sweep, else ``cfg.out``."""
    return Path(cfg.out) / "trials" / cfg.trial_id if cfg.trial_id else Path(cfg.out)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config = {"kind": "finetune"|"unlearn", "cfg": dict, "run_dir": str}``."""
    cls = FinetuneConfig if config["kind"] == "finetune" else UnlearnConfig
    cfg = from_dict(cls, config["cfg"])
    run_loop(config["kind"], cfg, Path(config["run_dir"]))


# --------------------------------------------------------------------------------------------
# launching


def _launch(kind: str, cfg, run_dir: Path, report=None):
    if cfg.train.num_workers <= 1:
        return run_loop(kind, cfg, run_dir, report=report)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(log_to_driver=True, include_dashboard=False)
    use_gpu = bool(cfg.train.use_gpu)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"kind": kind, "cfg": to_dict(cfg), "run_dir": str(run_dir.resolve())},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{kind}-{run_dir.name}", storage_path=str((run_dir / "ray").resolve())),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface ours with their message
        status = _read_status(run_dir)
        if status.get("status") == "diverged":
            raise DivergedError(status.get("message", "training diverged")) from None
        raise
    if kind == "unlearn":
        if (run_dir / "metrics.json").exists():
            return read_json(run_dir / "metrics.json")
        log = read_jsonl(run_dir / "log.jsonl")
        return log[-1] if log else {}
    return run_dir


def _check_finetune(cfg: FinetuneConfig) -> None:
    if cfg.stage in ("target", "retain") and not cfg.init and cfg.model.name == "tiny":
        raise UserError(f"finetune stage={cfg.stage} starts from the base model: set init=<base model "
                        f"dir> (e.g. init=results/models/base), or model.name=<a pretrained model>")
    _check_common(cfg)


def _check_unlearn(cfg: UnlearnConfig) -> None:
    if not (Path(cfg.target) / "config.json").exists():
        raise UserError(f"target model {cfg.target} not found (no config.json): train it first with "
                        f"`rayunlearn finetune stage=target ...` or set target=<model dir>")
    _check_common(cfg)
    _parse_method(cfg.method)        # fail before starting anything


def _check_common(cfg) -> None:
    strategy = cfg.train.strategy
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("train.strategy=deepspeed needs DeepSpeed, an optional extra: "
                            "pip install deepspeed (on a GPU machine), or use train.strategy=fsdp") from None
        if getattr(getattr(cfg, "effects", None), "every", 0) > 0:
            raise UserError("G-effects (effects.every > 0) are not recorded under train.strategy=deepspeed "
                            "(ZeRO-3 partitions are not DTensors); use train.strategy=fsdp or effects.every=0")
    if strategy != "ddp" and cfg.model.lora_r > 0:
        raise UserError(f"model.lora_r > 0 with train.strategy={strategy} is not supported yet (LoRA "
                        f"checkpoints need the unsharded adapter); use train.strategy=ddp with LoRA")
    if cfg.model.name == "tiny" and cfg.data.max_length > cfg.model.max_position_embeddings:
        raise UserError(f"data.max_length={cfg.data.max_length} exceeds model.max_position_embeddings="
                        f"{cfg.model.max_position_embeddings}; raise the latter or lower the former")


def _prepare_run_dir(cfg, run_dir: Path) -> dict:
    """Refuse a run directory holding another config; save ours; return the saved status."""
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resume_config(cfg, run_dir / "config.yaml")
    save_config(cfg, run_dir / "config.yaml")
    return _read_status(run_dir)


def _read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / "status.json"
    try:
        return read_json(path) if path.exists() else {}
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------
# distributed helpers


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def _device(train: TrainConfig) -> torch.device:
    if _dist() is not None:
        try:
            import ray.train.torch

            return ray.train.torch.get_device()
        except Exception:  # not under Ray Train
            pass
    if train.use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast_parameters(model) -> None:
    dist = _dist()
    if dist is None:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


# --------------------------------------------------------------------------------------------
# data


def _load_benchmark(data_cfg):
    from rayunlearn.data import load_benchmark

    return load_benchmark(data_cfg)


def _benchmark_corpus(benchmark) -> list[str]:
    from rayunlearn.data import benchmark_corpus

    return benchmark_corpus(benchmark)


def _retain_split(forget_split: str) -> str:
    return "retain" + str(100 - int(forget_split[len("forget"):])).zfill(2)


def encode_records(records: list[dict], tokenizer, data_cfg) -> list[dict]:
    """Encode QA records with the data package's formatting (template, max_length); each
    example gets ``row_id`` = its index in `records`."""
    from rayunlearn.data.formatting import QADataset

    ds = QADataset(records, tokenizer, data_cfg.template, data_cfg.max_length)
    return [ds[i] for i in range(len(ds))]


def collate_examples(examples: list[dict], pad_id: int) -> dict:
    from rayunlearn.data.formatting import collate

    return collate(examples, pad_id)


def refusal_records(records: list[dict], refusals: list[str], seed: int) -> list[dict]:
    """The forget questions with a refusal answer each (``formatting.pick_refusal``: row i's
    refusal is fixed by (seed, i), so reference log-probs of the refusal view can be cached)."""
    from rayunlearn.data.formatting import pick_refusal

    return [{"question": rec["question"], "answer": pick_refusal(refusals, i, seed)}
            for i, rec in enumerate(records)]


def _answer_tokens(example: dict) -> int:
    """Answer tokens the token view scores for this example (shifted labels != IGNORE)."""
    labels = torch.as_tensor(example["labels"])
    return int((labels[1:] != IGNORE).sum())


class Schedule:
    """Which examples each optimiser step uses: a function of (seed, step) only."""

    def __init__(self, n: int, train: TrainConfig, n_paired: int = 0):
        self.n, self.B, self.seed = n, train.batch_size, train.seed
        self.n_paired = n_paired
        self.total_steps = train.max_steps or max(1, int(train.epochs * n) // self.B)
        self.warmup_steps = min(int(round(train.warmup_epochs * n / self.B)), self.total_steps)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        """The effective batch of step `step`: B indices into the training (forget) set."""
        out = []
        for pos in range(step * self.B, (step + 1) * self.B):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out

    def paired(self, step: int) -> list[int]:
        """B retain indices paired with step `step`'s examples (random, seeded by step)."""
        gen = torch.Generator().manual_seed(self.seed * 7_919 + 1_000_003 + step)
        if self.n_paired >= self.B:
            return torch.randperm(self.n_paired, generator=gen)[: self.B].tolist()
        return torch.randint(self.n_paired, (self.B,), generator=gen).tolist()

    def epoch(self, step_done: int) -> float:
        """Epochs completed after `step_done` optimiser steps."""
        return step_done * self.B / self.n

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at (0-based) optimiser step `step`."""
        W, T = self.warmup_steps, self.total_steps
        if step < W:
            return (step + 1) / W
        return max(0.0, (T - step) / max(1, T - W))


def _shard(items: list, rank: int, world: int, micro: int) -> list[list]:
    """This worker's contiguous slice of the effective batch, cut into micro-batches."""
    per = len(items) // world
    mine = items[rank * per:(rank + 1) * per]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def _to_device(batch: dict, device) -> dict:
    return {k: (_to_device(v, device) if isinstance(v, dict) else v.to(device)) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# tasks: what differs between finetuning and unlearning


class _Task:
    """Builds the model and data for a run and computes one micro-batch's loss."""

    kind = ""
    log_every_epoch = False

    def __init__(self, cfg, run_dir: Path, device):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.train: TrainConfig = cfg.train
        self.correct, self.total = 0.0, 0.0     # answer-token accuracy since the last epoch end
        self._forward_model = None

    @property
    def forward_model(self):
        """What training forwards go through: the DDP wrapper / DeepSpeed engine, else the model."""
        return self._forward_model if self._forward_model is not None else self.model

    @forward_model.setter
    def forward_model(self, m) -> None:
        self._forward_model = m

    # set by build(): model, tokenizer, examples (training/forget set), schedule
    def effective_batch(self, step: int) -> dict[str, list[dict]]:
        raise NotImplementedError

    def micro_loss(self, micro: dict[str, dict], counts: dict[str, tuple[float, float]]):
        """-> (loss tensor, {term label: float}, {stat name: float}, extra dict)"""
        raise NotImplementedError


class _FinetuneTask(_Task):
    kind = "finetune"
    log_every_epoch = True

    def build(self) -> None:
        from rayunlearn.models import load_model

        cfg: FinetuneConfig = self.cfg
        self.benchmark = _load_benchmark(cfg.data)
        split = {"base": "world", "target": "full", "retain": _retain_split(cfg.data.forget_split)}[cfg.stage]
        records = self.benchmark.split(split)
        if cfg.replay_world and cfg.stage != "base" and self.benchmark.has("world"):
            records = list(records) + list(self.benchmark.split("world"))
        corpus = None
        if not cfg.init and cfg.model.name == "tiny":
            corpus = _benchmark_corpus(self.benchmark)
        self.model, self.tokenizer = load_model(cfg.model, path=cfg.init or None, corpus=corpus)
        self.examples = encode_records(records, self.tokenizer, cfg.data)
        self.schedule = Schedule(len(self.examples), self.train)
        self.split = split

    def effective_batch(self, step: int) -> dict[str, list[dict]]:
        return {"train": [self.examples[i] for i in self.schedule.indices(step)]}

    def micro_loss(self, micro, counts):
        tok, seq = counts["train"]
        view = token_view(self.forward_model, micro["train"], needs=frozenset({"logits"}), token_count=tok,
                          seq_count=seq)
        loss = -(view.logps * view.mask).sum() / view.token_count       # token-mean NLL
        with torch.no_grad():
            hit = (view.logits.argmax(-1) == view.labels) & view.mask
        return loss, {}, {}, {"correct": float(hit.sum()), "answer_tokens": float(view.mask.sum())}


class _UnlearnTask(_Task):
    kind = "unlearn"

    def build(self) -> None:
        from rayunlearn.models import load_model, without_lora
        from rayunlearn.objectives import ObjectiveContext

        cfg: UnlearnConfig = self.cfg
        self.method = _parse_method(cfg.method)
        self.benchmark = _load_benchmark(cfg.data)
        self.model, self.tokenizer = load_model(cfg.model, path=cfg.target)
        forget_records = self.benchmark.split(cfg.data.forget_split)
        retain_records = self.benchmark.split(_retain_split(cfg.data.forget_split))
        self.needs = {v: frozenset(_method_needs(self.method, v)) for v in ("forget", "retain", "idk")}
        self.views = [v for v in ("forget", "retain", "idk") if _method_uses_view(self.method, v)]
        self.examples = encode_records(forget_records, self.tokenizer, cfg.data)
        self.retain = encode_records(retain_records, self.tokenizer, cfg.data) if "retain" in self.views else []
        self.idk = []
        if "idk" in self.views:
            self.idk = encode_records(refusal_records(forget_records, self.benchmark.refusals, self.train.seed),
                                      self.tokenizer, cfg.data)
        self.schedule = Schedule(len(self.examples), self.train, n_paired=len(self.retain))
        self.ctx = ObjectiveContext(seed=self.train.seed)

        # the frozen reference (the target model) only when a term needs it; when only
        # ref_logps on the fixed forget / idk sets are needed, cache them and free the model
        self.reference, self.ref_caches = None, {}
        ref_needs = {v: {n for n in self.needs[v] if n.startswith("ref_")} for v in self.views}
        if any(ref_needs.values()):
            reference, _ = load_model(without_lora(cfg.model), path=cfg.target)
            reference.to(self.device).eval().requires_grad_(False)
            cacheable = all(ns <= {"ref_logps"} for v, ns in ref_needs.items()) and not ref_needs.get("retain")
            if cacheable:
                for v in self.views:
                    if ref_needs.get(v):
                        rows = self.examples if v == "forget" else self.idk
                        self.ref_caches[v] = RefLogpCache().fill(reference, self._batches(rows, 32))
                del reference
            else:
                self.reference = reference

    def _batches(self, rows: list[dict], size: int):
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(rows), size):
            yield _to_device(collate_examples(rows[i:i + size], pad), self.device)

    def effective_batch(self, step: int) -> dict[str, list[dict]]:
        idx = self.schedule.indices(step)
        out = {}
        if "forget" in self.views:
            out["forget"] = [self.examples[i] for i in idx]
        if "idk" in self.views:
            out["idk"] = [self.idk[i] for i in idx]
        if "retain" in self.views:
            out["retain"] = [self.retain[j] for j in self.schedule.paired(step)]
        return out

    def micro_loss(self, micro, counts):
        views = {}
        for v in self.views:
            tok, seq = counts[v]
            views[v] = token_view(self.forward_model, micro[v], needs=self.needs[v], reference=self.reference,
                                  ref_cache=self.ref_caches.get(v), token_count=tok, seq_count=seq)
        loss, terms, stats = _method_loss(self.method, views, self.ctx)
        return loss, terms, stats, {}


# --------------------------------------------------------------------------------------------
# objectives adapter (rayunlearn.objectives)


def _parse_method(method: str):
    from rayunlearn.objectives import parse_method

    return parse_method(method)


def _method_needs(method, view: str):
    return method.needs(view)


def _method_uses_view(method, view: str) -> bool:
    views = getattr(method, "views_needed", None)
    if views is not None:
        views = views() if callable(views) else views
        return view in views
    return bool(method.needs(view)) or any(view in t.objective.needs for t in method.terms)


def _method_loss(method, views, ctx):
    """-> (total loss tensor, {term label: float}, {stat name: float})."""
    total, per_term, stats = method.loss(views, ctx)
    terms = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in per_term.items()}
    stats = {k: float(v) for k, v in (stats or {}).items()}
    return total, terms, stats


# --------------------------------------------------------------------------------------------
# checkpoints


def _latest_checkpoint(run_dir: Path) -> Optional[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if (p / "trainer.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(run_dir: Path, step: int, par: "_Parallel", tokenizer, extra: dict) -> Path:
    """checkpoints/step-<k>/: model.safetensors + config + tokenizer, optimizer.safetensors,
    trainer.json (step, param groups, RNG); with LoRA also adapter.safetensors (the model file
    is then the merged model).  Written into a temporary directory and renamed, so a kill leaves
    either the whole checkpoint or none.  Every rank calls it (under fsdp / deepspeed the state
    is gathered collectively); rank 0 writes."""
    final = run_dir / CHECKPOINTS / f"step-{step}"
    model_sd = opt_sd = None
    if par.engine is not None:
        par.engine.save_checkpoint(str(run_dir / CHECKPOINTS / "deepspeed"), tag=f"step-{step}")
        model_sd = par.engine._zero3_consolidated_16bit_state_dict()
    elif par.sharded:
        from rayunlearn.strategies import full_optimizer_state_dict, full_state_dict

        model_sd = full_state_dict(par.model)
        opt_sd = full_optimizer_state_dict(par.model, par.optimizer)
    if par.rank == 0:
        tmp = run_dir / CHECKPOINTS / f".step-{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_model(tmp, par.model, model_sd)
        tokenizer.save_pretrained(str(tmp))
        tensors, meta = {}, {"step": step, **extra}
        if par.engine is not None:
            meta.update(optimizer_format="deepspeed", param_groups=[])
        elif opt_sd is not None:           # full FQN-keyed state (fsdp)
            for fqn, st in opt_sd["state"].items():
                for name, value in st.items():
                    tensors[f"state.{fqn}.{name}"] = torch.as_tensor(value)
            meta.update(optimizer_format="fqn", param_groups=opt_sd["param_groups"])
        else:
            state = par.optimizer.state_dict()
            for idx, st in state["state"].items():
                for name, value in st.items():
                    tensors[f"state.{idx}.{name}"] = torch.as_tensor(value)
            meta.update(optimizer_format="index", param_groups=state["param_groups"])
        tensors["rng.torch"] = torch.get_rng_state()
        save_safetensors(tmp / "optimizer.safetensors", tensors)
        write_json(tmp / "trainer.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    par.barrier()
    return final


def _write_model(out: Path, model, state_dict: Optional[dict]) -> None:
    """model.safetensors + config.json of `model` into `out`: from a gathered full state dict
    (fsdp / deepspeed), as the merged model plus ``adapter.safetensors`` (LoRA), or plainly."""
    from safetensors.torch import save_file

    from rayunlearn.models import unwrap

    bare = unwrap(model)
    if state_dict is not None:
        bare.config.save_pretrained(str(out))
        gen = getattr(bare, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(out))
            except (ValueError, OSError):
                pass
        tensors, seen = {}, set()
        for k, v in state_dict.items():
            v = v.detach().cpu().contiguous()
            if v.data_ptr() in seen:                     # an alias (tied embeddings): stored once
                continue
            if getattr(bare.config, "tie_word_embeddings", False) and k == "lm_head.weight":
                continue
            seen.add(v.data_ptr())
            tensors[k] = v
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    elif _is_peft(bare):
        import copy

        merged = copy.deepcopy(bare).merge_and_unload()
        merged.save_pretrained(str(out), safe_serialization=True)
        del merged
        save_safetensors(out / ADAPTER_FILE, _adapter_state(bare))
    else:
        bare.save_pretrained(str(out), safe_serialization=True)


ADAPTER_FILE = "adapter.safetensors"


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _adapter_state(model) -> dict:
    """The trainable (adapter) tensors of a peft model, by their names in the peft model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _load_weights(ckpt: Path, model) -> None:
    """Load a checkpoint's weights into the (unwrapped, unsharded) model: the adapter tensors
    for a peft model (its base is the unchanged target model), else model.safetensors."""
    from safetensors.torch import load_file

    from rayunlearn.models import unwrap

    bare = unwrap(model)
    if _is_peft(bare):
        path = ckpt / ADAPTER_FILE
        if not path.exists():
            raise UserError(f"checkpoint {ckpt} has no {ADAPTER_FILE} for this LoRA run; remove the run "
                            f"directory to start over")
        saved = load_file(str(path))
        params = dict(bare.named_parameters())
        want = set(_adapter_state(bare))
        if set(saved) != want:
            raise UserError(f"checkpoint {ckpt} does not fit the LoRA model (missing "
                            f"{sorted(want - set(saved))[:3]}, unexpected {sorted(set(saved) - want)[:3]}); "
                            f"remove the run directory to start over")
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t.to(params[n].dtype))
        return
    weights = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = bare.load_state_dict(weights, strict=False)
    tied = set(getattr(bare, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UserError(f"checkpoint {ckpt} does not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); remove the run directory to start over")
    if hasattr(bare, "tie_weights"):
        bare.tie_weights()


def _load_optimizer(ckpt: Path, par: "_Parallel") -> dict:
    """Restore the optimiser state (and the RNG) of a checkpoint; returns trainer.json."""
    from safetensors.torch import load_file

    meta = read_json(ckpt / "trainer.json")
    fmt = meta.get("optimizer_format", "index")
    if par.engine is not None:
        par.engine.load_checkpoint(str(ckpt.parent / "deepspeed"), tag=ckpt.name,
                                   load_module_strict=False)
        return meta
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    if fmt == "fqn":
        from rayunlearn.strategies import load_full_optimizer_state_dict

        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                fqn, name = key[len("state."):].rsplit(".", 1)
                state.setdefault(fqn, {})[name] = value
        load_full_optimizer_state_dict(par.model, par.optimizer,
                                       {"state": state, "param_groups": meta["param_groups"]})
    else:
        state = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        device = par.params[0].device if par.params else torch.device("cpu")
        for st in state.values():
            for name in list(st):
                if name != "step":
                    st[name] = st[name].to(device)
        par.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return meta


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records written after checkpoint `step` (they are redone on resume)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# data parallelism: what differs between strategies


class _Parallel:
    """Wraps the task's model for ``train.strategy`` (module docstring) and owns the optimiser.

    ``micro(last)`` is the context of one micro-batch's forward + backward (gradients are
    synchronised on the last micro-batch only); ``backward`` scales the loss by the world size
    (the libraries average, our losses are shares of one sum); ``grad_norm`` / ``step``;
    ``recording()`` the context of a G-effect recording; ``eval_model()`` the unsharded model to
    evaluate on rank 0 (collective under fsdp)."""

    def __init__(self, task: "_Task", train: TrainConfig, device, rank: int, world: int):
        from rayunlearn import strategies as S

        self.task, self.train, self.device, self.rank, self.world = task, train, device, rank, world
        self.strategy = train.strategy
        self.model = task.model
        self.engine = self.wrapper = None
        self._eval_copy = None
        self.sharded = False
        if self.strategy == "deepspeed":
            n_micro = train.batch_size // (train.micro_batch_size * max(1, world))
            ds_cfg = S.deepspeed_config(train.micro_batch_size, n_micro, max(1, world), train.lr, bf16=train.bf16,
                                        weight_decay=train.weight_decay)
            ds_cfg["gradient_clipping"] = float(train.max_grad_norm or 0.0)
            self.engine, self.optimizer = S.deepspeed_engine(self.model, ds_cfg)
            task.forward_model = self.engine
            self.rank, self.world = S.world()
        elif world > 1:
            _broadcast_parameters(self.model)
            if self.strategy == "ddp":
                self.wrapper = S.shard_model(self.model, "ddp", device, find_unused_parameters=_find_unused(task))
                task.forward_model = self.wrapper
            else:
                S.shard_model(self.model, "fsdp", device)
                self.sharded = True
                ref = getattr(task, "reference", None)
                if train.shard_reference and ref is not None:
                    S.shard_model(ref, "fsdp", device)
        self.scale = S.loss_scale(self.strategy) if self.world > 1 else 1.0
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.engine is None:
            self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay,
                                               betas=(0.9, 0.999), eps=1e-8)

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
            import inspect

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
        (self.engine or self.wrapper or self.model).train(on)

    def recording(self):
        if self.sharded:
            from rayunlearn.strategies import fsdp_keep_unsharded

            return fsdp_keep_unsharded(self.model)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        dist = _dist()
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
            from rayunlearn.strategies import full_state_dict

            sd = full_state_dict(self.model)
        if self.rank != 0:
            return None
        if self._eval_copy is None:
            from transformers import AutoModelForCausalLM

            from rayunlearn.models import DTYPES

            self._eval_copy = AutoModelForCausalLM.from_config(
                self.model.config, dtype=DTYPES[self.task.cfg.model.dtype]).to(self.device)
        self._eval_copy.load_state_dict(sd, strict=False)
        if hasattr(self._eval_copy, "tie_weights"):
            self._eval_copy.tie_weights()
        self._eval_copy.eval()
        return self._eval_copy


def _find_unused(task) -> bool:
    """DDP must look for parameters outside the loss graph when a view reads hidden states
    (RMU stops at a middle layer: later blocks get no gradient)."""
    needs = getattr(task, "needs", {}) or {}
    return any("hidden" in ns for ns in needs.values())


# --------------------------------------------------------------------------------------------
# the loop


def run_loop(kind: str, cfg, run_dir: Path, report=None):
    """The training loop, identical in-process and per Ray Train worker (see module docstring)."""
    run_dir = Path(run_dir)
    rank, world = _rank_world()
    train: TrainConfig = cfg.train
    device = _device(train)
    seed_everything(train.seed)
    task = (_FinetuneTask if kind == "finetune" else _UnlearnTask)(cfg, run_dir, device)
    task.build()
    task.model.to(device)
    ckpt = _latest_checkpoint(run_dir)
    if ckpt is not None and train.strategy != "deepspeed":
        _load_weights(ckpt, task.model)           # before wrapping / sharding: every rank reads it
    par = _Parallel(task, train, device, rank, world)
    rank, world = par.rank, par.world
    tokenizer, optimizer = task.tokenizer, par.optimizer
    sched = task.schedule
    is_main = rank == 0
    log_path, traj_path = run_dir / "log.jsonl", run_dir / "trajectory.jsonl"

    # resume
    start = 0
    if ckpt is not None:
        meta = _load_optimizer(ckpt, par)
        start = int(meta["step"])
        task.correct, task.total = meta.get("correct", 0), meta.get("answer_tokens", 0)
        if is_main:
            _truncate_jsonl(log_path, start)
            _truncate_jsonl(traj_path, start)
            print(f"resuming {run_dir} from {ckpt.name} ({start}/{sched.total_steps} steps)")
    if is_main:
        write_json(run_dir / "status.json", {"status": "running", "step": start, "total_steps": sched.total_steps})

    hooks = _Hooks(task, cfg, run_dir, is_main, report, par) if kind == "unlearn" else None
    if hooks is not None:
        hooks.resumed(start)      # also at 0: a retried attempt's rows are replaced, not duplicated

    pad_id = tokenizer.pad_token_id
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if train.bf16 and par.engine is None
                else contextlib.nullcontext())
    par.train_mode(True)
    last_ckpt = ckpt
    lr = train.lr
    progress = _progress(is_main and train.progress, f"{kind} {run_dir.name}", sched.total_steps, start)
    t0 = time.time()
    with progress as bar:
        for step in range(start, sched.total_steps):
            lr = train.lr * sched.lr_factor(step)
            par.set_lr(lr)
            batch = task.effective_batch(step)
            # effective-batch counts of every view (global over micro-batches and workers)
            counts = {v: (float(sum(_answer_tokens(e) for e in rows)), float(len(rows))) for v, rows in batch.items()}
            shards = {v: _shard(rows, rank, world, train.micro_batch_size) for v, rows in batch.items()}
            n_micro = len(next(iter(shards.values())))
            par.zero_grad()
            loss_sum, term_sums, stat_sums, extra_sums = 0.0, {}, {}, {}
            for j in range(n_micro):
                last = j == n_micro - 1
                micro = {v: _to_device(collate_examples(shards[v][j], pad_id), device) for v in shards}
                with par.micro(last):
                    with autocast:
                        loss, terms, stats, extra = task.micro_loss(micro, counts)
                    par.backward(loss, last)
                loss_sum += float(loss.detach())
                for d, src in ((term_sums, terms), (stat_sums, stats), (extra_sums, extra)):
                    for k, val in src.items():
                        d[k] = d.get(k, 0.0) + val
            # one all-reduce for everything logged (terms and the loss are already globally
            # normalised -> sums; stats are per-micro-batch means -> averaged over micro-batches)
            keys_t, keys_s, keys_e = sorted(term_sums), sorted(stat_sums), sorted(extra_sums)
            packed = torch.tensor([loss_sum] + [term_sums[k] for k in keys_t] + [stat_sums[k] for k in keys_s]
                                  + [extra_sums[k] for k in keys_e], dtype=torch.float64, device=device)
            _all_reduce_sum(packed)
            packed = packed.cpu().tolist()
            loss_value = packed[0]
            terms_all = dict(zip(keys_t, packed[1:1 + len(keys_t)]))
            micro_total = n_micro * world
            stats_all = {k: v / micro_total for k, v in zip(keys_s, packed[1 + len(keys_t):1 + len(keys_t) + len(keys_s)])}
            extra_all = dict(zip(keys_e, packed[1 + len(keys_t) + len(keys_s):]))
            grad_norm = par.grad_norm(train.max_grad_norm)
            if not (math.isfinite(loss_value) and (math.isfinite(grad_norm) or par.engine is not None)):
                _diverged(run_dir, is_main, step + 1, loss_value, grad_norm, terms_all, lr, last_ckpt)
            if hooks is not None:
                hooks.before_step(step, lr, batch, optimizer)     # G-effects at the weights this step starts from
            ds_norm = par.step()
            if ds_norm is not None:
                grad_norm = ds_norm
            if hooks is not None:
                hooks.after_optimizer_step(step)                  # the measured risk change of this step
            done = step + 1
            epoch = sched.epoch(done)
            if is_main and (done % max(1, train.log_every) == 0 or done == sched.total_steps):
                rec = {"step": done, "epoch": round(epoch, 4), "lr": lr, "loss": loss_value, "grad_norm": grad_norm}
                rec.update({f"term.{k}": v for k, v in terms_all.items()})
                rec.update({f"stat.{k}": v for k, v in stats_all.items()})
                rec["time_s"] = round(time.time() - t0, 3)
                append_jsonl(log_path, rec)
            if "correct" in extra_all:
                task.correct += extra_all["correct"]
                task.total += extra_all["answer_tokens"]
                if math.floor(epoch + 1e-9) > math.floor(sched.epoch(step) + 1e-9) or done == sched.total_steps:
                    acc = task.correct / max(1.0, task.total)
                    if is_main:
                        append_jsonl(log_path, {"step": done, "epoch": round(epoch, 4), "train_accuracy": acc})
                        bar.print(f"epoch {epoch:.2f}: answer-token accuracy {acc:.4f} (loss {loss_value:.4f})")
                    task.correct, task.total = 0, 0
            bar.advance(loss_value)
            if hooks is not None:
                hooks.after_step(done)
            if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == sched.total_steps:
                last_ckpt = _save_checkpoint(run_dir, done, par, tokenizer,
                                             {"correct": task.correct, "answer_tokens": task.total})
                if hooks is not None:
                    hooks.checkpointed()
    par.train_mode(False)
    if kind == "finetune":
        return _finish_finetune(task, par, run_dir, is_main)
    return hooks.finish(sched.total_steps, lr, optimizer)


def _diverged(run_dir, is_main, step, loss, grad_norm, terms, lr, last_ckpt) -> None:
    kept = f"kept the last good checkpoint {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    msg = (f"training diverged at step {step}: loss={loss}, grad_norm={grad_norm}"
           f"{' (terms ' + ', '.join(f'{k}={v:.4g}' for k, v in terms.items()) + ')' if terms else ''} "
           f"with lr={lr:.3g}. Stopped before the update; {kept}. Lower train.lr, set "
           f"train.max_grad_norm, or change the method's hyper-parameters.")
    if is_main:
        write_json(Path(run_dir) / "status.json", {"status": "diverged", "step": step, "message": msg,
                                                   "last_checkpoint": str(last_ckpt) if last_ckpt else None})
    raise DivergedError(msg)


@torch.no_grad()
def answer_accuracy(model, tokenizer, examples: list[dict], batch_size: int = 64) -> float:
    """Teacher-forced answer-token accuracy (argmax == label over answer tokens)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(0, len(examples), batch_size):
        batch = _to_device(collate_examples(examples[i:i + batch_size], tokenizer.pad_token_id), device)
        view = token_view(model, batch, needs=frozenset({"logits"}))
        correct += int(((view.logits.argmax(-1) == view.labels) & view.mask).sum())
        total += int(view.mask.sum())
    model.train(was_training)
    return correct / max(1, total)


def _finish_finetune(task: _FinetuneTask, par: _Parallel, run_dir: Path, is_main: bool) -> Path:
    from rayunlearn.models import save_model

    model = par.eval_model()           # collective under fsdp / deepspeed; None off rank 0
    if not is_main:
        return run_dir
    acc = answer_accuracy(model, task.tokenizer, task.examples)
    append_jsonl(run_dir / "log.jsonl", {"step": task.schedule.total_steps, "final_accuracy": acc})
    print(f"final answer-token accuracy on {task.split} ({len(task.examples)} QA): {acc:.4f}")
    save_model(model, task.tokenizer, run_dir)
    write_json(run_dir / "status.json", {"status": "complete", "step": task.schedule.total_steps,
                                         "split": task.split, "final_accuracy": acc})
    return run_dir


# --------------------------------------------------------------------------------------------
# unlearning hooks: G-effect recorder, evaluator, final metrics


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Hooks:
    """Calls the G-effect recorder around every ``effects.every``-th optimiser step and the
    evaluator every ``eval.every`` steps (a fast evaluation without generation, appended to
    trajectory.jsonl), and the full evaluation at the end (metrics.json + raw.json, tofu_eval/).

    Every rank calls every hook: the recorder decides who computes (rank 0 under ddp, every rank
    under fsdp) and who writes (rank 0).  The evaluator is a collective call under a process
    group (``rayunlearn.eval.distributed``: batches split over the ranks, FSDP2-sharded models
    supported, every rank gets the single-process result); rank 0 writes.  Under deepspeed the
    weights are gathered to rank 0 (``_Parallel.eval_model``), which evaluates alone."""

    def __init__(self, task: _UnlearnTask, cfg: UnlearnConfig, run_dir: Path, is_main: bool, report,
                 par: Optional[_Parallel] = None):
        self.task, self.cfg, self.run_dir, self.is_main, self.report = task, cfg, run_dir, is_main, report
        self.par = par
        self.recorder = None
        if cfg.effects.every > 0:
            from rayunlearn.effects import make_recorder

            self.recorder = make_recorder(cfg, task.model, task.method, run_dir=run_dir,
                                          benchmark=task.benchmark, tokenizer=task.tokenizer,
                                          reference=task.reference, ref_caches=task.ref_caches,
                                          ctx=task.ctx, is_main=is_main)
        self._fast = None

    def _recording(self):
        return self.par.recording() if self.par is not None else contextlib.nullcontext()

    def checkpointed(self) -> None:
        """After a checkpoint: write the G-effect tables, so a resume finds every row up to it."""
        sink = getattr(self.recorder, "sink", None)
        if sink is not None and getattr(self.recorder, "sends", False) and hasattr(sink, "flush"):
            sink.flush()

    def resumed(self, start: int) -> None:
        """Before the first step, which is optimiser step `start` (0 when starting from scratch):
        the G-effect sink (LocalSink or the sweep's aggregator actor) keeps only the rows of steps
        before `start` and the recorder continues its cumulative sums (``Recorder.resume``)."""
        if self.recorder is not None:
            self.recorder.resume(start)

    def before_step(self, step: int, lr: float, batch: dict, optimizer) -> None:
        """Just before optimiser step `step` (0-based = steps already taken): record the
        G-effects at the current weights with this step's lr (no-op unless due)."""
        rec = self.recorder
        if rec is None or not rec.due(step):
            return
        fb = rb = None
        if self.cfg.effects.probe == "step":
            col = _to_device(self._collated(batch), self.task.device)
            fb, rb = col.get("forget"), col.get("retain")
        with self._recording():
            rec.before_step(step, lr, optimizer, forget_batch=fb, retain_batch=rb)

    def after_optimizer_step(self, step: int) -> None:
        """Just after optimiser step `step`: the measured probe-risk change (steps.parquet)."""
        if self.recorder is not None:
            self.recorder.after_step(step)

    def after_step(self, step: int) -> None:
        """After `step` optimiser steps (1-based): the in-loop evaluation when due."""
        if self.cfg.eval.every and step % self.cfg.eval.every == 0 and step != self.task.schedule.total_steps:
            metrics = self.evaluate(step, fast=True)
            if self.is_main and metrics is not None:
                self._trajectory(metrics, step)
            if self.par is not None:
                self.par.train_mode(True)
            else:
                self.task.model.train()

    def _collated(self, batch: dict) -> dict:
        """The step's effective batch as collated tensors: {"forget" (with nested "idk"), "retain"}."""
        pad = self.task.tokenizer.pad_token_id
        out = {}
        if "forget" in batch or "idk" in batch:
            rows = batch.get("forget") or batch["idk"]
            out["forget"] = collate_examples(rows, pad)
            if "idk" in batch:
                out["forget"]["idk"] = collate_examples(batch["idk"], pad)
        if "retain" in batch:
            out["retain"] = collate_examples(batch["retain"], pad)
        return out

    def evaluate(self, step: int, fast: bool) -> Optional[dict]:
        """Evaluate the current weights; every rank calls it (see the class docstring).  Returns
        the metrics on rank 0 (other ranks: the same dict, or None under deepspeed)."""
        if not self.cfg.evaluate:
            return None
        try:
            from rayunlearn.eval.evaluate import Evaluator
        except ImportError:   # TODO(eval): remove once rayunlearn.eval is complete
            return None
        task = self.task
        model, kw = task.model, {}
        if self.par is not None and self.par.engine is not None:   # ZeRO-3: gather, rank 0 alone
            model, kw = self.par.eval_model(), {"distributed": False}
            if model is None:
                return None
        elif _dist() is None and not self.is_main:
            return None
        if fast:
            if self._fast is None:
                self._fast = Evaluator(task.tokenizer, task.benchmark, self.cfg.data, self.cfg.eval,
                                       retain_reference=self.cfg.eval.retain_reference, fast=True, **kw)
            return self._fast(model, step=step)
        ev = Evaluator(task.tokenizer, task.benchmark, self.cfg.data, self.cfg.eval,
                       retain_reference=self.cfg.eval.retain_reference, **kw)
        return ev(model, step=step)

    def _trajectory(self, metrics: dict, step: int, report: bool = True) -> None:
        from rayunlearn.eval.evaluate import trajectory_record

        rec = {**trajectory_record(metrics), "step": step}
        append_jsonl(self.run_dir / "trajectory.jsonl", rec)
        if report and self.report is not None:
            self.report({**_scalars(rec), "done": False})

    def finish(self, total_steps: int, lr: float = 0.0, optimizer=None) -> dict:
        rec = self.recorder
        if rec is not None:
            # the final weights (no next step to measure: the steps row has no measured change)
            if rec.due(total_steps) and self.cfg.effects.probe != "step":
                with self._recording():
                    rec.before_step(total_steps, lr, optimizer)
            rec.close()
        metrics = self.evaluate(total_steps, fast=False)
        if not self.is_main:
            return {}
        if metrics is None:
            log = read_jsonl(self.run_dir / "log.jsonl")
            metrics = dict(log[-1]) if log else {"step": total_steps}
        else:
            from rayunlearn.eval.evaluate import write_eval

            self._trajectory(metrics, total_steps, report=False)
            write_eval(metrics, self.run_dir)
            try:
                from rayunlearn.eval.tofu_logs import export_tofu_logs

                export_tofu_logs(metrics, self.run_dir / "tofu_eval")
            except (ImportError, UserError) as exc:   # optional interop output
                print(f"note: no tofu_eval/ export ({exc})")
            metrics = {k: v for k, v in metrics.items() if k != "raw"}
        write_json(self.run_dir / "status.json", {"status": "complete", "step": total_steps})
        if self.report is not None:
            self.report({**_scalars(metrics), "step": total_steps, "done": True})
        return metrics


# --------------------------------------------------------------------------------------------
# progress


class _Bar:
    def __init__(self, progress, task_id):
        self.progress, self.task_id = progress, task_id

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def advance(self, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, advance=1, loss=loss)

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text)


def _progress(enabled: bool, title: str, total: int, done: int) -> _Bar:
    if not enabled:
        return _Bar(None, None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())
    task_id = progress.add_task(title, total=total, completed=done, loss=float("nan"))
    return _Bar(progress, task_id)
