"""Finetuning and unlearning: one training loop of our own, in-process or per Ray Train worker.

    finetune(cfg: FinetuneConfig) -> Path      base / target / retain model
    unlearn(cfg: UnlearnConfig) -> dict        unlearn data.forget_split from the target model
    unlearn_trial(cfg, report=None) -> dict    the per-trial entry for a Ray Tune sweep

Where things are, in the order one run meets them:

- ``launch.py``     checks, the run directory, in-process or Ray Train launch (the API above)
- ``loop.py``       the loop, top to bottom (``run_loop``)
- ``tasks.py``      finetuning / unlearning: model, data, micro-batch loss, task bookkeeping
- ``schedule.py``   which examples each step uses, the learning rate
- ``parallel.py``   the ddp / fsdp / deepspeed wrapper and optimiser (``strategies.py`` beside it)
- ``callbacks.py``  G-effect recorder, in-loop evaluation, the end of a run
- ``progress.py``   the progress bar

Checkpoint files are ``rayunlearn.models.checkpoints``'; the results layout ``rayunlearn.runs``'.
Files a run writes (rank 0): ``config.yaml``, ``log.jsonl`` (per step: step, epoch, lr, loss,
grad_norm, term.<label>, stat.<name>), ``status.json`` (running | completed | diverged),
``checkpoints/step-<k>/`` (all kept), and for unlearning ``trajectory.jsonl`` / ``metrics.json``.
Re-running the same command resumes from the last checkpoint; a different config is refused.
"""

from rayunlearn.train.launch import finetune, train_loop_per_worker, unlearn, unlearn_trial

__all__ = ["finetune", "unlearn", "unlearn_trial", "train_loop_per_worker"]
