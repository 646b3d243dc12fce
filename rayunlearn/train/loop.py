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
records ``status.json`` = diverged and keeps every checkpoint written so far; so does a model
whose evaluation gives non-finite values while its loss stayed finite (the evaluator's
:class:`NonFiniteEvaluationError` becomes a :class:`DivergedError` here).
Any other exception records ``status.json`` = failed with the error before it propagates (an
interrupt or a kill leaves "running": the run is resumable, not failed). Re-running resumes
from the last readable checkpoint (an unreadable latest one is skipped with a warning): the log
records after it are dropped and redone.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from rayunlearn.config import TrainConfig
from rayunlearn.data.examples import collate_examples, to_device
from rayunlearn.eval.evaluate import NonFiniteEvaluationError
from rayunlearn.io import append_jsonl, dumps, read_json, read_jsonl, seed_everything, write_json, write_text
from rayunlearn.models import unwrap
from rayunlearn.models.checkpoints import latest_checkpoint, load_weights
from rayunlearn.objectives import Method
from rayunlearn.runs import DIVERGED, FAILED, LOG_FILE, RUNNING, STATUS_FILE, TIME_PHASES, TRAJECTORY_FILE, DivergedError
from rayunlearn.train.callbacks import Callbacks, FinetuneCallbacks, UnlearnCallbacks
from rayunlearn.train.parallel import Parallel, rank_world, sum_over_workers, training_device
from rayunlearn.train.progress import progress_bar
from rayunlearn.train.schedule import worker_share
from rayunlearn.train.tasks import batch_counts, make_task
from rayunlearn.train.timing import PhaseTimer


def run_loop(kind: str, cfg, run_dir: Path, method: Optional[Method] = None, *,
             results_dir: Optional[Path] = None, trial_id: str = "",
             report: Optional[Callable[[dict], None]] = None):
    """Train `kind` ("finetune" | "unlearn", with its parsed `method`) into `run_dir`; an
    unlearning run's G-effect rows go to ``<results_dir>/effects/<trial_id>/`` (or the sweep's
    aggregator actor). Returns the run directory (finetune) or the final metrics (unlearn; {}
    off rank 0)."""
    run_dir = Path(run_dir)
    try:
        return _train(kind, cfg, run_dir, method, results_dir=results_dir, trial_id=trial_id, report=report)
    except DivergedError:
        raise                                     # status.json = diverged is already written
    except NonFiniteEvaluationError as exc:
        # the loss stayed finite but the weights did not: as deterministic as a non-finite loss
        msg = (f"training diverged at step {exc.step}: {exc}, although the training loss stayed finite. "
               f"Lower train.lr or change the method's hyper-parameters.")
        if rank_world()[0] == 0:
            write_json(run_dir / STATUS_FILE, {"status": DIVERGED, "step": exc.step, "message": msg})
        raise DivergedError(msg) from None
    except Exception as exc:
        if rank_world()[0] == 0:
            _failed(run_dir, exc)
        raise


def _failed(run_dir: Path, exc: Exception) -> None:
    """status.json = failed with the error (a sweep and a rerun read it)."""
    write_json(run_dir / STATUS_FILE, {"status": FAILED, "step": _status_step(run_dir),
                                       "error": f"{type(exc).__name__}: {exc}"})


def _status_step(run_dir: Path) -> int:
    """The step status.json records (where the failed attempt started), 0 without one."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return int(read_json(run_dir / STATUS_FILE).get("step", 0))
    return 0


def _train(kind: str, cfg, run_dir: Path, method: Optional[Method], *, results_dir: Optional[Path],
           trial_id: str, report: Optional[Callable[[dict], None]]):
    rank, world = rank_world()
    train: TrainConfig = cfg.train
    device = training_device(train)
    seed_everything(train.seed)
    timer = PhaseTimer("load")         # where the time goes: returned with an unlearning run's metrics
    task = make_task(kind, cfg, method, device)
    task.build()
    task.model.to(device)
    ckpt = latest_checkpoint(run_dir, warn=print if rank == 0 else None)
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
            print(f"resuming {run_dir} from {ckpt.name} ({start}/{sched.total_steps} steps)")
    last_loss = None
    if is_main:
        # records after the checkpoint (or of an attempt that wrote none) are redone
        _truncate_jsonl(log_path, start)
        _truncate_jsonl(run_dir / TRAJECTORY_FILE, start)
        last_loss = next((r["loss"] for r in reversed(read_jsonl(log_path)) if r.get("loss") is not None), None)
        write_json(run_dir / STATUS_FILE, {"status": RUNNING, "step": start, "total_steps": sched.total_steps})

    if kind == "unlearn":
        callbacks: Callbacks = UnlearnCallbacks(cfg, task, par, run_dir=run_dir, results_dir=Path(results_dir),
                                                trial_id=trial_id, is_main=is_main, report=report, timer=timer)
    else:
        callbacks = FinetuneCallbacks(task, par, run_dir, is_main)
    callbacks.resumed(start)      # also at 0: a retried attempt's rows are replaced, not duplicated

    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if train.bf16 and par.engine is None
                else contextlib.nullcontext())
    par.train_mode(True)
    last_ckpt = ckpt
    lr = train.lr
    t0 = time.time()
    timer.switch("steps")
    with progress_bar(is_main and train.progress, f"{kind} {run_dir.name}", sched.total_steps, start,
                      last_loss) as bar:
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
                _diverged(run_dir, is_main, step + 1, loss_value, grad_norm, terms_all, lr, last_ckpt,
                          reduced_precision=train.bf16 or cfg.model.dtype == "bfloat16")
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
    timer.switch("final_eval")
    result = callbacks.finish(sched.total_steps, lr)
    timer.stop()
    if kind == "unlearn" and result:
        result["time"] = timer.seconds(TIME_PHASES)
    return result


def _section(totals: dict[str, float], prefix: str) -> dict[str, float]:
    """The entries ``<prefix>.<name>`` of the step's totals, by name (sorted)."""
    return {k[len(prefix) + 1:]: v for k, v in totals.items() if k.startswith(prefix + ".")}


def _diverged(run_dir: Path, is_main: bool, step: int, loss: float, grad_norm: float, terms: dict,
              lr: float, last_ckpt: Optional[Path], reduced_precision: bool) -> None:
    """Record and raise the divergence at `step` (1-based), saying what was non-finite: a
    non-finite loss (a term ran off: lr or the method's hyper-parameters) and a non-finite
    gradient with a finite loss (an overflow in the backward pass, which clipping cannot mend;
    in reduced precision most likely the precision's range) call for different remedies."""
    kept = f"kept the last good checkpoint {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
    shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    if not math.isfinite(loss):
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        detail = f"non-finite terms: {', '.join(bad)}; {shown}" if bad else shown
        what = f"the loss is {loss}{f' ({detail})' if detail else ''} with lr={lr:.3g}"
        remedy = "Lower train.lr or change the method's hyper-parameters"
    else:
        what = (f"the gradient norm is {grad_norm} while the loss is finite "
                f"({loss:.6g}{'; ' + shown if shown else ''})")
        remedy = "A finite loss with a non-finite gradient norm is an overflow in the backward pass"
        remedy += (": train in full precision (model.dtype=float32, train.bf16=false)" if reduced_precision else
                   " in full precision, so the objective ran off: lower train.lr or change the method's "
                   "hyper-parameters (train.max_grad_norm cannot clip a non-finite norm)")
    msg = f"training diverged at step {step}: {what}. Stopped before the update; {kept}. {remedy}."
    if is_main:
        write_json(run_dir / STATUS_FILE, {"status": DIVERGED, "step": step, "message": msg,
                                           "last_checkpoint": str(last_ckpt) if last_ckpt else None})
    raise DivergedError(msg)


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records written after checkpoint `step` (they are redone on resume)."""
    if path.exists():
        keep = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
        write_text(path, "".join(dumps(r) + "\n" for r in keep))   # strict JSON, as append_jsonl writes
