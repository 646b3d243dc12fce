"""What differs between finetuning and unlearning: the model and data a run builds, one
micro-batch's loss, and the task's own bookkeeping between steps (finetuning's answer-token
accuracy per epoch).

The loop (``loop.py``) asks a task for the effective batch of a step (``effective_batch``), the
loss of one micro-batch through the model it is given (``micro_loss``: the DDP wrapper, the
DeepSpeed engine or the bare model, chosen by ``parallel.py``), and, after the step's totals
were summed over workers, what to log (``step_done``). Counters a resume must restore travel
through ``checkpoint_state`` / ``restore``.

Losses are normalised by the counts of the **whole effective batch** (``batch_counts``, which
every worker computes itself from the indices it knows): micro-batch losses then add up to the
unsplit batch's loss, and so do their gradients.
"""

from __future__ import annotations

from typing import Optional

import torch

from rayunlearn.config import FinetuneConfig, UnlearnConfig
from rayunlearn.data import benchmark_corpus, load_benchmark
from rayunlearn.data.examples import (FULL_SPLIT, WORLD_SPLIT, collate_examples, encode_records,
                                      refusal_records, retain_split, to_device)
from rayunlearn.effects.probes import probe_rows
from rayunlearn.forward import IGNORE, RefLogpCache, token_view
from rayunlearn.models import load_model, without_lora
from rayunlearn.objectives import Method, ObjectiveContext
from rayunlearn.train.schedule import Schedule

VIEW_ORDER = ("forget", "retain", "idk")


def answer_tokens(example: dict) -> int:
    """Answer tokens the token view scores for this example (shifted labels != IGNORE)."""
    labels = torch.as_tensor(example["labels"])
    return int((labels[1:] != IGNORE).sum())


def batch_counts(batch: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """{view: (answer tokens, sequences)} of the whole effective batch (every worker's share)."""
    return {v: (float(sum(answer_tokens(e) for e in rows)), float(len(rows))) for v, rows in batch.items()}


class FinetuneTask:
    """Token-mean NLL on one split: ``world`` (base), ``full`` (target) or the retain split."""

    kind = "finetune"

    def __init__(self, cfg: FinetuneConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.correct, self.total = 0.0, 0.0     # answer-token accuracy since the last epoch end

    def build(self) -> None:
        """Load the benchmark, the model (a fresh tiny one, or ``cfg.init``) and encode the split."""
        cfg = self.cfg
        self.benchmark = load_benchmark(cfg.data)
        self.split = {"base": WORLD_SPLIT, "target": FULL_SPLIT,
                      "retain": retain_split(cfg.data.forget_split)}[cfg.stage]
        records = self.benchmark.split(self.split)
        if cfg.replay_world and cfg.stage != "base" and self.benchmark.has(WORLD_SPLIT):
            records = list(records) + list(self.benchmark.split(WORLD_SPLIT))
        corpus = None
        if not cfg.init and cfg.model.name == "tiny":
            corpus = benchmark_corpus(self.benchmark)
        self.model, self.tokenizer = load_model(cfg.model, path=cfg.init or None, corpus=corpus)
        self.examples = encode_records(records, self.tokenizer, cfg.data)
        self.schedule = Schedule(len(self.examples), cfg.train)
        self.reference = None
        self.find_unused_parameters = False

    def effective_batch(self, step: int) -> dict[str, list[dict]]:
        return {"train": [self.examples[i] for i in self.schedule.indices(step)]}

    def micro_loss(self, model, micro: dict[str, dict], counts: dict[str, tuple[float, float]]):
        """-> (loss tensor, {term label: float}, {stat name: float}, {counter: float})"""
        tok, seq = counts["train"]
        view = token_view(model, micro["train"], needs=frozenset({"logits"}), token_count=tok, seq_count=seq)
        loss = -(view.logps * view.mask).sum() / view.token_count       # token-mean NLL
        with torch.no_grad():
            hit = (view.logits.argmax(-1) == view.labels) & view.mask
        return loss, {}, {}, {"correct": float(hit.sum()), "answer_tokens": float(view.mask.sum())}

    def step_done(self, done: int, counters: dict[str, float], loss: float) -> Optional[tuple[dict, str]]:
        """Add the step's answer-token hits (summed over workers); at an epoch end return the
        accuracy record for log.jsonl and the line to print, and start counting afresh."""
        self.correct += counters["correct"]
        self.total += counters["answer_tokens"]
        if not self.schedule.epoch_ended(done):
            return None
        epoch = self.schedule.epoch(done)
        acc = self.correct / max(1.0, self.total)
        self.correct, self.total = 0, 0
        return ({"step": done, "epoch": round(epoch, 4), "train_accuracy": acc},
                f"epoch {epoch:.2f}: answer-token accuracy {acc:.4f} (loss {loss:.4f})")

    def checkpoint_state(self) -> dict:
        return {"correct": self.correct, "answer_tokens": self.total}

    def restore(self, trainer_state: dict) -> None:
        self.correct, self.total = trainer_state.get("correct", 0), trainer_state.get("answer_tokens", 0)


class UnlearnTask:
    """The method's loss on the forget batch (+ its refusal batch) and a paired retain batch."""

    kind = "unlearn"

    def __init__(self, cfg: UnlearnConfig, method: Method, device: torch.device):
        self.cfg, self.method, self.device = cfg, method, device

    def build(self) -> None:
        """Load the benchmark, the target model (and the frozen reference or its cached
        log-probs when a term needs it) and encode the forget, retain and refusal rows."""
        cfg, method, device = self.cfg, self.method, self.device
        seed = cfg.train.seed
        self.benchmark = load_benchmark(cfg.data)
        self.model, self.tokenizer = load_model(cfg.model, path=cfg.target)
        forget_records = self.benchmark.split(cfg.data.forget_split)
        retain_records = self.benchmark.split(retain_split(cfg.data.forget_split))
        if cfg.effects.every > 0 and cfg.effects.probe == "fixed":
            # the retention probe's rows are held out of the retain-side terms' rows, so the
            # regularisers' own retention G-effects are not +‖∇R‖² by construction
            held = set(probe_rows(self.benchmark, cfg.data.forget_split, cfg.effects.probe_size,
                                  cfg.effects.retain_probe_size).retain)
            retain_records = [r for i, r in enumerate(retain_records) if i not in held]
        self.needs = {v: method.needs(v) for v in VIEW_ORDER}
        self.views = [v for v in VIEW_ORDER if v in method.views_needed]
        self.examples = encode_records(forget_records, self.tokenizer, cfg.data)
        self.retain = encode_records(retain_records, self.tokenizer, cfg.data) if "retain" in self.views else []
        self.idk = []
        if "idk" in self.views:
            self.idk = encode_records(refusal_records(forget_records, self.benchmark.refusals, seed),
                                      self.tokenizer, cfg.data)
        self.schedule = Schedule(len(self.examples), cfg.train, n_paired=len(self.retain))
        self.ctx = ObjectiveContext(seed=seed)
        # DDP must look for parameters outside the loss graph when a view reads hidden states
        # (RMU stops at a middle layer: later blocks get no gradient)
        self.find_unused_parameters = any("hidden" in ns for ns in self.needs.values())

        # the frozen reference (the target model) only when a term needs it; when only
        # ref_logps on the fixed forget / idk sets are needed, cache them and free the model
        self.reference, self.ref_caches = None, {}
        ref_needs = {v: {n for n in self.needs[v] if n.startswith("ref_")} for v in self.views}
        if any(ref_needs.values()):
            reference, _ = load_model(without_lora(cfg.model), path=cfg.target)
            reference.to(device).eval().requires_grad_(False)
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
            yield to_device(collate_examples(rows[i:i + size], pad), self.device)

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

    def micro_loss(self, model, micro: dict[str, dict], counts: dict[str, tuple[float, float]]):
        """-> (loss tensor, {term label: float}, {stat name: float}, {counter: float})"""
        views = {}
        for v in self.views:
            tok, seq = counts[v]
            views[v] = token_view(model, micro[v], needs=self.needs[v], reference=self.reference,
                                  ref_cache=self.ref_caches.get(v), token_count=tok, seq_count=seq)
        loss, terms, stats = self.method.loss(views, self.ctx)
        return loss, terms, stats, {}

    def step_done(self, done: int, counters: dict[str, float], loss: float) -> None:
        return None

    def checkpoint_state(self) -> dict:
        return {}

    def restore(self, trainer_state: dict) -> None:
        pass


def make_task(kind: str, cfg, method: Optional[Method], device: torch.device):
    """The task of a run, not yet built: ``"finetune"`` or ``"unlearn"`` (with its parsed method)."""
    return FinetuneTask(cfg, device) if kind == "finetune" else UnlearnTask(cfg, method, device)


def collated_step_batch(batch: dict[str, list[dict]], pad_id: int) -> dict:
    """A step's effective batch as collated tensors: {"forget" (with nested "idk"), "retain"}:
    what a G-effect recording with ``effects.probe="step"`` scores."""
    out = {}
    if "forget" in batch or "idk" in batch:
        rows = batch.get("forget") or batch["idk"]
        out["forget"] = collate_examples(rows, pad_id)
        if "idk" in batch:
            out["forget"]["idk"] = collate_examples(batch["idk"], pad_id)
    if "retain" in batch:
        out["retain"] = collate_examples(batch["retain"], pad_id)
    return out


