"""The training loop, identical in-process and per Ray Train worker; it reads top to bottom:

build the task → wrap for the strategy → resume → for each optimiser step { take this worker's
share of the effective batch → micro-batches → loss × world size → backward (accumulate;
gradients synchronised on the last micro-batch only) → sum the logged values over workers →
guard → clip → callbacks (G-effects before the step) → AdamW step → callbacks (after) → log →
evaluation / checkpoint every k steps } → finish (save / evaluate).

What the pieces hold: ``tasks.py`` the model, data and loss of finetuning or unlearning,
``schedule.py`` which examples a step uses and its lr, ``parallel.py`` the strategy wrapper and
optimiser, ``callbacks.py`` the recorder / evaluator / end of a run, ``progress.py`` the bar.

A non-finite loss or gradient stops the run before the optimiser step (:class:`DivergedError`),
records ``status.json`` = diverged and keeps every checkpoint written so far. Re-running resumes
from the last checkpoint: the log records after it are dropped and redone.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from rayunlearn.config import TrainConfig
from rayunlearn.data.examples import collate_examples, to_device
from rayunlearn.io import append_jsonl, read_jsonl, seed_everything, write_json, write_text
from rayunlearn.models import unwrap
from rayunlearn.models.checkpoints import latest_checkpoint, load_weights
from rayunlearn.objectives import Method
from rayunlearn.runs import DIVERGED, LOG_FILE, RUNNING, STATUS_FILE, TRAJECTORY_FILE, DivergedError
from rayunlearn.train.callbacks import Callbacks, FinetuneCallbacks, UnlearnCallbacks
from rayunlearn.train.parallel import Parallel, rank_world, sum_over_workers, training_device
from rayunlearn.train.progress import progress_bar
from rayunlearn.train.schedule import worker_share
from rayunlearn.train.tasks import batch_counts, make_task


def run_loop(kind: str, cfg, run_dir: Path, method: Optional[Method] = None, *,
             results_dir: Optional[Path] = None, trial_id: str = "",
             report: Optional[Callable[[dict], None]] = None):
    """Train `kind` ("finetune" | "unlearn", with its parsed `method`) into `run_dir`; an
    unlearning run's G-effect rows go to ``<results_dir>/effects/<trial_id>/`` (or the sweep's
    aggregator actor). Returns the run directory (finetune) or the final metrics (unlearn; {}
    off rank 0)."""
    run_dir = Path(run_dir)
    rank, world = rank_world()
    train: TrainConfig = cfg.train
    device = training_device(train)
    seed_everything(train.seed)
    task = make_task(kind, cfg, method, device)
    task.build()
    task.model.to(device)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and train.strategy != "deepspeed":
        load_weights(ckpt, unwrap(task.model))     # before wrapping / sharding: every rank reads it
    par = Parallel(task.model, train, device, rank, world, dtype=cfg.model.dtype, reference=task.reference,
                   find_unused_parameters=task.find_unused_parameters)
    rank, world = par.rank, par.world
    tokenizer, optimizer, sched = task.tokenizer, par.optimizer, task.schedule
    is_main = rank == 0
    log_path = run_dir / LOG_FILE

    start = 0
    if ckpt is not None:
        trainer_state = par.load_optimizer(ckpt)
        start = int(trainer_state["step"])
        task.restore(trainer_state)
        if is_main:
            _truncate_jsonl(log_path, start)
            _truncate_jsonl(run_dir / TRAJECTORY_FILE, start)
            print(f"resuming {run_dir} from {ckpt.name} ({start}/{sched.total_steps} steps)")
    if is_main:
        write_json(run_dir / STATUS_FILE, {"status": RUNNING, "step": start, "total_steps": sched.total_steps})

    if kind == "unlearn":
        callbacks: Callbacks = UnlearnCallbacks(cfg, task, par, run_dir=run_dir, results_dir=Path(results_dir),
                                                trial_id=trial_id, is_main=is_main, report=report)
    else:
        callbacks = FinetuneCallbacks(task, par, run_dir, is_main)
    callbacks.resumed(start)      # also at 0: a retried attempt's rows are replaced, not duplicated

    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if train.bf16 and par.engine is None
                else contextlib.nullcontext())
    par.train_mode(True)
    last_ckpt = ckpt
    lr = train.lr
    t0 = time.time()
    with progress_bar(is_main and train.progress, f"{kind} {run_dir.name}", sched.total_steps, start) as bar:
        for step in range(start, sched.total_steps):
            lr = train.lr * sched.lr_factor(step)
            par.set_lr(lr)
            batch = task.effective_batch(step)
            counts = batch_counts(batch)      # loss normalisers of the whole effective batch
            shares = {v: worker_share(rows, rank, world, train.micro_batch_size) for v, rows in batch.items()}
            n_micro = len(next(iter(shares.values())))
            par.zero_grad()
            sums = {"loss": 0.0}              # "loss", "term.<label>", "stat.<name>", "count.<name>"
            for j in range(n_micro):
                last = j == n_micro - 1
                micro = {v: to_device(collate_examples(shares[v][j], tokenizer.pad_token_id), device)
                         for v in shares}
                with par.micro(last):
                    with autocast:
                        loss, terms, stats, counters = task.micro_loss(par.forward_model, micro, counts)
                    par.backward(loss, last)
                sums["loss"] += float(loss.detach())
                for prefix, values in (("term", terms), ("stat", stats), ("count", counters)):
                    for k, val in values.items():
                        sums[f"{prefix}.{k}"] = sums.get(f"{prefix}.{k}", 0.0) + val
            # the loss and terms are globally normalised (their sums over workers are the batch's);
            # stats are per-micro-batch means (averaged over every worker's micro-batches)
            totals = sum_over_workers(sums, device)
            loss_value = totals["loss"]
            terms_all = _section(totals, "term")
            stats_all = {k: v / (n_micro * world) for k, v in _section(totals, "stat").items()}
            grad_norm = par.grad_norm(train.max_grad_norm)
            if not (math.isfinite(loss_value) and (math.isfinite(grad_norm) or par.engine is not None)):
                _diverged(run_dir, is_main, step + 1, loss_value, grad_norm, terms_all, lr, last_ckpt)
            callbacks.before_step(step, lr, batch)      # G-effects at the weights this step starts from
            ds_norm = par.step()
            if ds_norm is not None:
                grad_norm = ds_norm
            callbacks.after_optimizer_step(step)                   # the measured risk change of this step
            done = step + 1
            if is_main and (done % max(1, train.log_every) == 0 or done == sched.total_steps):
                rec = {"step": done, "epoch": round(sched.epoch(done), 4), "lr": lr, "loss": loss_value,
                       "grad_norm": grad_norm}
                rec.update({f"term.{k}": v for k, v in terms_all.items()})
                rec.update({f"stat.{k}": v for k, v in stats_all.items()})
                rec["time_s"] = round(time.time() - t0, 3)
                append_jsonl(log_path, rec)
            note = task.step_done(done, _section(totals, "count"), loss_value)
            if note is not None and is_main:
                append_jsonl(log_path, note[0])
                bar.print(note[1])
            bar.advance(loss_value)
            callbacks.after_step(done)
            if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == sched.total_steps:
                last_ckpt = par.save_checkpoint(run_dir, done, tokenizer, task.checkpoint_state())
                callbacks.checkpointed()
    par.train_mode(False)
    return callbacks.finish(sched.total_steps, lr, optimizer)


def _section(totals: dict[str, float], prefix: str) -> dict[str, float]:
    """The entries ``<prefix>.<name>`` of the step's totals, by name (sorted)."""
    return {k[len(prefix) + 1:]: v for k, v in totals.items() if k.startswith(prefix + ".")}


def _diverged(run_dir: Path, is_main: bool, step: int, loss: float, grad_norm: float, terms: dict,
              lr: float, last_ckpt: Optional[Path]) -> None:
    kept = f"kept the last good checkpoint {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    msg = (f"training diverged at step {step}: loss={loss}, grad_norm={grad_norm}"
           f"{' (terms ' + ', '.join(f'{k}={v:.4g}' for k, v in terms.items()) + ')' if terms else ''} "
           f"with lr={lr:.3g}. Stopped before the update; {kept}. Lower train.lr, set "
           f"train.max_grad_norm, or change the method's hyper-parameters.")
    if is_main:
        write_json(run_dir / STATUS_FILE, {"status": DIVERGED, "step": step, "message": msg,
                                           "last_checkpoint": str(last_ckpt) if last_ckpt else None})
    raise DivergedError(msg)


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records written after checkpoint `step` (they are redone on resume)."""
    if path.exists():
        keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
