"""What the loop calls around its steps besides training: the G-effect recorder, the in-loop
evaluation, checkpoint flushes and the end of a run.

:class:`Callbacks` is the interface with nothing to do (finetuning needs only its end:
:class:`FinetuneCallbacks`); :class:`UnlearnCallbacks` is the unlearning run's one object, built
with every input explicit. The loop calls, in this order::

    resumed(start)                       once, before the first step (also at 0)
    for each step:
        before_step(step, lr, batch)              just before optimizer.step()
        after_optimizer_step(step)                just after it
        after_step(done)                          after logging (in-loop evaluation when due)
        checkpointed()                            after a checkpoint was written
    finish(total_steps, lr) -> result

G-effects (``effects.every > 0``): ``before_step`` records them at the weights the step starts
from, with that step's lr, and ``after_optimizer_step`` the realised-update effect of that very
step (∇R·(θ_t − θ_{t+1})/lr) and the measured probe-risk change beside both predictions; ``finish`` records once more at the final weights. Under
``ddp`` the recorder runs on rank 0 on the bare module (replicated weights); under ``fsdp`` every
rank takes part (collective forwards; the engine all-reduces its scalar dot products; parameters
are kept unsharded during the recording) and rank 0 writes the rows.

Evaluation is a collective call under a process group (``rayunlearn.eval.distributed``: batches
split over the ranks, FSDP2-sharded models supported, every rank gets the single-process result);
rank 0 writes. Under deepspeed the weights are gathered to rank 0, which evaluates alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from rayunlearn import UserError
from rayunlearn.config import UnlearnConfig
from rayunlearn.data.examples import collate_examples, to_device
from rayunlearn.effects.recorder import build_probe, default_sink, make_recorder
from rayunlearn.eval.attacks import attack_unlearned
from rayunlearn.eval.evaluate import Evaluator, trajectory_record, write_eval
from rayunlearn.eval.tofu_logs import export_tofu_logs
from rayunlearn.forward import token_view
from rayunlearn.io import append_jsonl, read_jsonl, write_json
from rayunlearn.models import save_model
from rayunlearn.runs import COMPLETED, LOG_FILE, STATUS_FILE, TOFU_EVAL_DIR, TRAJECTORY_FILE
from rayunlearn.train.parallel import Parallel
from rayunlearn.train.tasks import FinetuneTask, UnlearnTask, collated_step_batch
from rayunlearn.train.timing import PhaseTimer


def scalars(metrics: dict) -> dict:
    """The numeric entries of a metrics dict (what a Tune report carries)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Callbacks:
    """The loop's calls besides training, all doing nothing (see the module docstring)."""

    def resumed(self, start: int) -> None:
        pass

    def before_step(self, step: int, lr: float, batch: dict) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def checkpointed(self) -> None:
        pass

    def finish(self, total_steps: int, lr: float):
        raise NotImplementedError


@torch.no_grad()
def answer_accuracy(model, tokenizer, examples: list[dict], batch_size: int = 64) -> float:
    """Teacher-forced answer-token accuracy (argmax == label over answer tokens)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate_examples(examples[i:i + batch_size], tokenizer.pad_token_id), device)
        view = token_view(model, batch, needs=frozenset({"logits"}))
        correct += int(((view.logits.argmax(-1) == view.labels) & view.mask).sum())
        total += int(view.mask.sum())
    model.train(was_training)
    return correct / max(1, total)


class FinetuneCallbacks(Callbacks):
    """The end of a finetuning run: final accuracy, the model saved into the run directory."""

    def __init__(self, task: FinetuneTask, parallel: Parallel, run_dir: Path, is_main: bool):
        self.task, self.parallel, self.run_dir, self.is_main = task, parallel, run_dir, is_main

    def finish(self, total_steps: int, lr: float) -> Path:
        task, run_dir = self.task, self.run_dir
        model = self.parallel.eval_model()           # collective under fsdp / deepspeed; None off rank 0
        if not self.is_main:
            return run_dir
        acc = answer_accuracy(model, task.tokenizer, task.examples)
        append_jsonl(run_dir / LOG_FILE, {"step": total_steps, "final_accuracy": acc})
        print(f"final answer-token accuracy on {task.split} ({len(task.examples)} QA): {acc:.4f}")
        save_model(model, task.tokenizer, run_dir)
        write_json(run_dir / STATUS_FILE, {"status": COMPLETED, "step": total_steps,
                                           "split": task.split, "final_accuracy": acc})
        return run_dir


class UnlearnCallbacks(Callbacks):
    """The G-effect recorder around every ``effects.every``-th optimiser step, a fast evaluation
    (no generation) every ``eval.every`` steps appended to trajectory.jsonl, and the full
    evaluation at the end (metrics.json + raw.json, tofu_eval/).

    Every rank calls every method: the recorder decides who computes (rank 0 under ddp, every
    rank under fsdp) and who writes (rank 0). G-effect rows go to the aggregator actor named by
    ``cfg.effects.aggregator`` (a sweep) or to ``<results_dir>/effects/<trial_id>/``."""

    def __init__(self, cfg: UnlearnConfig, task: UnlearnTask, parallel: Parallel, *, run_dir: Path,
                 results_dir: Path, trial_id: str, is_main: bool,
                 report: Optional[Callable[[dict], None]] = None, timer: PhaseTimer):
        self.cfg, self.task, self.parallel = cfg, task, parallel
        self.run_dir, self.is_main, self.report = run_dir, is_main, report
        self.timer = timer        # the loop's: recording counts as "effects", in-loop evaluation "trajectory_eval"
        self.recorder = None
        if cfg.effects.every > 0:
            sink = default_sink(cfg.effects, results_dir) if is_main else None
            forget_probe, retain_probe = build_probe(cfg, task.benchmark, task.tokenizer, task.method,
                                                     next(task.model.parameters()).device)
            # under fsdp every rank computes the complete values; rank 0 alone sends them
            self.recorder = make_recorder(cfg.effects, task.model, task.method, forget_probe, retain_probe,
                                          task.reference, task.ctx, sink, trial_id, rank=0 if is_main else 1,
                                          ref_cache=task.ref_caches)
        self._fast = self._full = None

    def resumed(self, start: int) -> None:
        """Before the first step, which is optimiser step `start` (0 when starting from scratch):
        the G-effect sink (LocalSink or the sweep's aggregator actor) keeps only the rows of steps
        before `start` and the recorder continues its cumulative sums (``Recorder.resume``)."""
        if self.recorder is not None:
            self.recorder.resume(start)

    def before_step(self, step: int, lr: float, batch: dict) -> None:
        """Just before optimiser step `step` (0-based = steps already taken): record the
        G-effects at the current weights with this step's lr (no-op unless due)."""
        rec = self.recorder
        if rec is None or not rec.due(step):
            return
        fb = rb = None
        if self.cfg.effects.probe == "step":
            col = to_device(collated_step_batch(batch, self.task.tokenizer.pad_token_id), self.task.device)
            fb, rb = col.get("forget"), col.get("retain")
        with self.timer.phase("effects"), self.parallel.recording():
            rec.before_step(step, lr, forget_batch=fb, retain_batch=rb)

    def after_optimizer_step(self, step: int) -> None:
        """Just after optimiser step `step`: the measured probe-risk change (steps.parquet)."""
        if self.recorder is not None:
            with self.timer.phase("effects"):
                self.recorder.after_step(step)

    def after_step(self, step: int) -> None:
        """After `step` optimiser steps (1-based): the in-loop evaluation when due."""
        if self.cfg.eval.every and step % self.cfg.eval.every == 0 and step != self.task.schedule.total_steps:
            with self.timer.phase("trajectory_eval"):
                metrics = self.evaluate(step, fast=True)
                if self.is_main and metrics is not None:
                    self._trajectory(metrics, step)
                self.parallel.train_mode(True)

    def checkpointed(self) -> None:
        """After a checkpoint: write the G-effect tables, so a resume finds every row up to it."""
        rec = self.recorder
        if rec is not None and rec.sends:
            rec.sink.flush()

    def evaluate(self, step: int, fast: bool) -> Optional[dict]:
        """Evaluate the current weights; every rank calls it (see the module docstring).  Returns
        the metrics on rank 0 (other ranks: the same dict, or None under deepspeed)."""
        if not self.cfg.evaluate:
            return None
        task, par = self.task, self.parallel
        model, kw = task.model, {}
        if par.engine is not None:                    # ZeRO-3: gather, rank 0 alone
            model, kw = par.eval_model(), {"distributed": False}
            if model is None:
                return None
        if fast:
            if self._fast is None:
                self._fast = Evaluator(task.tokenizer, task.benchmark, self.cfg.data, self.cfg.eval,
                                       retain_reference=self.cfg.eval.retain_reference, fast=True, **kw)
            return self._fast(model, step=step)
        self._full = Evaluator(task.tokenizer, task.benchmark, self.cfg.data, self.cfg.eval,
                               retain_reference=self.cfg.eval.retain_reference, **kw)
        return self._full(model, step=step)

    def _trajectory(self, metrics: dict, step: int, report: bool = True) -> None:
        rec = {**trajectory_record(metrics), "step": step}
        append_jsonl(self.run_dir / TRAJECTORY_FILE, rec)
        if report and self.report is not None:
            self.report({**scalars(rec), "done": False})

    def finish(self, total_steps: int, lr: float) -> dict:
        """The last G-effect recording, the full evaluation, status.json = completed."""
        rec = self.recorder
        if rec is not None:
            # the final weights (no next step to measure: the steps row has no measured change)
            with self.timer.phase("effects"):
                if rec.due(total_steps) and self.cfg.effects.probe != "step":
                    with self.parallel.recording():
                        rec.before_step(total_steps, lr)
                rec.close()
        metrics = self.evaluate(total_steps, fast=False)
        if not self.is_main:
            return {}
        if metrics is None:
            log = read_jsonl(self.run_dir / LOG_FILE)
            metrics = dict(log[-1]) if log else {"step": total_steps}
        else:
            self._trajectory(metrics, total_steps, report=False)
            if self.cfg.eval.attacks:
                with self.timer.phase("attacks"):
                    metrics = attack_unlearned(self.cfg.eval, self.task.model, self.task.benchmark, self._full,
                                               metrics, self.run_dir)
            write_eval(metrics, self.run_dir)
            try:
                export_tofu_logs(metrics, self.run_dir / TOFU_EVAL_DIR)
            except UserError as exc:   # optional interop output
                print(f"note: no {TOFU_EVAL_DIR}/ export ({exc})")
            metrics = {k: v for k, v in metrics.items() if k != "raw"}
        write_json(self.run_dir / STATUS_FILE, {"status": COMPLETED, "step": total_steps})
        if self.report is not None:
            self.report({**scalars(metrics), "step": total_steps, "done": True})
        return metrics
