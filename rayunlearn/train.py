"""Finetuning and unlearning: one training loop of our own, in-process or per Ray Train worker.

    finetune(cfg: FinetuneConfig) -> Path      base / target / retain model
    unlearn(cfg: UnlearnConfig) -> dict        unlearn data.forget_split from the target model
    unlearn_trial(cfg, report=None) -> dict    the per-trial entry for a Ray Tune sweep

The loop (:func:`run_loop`) reads top to bottom like nanoGPT's: build → resume → for each
optimiser step { take this worker's shard of the effective batch → micro-batches → token views →
loss → backward (accumulate) → sum gradients over workers → guard → clip → AdamW step → log →
G-effect recorder / evaluation / checkpoint every k steps } → save.

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
- Across workers the gradients must therefore be **summed**, not averaged: we do not wrap the
  model in DDP (which averages); after accumulation one flat ``all_reduce(SUM)`` of the
  gradients makes every worker hold the unsplit batch's gradient, then each takes the same AdamW
  step (parameters were broadcast from rank 0 at the start).  Ray Train's ``TorchTrainer`` sets
  up the process group (gloo on CPU, NCCL on GPU) and we use its device.
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

CHECKPOINTS = "checkpoints"


class DivergedError(UserError):
    """The loss or a gradient became NaN/inf; the run stopped and kept its last good checkpoint."""


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
    if cfg.train.strategy != "ddp":
        raise UserError(f"train.strategy={cfg.train.strategy} is not implemented yet; use train.strategy=ddp")
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


def _sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every gradient over workers (one flat all-reduce). Missing grads count as zero."""
    if _dist() is None:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _all_reduce_sum(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


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
        view = token_view(self.model, micro["train"], needs=frozenset({"logits"}), token_count=tok, seq_count=seq)
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
            views[v] = token_view(self.model, micro[v], needs=self.needs[v], reference=self.reference,
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


def _save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, extra: dict) -> Path:
    """checkpoints/step-<k>/: model (save_pretrained: safetensors + config + tokenizer),
    optimizer.safetensors, trainer.json (step, param groups, RNG). Written into a temporary
    directory and renamed, so a kill leaves either the whole checkpoint or none."""
    from rayunlearn.models import unwrap

    final = run_dir / CHECKPOINTS / f"step-{step}"
    tmp = run_dir / CHECKPOINTS / f".step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bare = unwrap(model)
    bare.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    state = optimizer.state_dict()
    tensors = {}
    for idx, st in state["state"].items():
        for name, value in st.items():
            tensors[f"state.{idx}.{name}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    save_safetensors(tmp / "optimizer.safetensors", tensors)
    write_json(tmp / "trainer.json", {"step": step, "param_groups": state["param_groups"], **extra})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    from safetensors.torch import load_file

    from rayunlearn.models import unwrap

    bare = unwrap(model)
    weights = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = bare.load_state_dict(weights, strict=False)
    tied = set(getattr(bare, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UserError(f"checkpoint {ckpt} does not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); remove the run directory to start over")
    if hasattr(bare, "tie_weights"):
        bare.tie_weights()
    meta = read_json(ckpt / "trainer.json")
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    device = next(model.parameters()).device
    for st in state.values():
        for name in list(st):
            if name != "step":
                st[name] = st[name].to(device)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
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
    model, tokenizer = task.model, task.tokenizer
    model.to(device)
    _broadcast_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    sched = task.schedule
    is_main = rank == 0
    log_path, traj_path = run_dir / "log.jsonl", run_dir / "trajectory.jsonl"

    # resume
    start = 0
    ckpt = _latest_checkpoint(run_dir)
    if ckpt is not None:
        meta = _load_checkpoint(ckpt, model, optimizer)
        start = int(meta["step"])
        task.correct, task.total = meta.get("correct", 0), meta.get("answer_tokens", 0)
        if is_main:
            _truncate_jsonl(log_path, start)
            _truncate_jsonl(traj_path, start)
            print(f"resuming {run_dir} from {ckpt.name} ({start}/{sched.total_steps} steps)")
    if is_main:
        write_json(run_dir / "status.json", {"status": "running", "step": start, "total_steps": sched.total_steps})

    hooks = _Hooks(task, cfg, run_dir, is_main, report) if kind == "unlearn" else None
    if hooks is not None and start == 0:
        hooks.start()

    pad_id = tokenizer.pad_token_id
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if train.bf16
                else contextlib.nullcontext())
    model.train()
    last_ckpt = ckpt
    progress = _progress(is_main and train.progress, f"{kind} {run_dir.name}", sched.total_steps, start)
    t0 = time.time()
    with progress as bar:
        for step in range(start, sched.total_steps):
            lr = train.lr * sched.lr_factor(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = task.effective_batch(step)
            # effective-batch counts of every view (global over micro-batches and workers)
            counts = {v: (float(sum(_answer_tokens(e) for e in rows)), float(len(rows))) for v, rows in batch.items()}
            shards = {v: _shard(rows, rank, world, train.micro_batch_size) for v, rows in batch.items()}
            n_micro = len(next(iter(shards.values())))
            optimizer.zero_grad(set_to_none=True)
            loss_sum, term_sums, stat_sums, extra_sums = 0.0, {}, {}, {}
            for j in range(n_micro):
                micro = {v: _to_device(collate_examples(shards[v][j], pad_id), device) for v in shards}
                with autocast:
                    loss, terms, stats, extra = task.micro_loss(micro, counts)
                loss.backward()
                loss_sum += float(loss.detach())
                for d, src in ((term_sums, terms), (stat_sums, stats), (extra_sums, extra)):
                    for k, val in src.items():
                        d[k] = d.get(k, 0.0) + val
            _sum_gradients(params)
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
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                params, train.max_grad_norm if train.max_grad_norm else float("inf")))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                _diverged(run_dir, is_main, step + 1, loss_value, grad_norm, terms_all, lr, last_ckpt)
            optimizer.step()
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
                hooks.after_step(done, lr, batch, optimizer)
            if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == sched.total_steps:
                if is_main:
                    last_ckpt = _save_checkpoint(run_dir, done, model, tokenizer, optimizer,
                                                 {"correct": task.correct, "answer_tokens": task.total})
                else:
                    last_ckpt = run_dir / CHECKPOINTS / f"step-{done}"
    model.eval()
    if kind == "finetune":
        return _finish_finetune(task, run_dir, is_main)
    return hooks.finish(sched.total_steps)


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


def _finish_finetune(task: _FinetuneTask, run_dir: Path, is_main: bool) -> Path:
    from rayunlearn.models import save_model

    if not is_main:
        return run_dir
    acc = answer_accuracy(task.model, task.tokenizer, task.examples)
    append_jsonl(run_dir / "log.jsonl", {"step": task.schedule.total_steps, "final_accuracy": acc})
    print(f"final answer-token accuracy on {task.split} ({len(task.examples)} QA): {acc:.4f}")
    save_model(task.model, task.tokenizer, run_dir)
    write_json(run_dir / "status.json", {"status": "complete", "step": task.schedule.total_steps,
                                         "split": task.split, "final_accuracy": acc})
    return run_dir


# --------------------------------------------------------------------------------------------
# unlearning hooks: G-effect recorder, evaluator, final metrics


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Hooks:
    """Calls the G-effect recorder every ``effects.every`` steps and the evaluator every
    ``eval.every`` steps (a fast evaluation without generation, appended to trajectory.jsonl),
    and the full evaluation at the end (metrics.json + raw.json, tofu_eval/).  The evaluator
    runs on rank 0 only; the recorder is called on every rank (it decides what to do)."""

    def __init__(self, task: _UnlearnTask, cfg: UnlearnConfig, run_dir: Path, is_main: bool, report):
        self.task, self.cfg, self.run_dir, self.is_main, self.report = task, cfg, run_dir, is_main, report
        self.recorder = None
        if cfg.effects.every > 0:
            try:
                from rayunlearn.effects import make_recorder
            except ImportError:
                make_recorder = None
            if make_recorder is None:   # TODO(effects): remove once rayunlearn.effects provides it
                if is_main:
                    print("note: effects.every > 0 but rayunlearn.effects.make_recorder is not available; "
                          "no G-effects are recorded")
            else:
                self.recorder = make_recorder(cfg, task.model, task.method, run_dir=run_dir,
                                              benchmark=task.benchmark, tokenizer=task.tokenizer,
                                              reference=task.reference, ref_caches=task.ref_caches,
                                              ctx=task.ctx, is_main=is_main)
        self._fast = None

    def start(self) -> None:
        if self.recorder is not None and hasattr(self.recorder, "start"):
            self.recorder.start(step=0)

    def after_step(self, step: int, lr: float, batch: dict, optimizer) -> None:
        if self.recorder is not None and step % self.cfg.effects.every == 0:
            self.recorder(step=step, lr=lr, batch=self._collated(batch), optimizer=optimizer)
        if self.cfg.eval.every and step % self.cfg.eval.every == 0 and step != self.task.schedule.total_steps:
            if self.is_main:
                metrics = self.evaluate(step, fast=True)
                if metrics is not None:
                    self._trajectory(metrics, step)
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
        if not self.cfg.evaluate:
            return None
        try:
            from rayunlearn.eval.evaluate import Evaluator
        except ImportError:   # TODO(eval): remove once rayunlearn.eval is complete
            return None
        task = self.task
        if fast:
            if self._fast is None:
                self._fast = Evaluator(task.tokenizer, task.benchmark, self.cfg.data, self.cfg.eval,
                                       retain_reference=self.cfg.eval.retain_reference, fast=True)
            return self._fast(task.model, step=step)
        ev = Evaluator(task.tokenizer, task.benchmark, self.cfg.data, self.cfg.eval,
                       retain_reference=self.cfg.eval.retain_reference)
        return ev(task.model, step=step)

    def _trajectory(self, metrics: dict, step: int, report: bool = True) -> None:
        from rayunlearn.eval.evaluate import trajectory_record

        rec = {**trajectory_record(metrics), "step": step}
        append_jsonl(self.run_dir / "trajectory.jsonl", rec)
        if report and self.report is not None:
            self.report({**_scalars(rec), "done": False})

    def finish(self, total_steps: int) -> dict:
        if self.recorder is not None and hasattr(self.recorder, "close"):
            self.recorder.close()
        if not self.is_main:
            return {}
        metrics = self.evaluate(total_steps, fast=False)
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
